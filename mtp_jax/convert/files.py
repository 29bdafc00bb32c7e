"""Checkpoint files are untrusted input: JSON must be an object, and a byte range must lie inside its
file before it is memory-mapped (a range past the end would fault on read instead of failing here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mtp_jax.errors import UserError


def read_json(path: Path) -> dict:
    """A JSON object, or one line naming the file and what is wrong with it."""
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"'{path}' is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError(f"'{path}' holds a JSON {type(value).__name__}, not an object")
    return value


def map_range(path: Path, dtype: np.dtype, offset: int, count: int, what: str) -> np.ndarray:
    """A read-only memory map of `count` elements at byte `offset`, refused when they pass the end of the file."""
    end, size = offset + count * dtype.itemsize, path.stat().st_size
    if offset < 0 or end > size:
        raise UserError(f"{what} in '{path}' spans bytes {offset}..{end}, past the end of the file ({size} bytes); "
                        f"the file is truncated or corrupt")
    if count == 0:  # mmap refuses an empty mapping
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
