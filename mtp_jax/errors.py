"""User errors, the divergence error, exit statuses and the guard every command runs under.

A user error (bad config, bad path, bad flag) is one `error: ...` line naming the value and the
fix, exit status 2. Anything else is a bug and keeps its traceback: no catch-all hides a defect.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_USER = 2  # bad input: config, flags, paths, data
EXIT_LOST_PEER = 3  # another process of a multi-host job stopped answering (distributed.py)
EXIT_DIVERGED = 4  # non-finite loss or gradient: the run stopped, good checkpoints kept
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class UserError(ValueError):
    """A user-facing error: one line that names the bad value and the fix."""


ConfigError = UserError  # the historical name, used throughout the config code


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient; no checkpoint with it was written."""


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are a UserError (one line, exit 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see {self.prog} --help")


def guarded(main: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """Wraps a command's main: user errors and divergence become one line and their exit status."""

    def run(argv: list[str] | None = None) -> int:
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER) from None
        except DivergenceError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_DIVERGED) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None

    run.__doc__ = main.__doc__
    return run
