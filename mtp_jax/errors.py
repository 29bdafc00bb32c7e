"""User errors, the divergence error, exit statuses and the guard every command runs under.

A user error (bad config, bad path, bad flag) is one `error: ...` line naming the value and the
fix, exit status 2. Anything else is a bug and keeps its traceback: no catch-all hides a defect.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import re
import resource
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

EXIT_USER = 2  # bad input: config, flags, paths, data
EXIT_LOST_PEER = 3  # another process of a multi-host job stopped answering (distributed.py); not 1 (this process failed)
EXIT_DIVERGED = 4  # non-finite loss or gradient: the run stopped, good checkpoints kept
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
EXIT_TERMINATED = 143  # SIGTERM before a trainer's first step, which had nothing to save (128 + SIGTERM)


class UserError(ValueError):
    """A user-facing error: one line that names the bad value and the fix."""


ConfigError = UserError  # the historical name, used throughout the config code


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient; no checkpoint with it was written."""


# errno -> what it means for the user; TensorStore (Orbax's writer) gives the errno only inside its message.
FULL_DISK = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for the file-size limit (ulimit -f)"}
DENIED = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system"}
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")
_TENSORSTORE_FILE = re.compile(r'local file "([^"]+)"')


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


RERUN = "choose another directory (train.run_dir); then rerun"


def full_disk_error(code: int, directory: str | Path, what: str, left: str = "", fix: str = RERUN) -> UserError:
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
                     f"the quota or `ulimit -f`, or {fix}")


@contextlib.contextmanager
def full_disk_in(directory: str | Path, what: str, fix: str = RERUN) -> Iterator[None]:
    """Inside, a write that finds the disk full is one line naming `directory` (not the file deep inside it that
    failed: a shard of a TensorStore array) and `fix`."""
    try:
        yield
    except (OSError, ValueError) as err:
        code = full_disk_errno(err)
        if code is None:
            raise
        raise full_disk_error(code, directory, what, fix=fix) from None


def denied_error(directory: str | Path, what: str, reason: str = "permission denied", left: str = "",
                 verb: str = "write") -> UserError:
    """One line for a file or folder this process may not write (or use): which, where, the fix."""
    return UserError(f"cannot {verb} {what} in {directory}: {reason}{left}; fix the permissions there (or choose "
                     f"another directory, train.run_dir for a run); then rerun")


def write_error(error: BaseException, directory: Path) -> UserError | None:
    """The one line for an OSError (or TensorStore's ValueError, which carries the errno only in its text) that is
    the user's to fix: a full disk, quota or file-size limit, or a missing permission; else None. `directory`: where
    the command was writing, named when the error carries no file name (a failed flush)."""
    named = _TENSORSTORE_FILE.search(str(error))
    filename = getattr(error, "filename", None) or (named and named.group(1))
    what, folder = (Path(filename).name, Path(filename).parent) if filename else ("a file", directory)
    code = full_disk_errno(error)
    if code is not None:
        return full_disk_error(code, folder, what)
    if isinstance(error, OSError) and error.errno in DENIED:  # a read as well as a write: "use"
        return denied_error(folder, what, DENIED[error.errno], verb="use")
    return None


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Inside, an OSError names `path`: a failed write or flush names no file and a temporary sibling's failure names
    a file the user never sees, so the one line would blame the current directory or that name."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are a UserError (one line, exit 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see {self.prog} --help")


def guarded(main: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """Wraps a command's main: user errors, a full disk, a missing permission and divergence become one line and
    their exit status."""

    def run(argv: list[str] | None = None) -> int:
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER) from None
        except (OSError, ValueError) as err:  # a full disk or a permission; any other keeps its traceback
            line = write_error(err, Path.cwd())
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            raise SystemExit(EXIT_USER) from None
        except DivergenceError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_DIVERGED) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None

    run.__doc__ = main.__doc__
    return run
