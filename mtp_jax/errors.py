"""User errors, the divergence error, exit statuses and the guard every command runs under.

A user error (bad config, bad path, bad flag) is one `error: ...` line naming the value and the
fix, exit status 2. Anything else is a bug and keeps its traceback: no catch-all hides a defect.
"""

from __future__ import annotations

import argparse
import errno
import re
import resource
import shutil
import sys
from pathlib import Path
from typing import Callable

EXIT_USER = 2  # bad input: config, flags, paths, data
EXIT_LOST_PEER = 3  # another process of a multi-host job stopped answering (distributed.py); not 1 (this process failed)
EXIT_DIVERGED = 4  # non-finite loss or gradient: the run stopped, good checkpoints kept
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class UserError(ValueError):
    """A user-facing error: one line that names the bad value and the fix."""


ConfigError = UserError  # the historical name, used throughout the config code


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient; no checkpoint with it was written."""


# errno -> what it means for the user; TensorStore (Orbax's writer) gives the errno only inside its message.
FULL_DISK = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for the file-size limit (ulimit -f)"}
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")


def full_disk_errno(error: BaseException | None) -> int | None:
    """The errno when `error` or one of its causes says the disk (or the quota, or the file-size limit) is full."""
    for _ in range(32):  # a chain of causes is short; the bound guards against a cycle
        if error is None:
            return None
        if isinstance(error, OSError) and error.errno in FULL_DISK:
            return error.errno
        found = _TENSORSTORE_ERRNO.search(str(error))
        if found and int(found.group(1)) in FULL_DISK:
            return int(found.group(1))
        error = error.__cause__ or error.__context__
    return None


def full_disk_error(code: int, directory: str | Path, what: str, left: str = "") -> UserError:
    """One line for a write that found the disk full: which directory, how much is free there, the fix."""
    free = "free space unknown"  # an object store (gs://) has no disk_usage
    if "://" not in str(directory):
        folder = Path(directory)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free there"
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        free += f", files limited to {limit} bytes" if limit != resource.RLIM_INFINITY else ""
    return UserError(f"cannot write {what} in {directory}: {FULL_DISK[code]} ({free}){left}; free space there, raise "
                     f"the quota or `ulimit -f`, or choose another directory (train.run_dir); then rerun")


def full_disk_write_error(error: OSError, directory: Path) -> UserError | None:
    """The one line for an OSError that is a full disk, else None. `directory`: where the command was writing,
    named when the error carries no file name (a failed flush)."""
    code = full_disk_errno(error)
    if code is None:
        return None
    what, folder = (Path(error.filename).name, Path(error.filename).parent) if error.filename else ("a file", directory)
    return full_disk_error(code, folder, what)


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are a UserError (one line, exit 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see {self.prog} --help")


def guarded(main: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """Wraps a command's main: user errors, a full disk and divergence become one line and their exit status."""

    def run(argv: list[str] | None = None) -> int:
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except OSError as err:  # only a full disk (every other OSError keeps its traceback, or is a UserError first)
            full = full_disk_write_error(err, Path.cwd())
            if full is None:
                raise
            print(f"error: {full}", file=sys.stderr)
            raise SystemExit(EXIT_USER) from None
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
