"""One writer per run directory: an advisory lock held for the whole life of the trainer process.

`flock` on RUN_DIR/.lock is released by the kernel when the process dies however it dies (kill -9,
out-of-memory, a crash), so a dead run never blocks its own resume. In a multi-host job only
process 0 takes it. The file holds the holder's pid, host and start time, which the refusal names.

Shared filesystems: on local disks and NFSv4 (Linux maps flock to byte-range locks that the server
keeps) two trainers on one RUN_DIR are refused. On NFSv3 without a lock daemon, and on object-store
mounts (gcsfuse, s3fs, Filestore-less FUSE), locks are either refused (then we warn and continue
unlocked) or only seen by processes on the same machine: there, one writer per run directory is
the user's duty.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from mtp_jax.errors import UserError

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run dir -> open descriptor; kept open for the process lifetime


def prepare_run_dir(run_dir: Path) -> Path:
    """Creates RUN_DIR (and parents) or says in one line why it cannot be a run directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.run_dir={run_dir} is a file, not a directory; choose another train.run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        raise UserError(f"train.run_dir={run_dir} lies below a file; choose a path whose parents are folders") from None
    except OSError as err:
        raise UserError(f"cannot create train.run_dir={run_dir} ({err.strerror}); choose a writable path") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"train.run_dir={run_dir} is not writable; fix its permissions or choose another path")
    return run_dir


def acquire(run_dir: Path) -> None:
    """Takes the run directory's lock for this process, or refuses naming the process that holds it."""
    key = run_dir.resolve()
    if key in _held:
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.read(fd, 4096))
        os.close(fd)
        raise UserError(
            f"run directory {run_dir} is in use by another trainer ({holder}); wait for it to finish, stop it, "
            f"or choose another train.run_dir"
        ) from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"warning: {run_dir} does not support file locks ({err.strerror}); make sure no other trainer "
              f"writes to it", file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _held[key] = fd


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"pid {h['pid']} on host {h['host']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"
