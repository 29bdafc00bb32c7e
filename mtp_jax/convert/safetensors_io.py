"""Safetensors files as memory-mapped NumPy arrays, single files or sharded with an index.

Read here rather than through `safetensors.numpy`, which cannot return bfloat16 (what released
Llama weights are): the format is an 8-byte header length, a JSON header, then raw little-endian
tensors, so a read-only `np.memmap` per tensor streams a model of any size. The header is checked
before any tensor is mapped: its length and every tensor's byte range must lie inside the file and
match the tensor's shape and dtype. Writing (float32 only) goes through the `safetensors` package itself.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path, PurePosixPath
from typing import Any

import ml_dtypes
import numpy as np

from mtp_jax.convert.files import map_range, read_json
from mtp_jax.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header and the byte offset where tensor data begins."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"'{path}' is {size} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER, size - 8):
            raise UserError(f"'{path}' declares a {length}-byte header but holds {size} bytes; it is not a safetensors file")
        text = f.read(length)
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"'{path}' has a header that is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise UserError(f"'{path}' has a header that is not a JSON object")
    return header, 8 + length


def _counts(value: Any) -> bool:
    """A JSON list of integers >= 0."""
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)


def _entry_problem(entry: Any, data_bytes: int) -> str | None:
    """Why a header entry is not a tensor inside the data section, or None."""
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
        dtype = entry.get("dtype") if isinstance(entry, dict) else entry
        return f"has dtype {str(dtype)[:40]}, which mtp-convert does not read"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not _counts(shape) or not (_counts(offsets) and len(offsets) == 2):
        return f"has a malformed shape {str(shape)[:40]} or data_offsets {str(offsets)[:40]}"
    begin, end = offsets
    if not begin <= end <= data_bytes:
        return f"has data_offsets [{begin}, {end}] outside the file's {data_bytes} data bytes"
    want = math.prod(shape) * np.dtype(_DTYPES[entry["dtype"]]).itemsize
    if end - begin != want:
        return f"has shape {tuple(shape)} of {entry['dtype']} ({want} bytes) but data_offsets span {end - begin} bytes"
    return None


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    header, start = _header(path)
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        problem = _entry_problem(entry, path.stat().st_size - start)
        if problem:
            raise UserError(f"tensor '{name}' in '{path}' {problem}")
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        flat = map_range(path, dtype, start + begin, (end - begin) // dtype.itemsize, f"tensor '{name}'")
        out[name] = flat.reshape(entry["shape"])
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header's `__metadata__` (string -> string)."""
    path = Path(path)
    meta = _header(path)[0].get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"'{path}' has __metadata__ that is not a map of strings")
    return meta


def _index_files(src: Path) -> list[str]:
    """The shard files an index names; each must be a file inside `src` (no absolute path, no '..')."""
    weight_map = read_json(src / INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"'{src / INDEX_FILE}' has no weight_map of tensor name -> file name")
    files = sorted(set(weight_map.values()))
    for name in files:
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
            raise UserError(f"'{src / INDEX_FILE}' names '{name}', outside the checkpoint folder; "
                            f"an index may only name files inside it")
        if not (src / name).is_file():
            raise UserError(f"'{src / INDEX_FILE}' names '{name}', which is not a file in '{src}'")
    return files


def read_safetensors_dir(src: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of `model.safetensors`, or of the shards `model.safetensors.index.json` names."""
    src = Path(src)
    if (src / INDEX_FILE).is_file():
        files = _index_files(src)
    elif (src / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise UserError(f"'{src}' holds neither {SINGLE_FILE} nor {INDEX_FILE}; point at a Hugging Face model folder")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        shard = read_safetensors(src / name)
        twice = shard.keys() & tensors.keys()
        if twice:
            raise UserError(f"tensor '{min(twice)}' appears in more than one shard of '{src}' (again in '{name}')")
        tensors.update(shard)
    return tensors


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
