"""Every file the project writes whole goes through `write_atomic`: readers see the old file or the new one, never
a truncated one (a full disk mid-write leaves the old file and no temporary)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from mtp_jax.errors import naming


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Writes a temporary sibling, fsyncs it, renames it over `path`, fsyncs the folder; on failure removes it.
    A failure is an OSError naming `path`."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    with naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a file written whole keeps the usual mode
            with os.fdopen(fd, "wb") as out:
                out.write(raw)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_json(path: str | Path, value: object) -> None:
    """`value` as indented JSON, written whole."""
    write_atomic(path, json.dumps(value, indent=2))
