"""Safetensors files as memory-mapped NumPy arrays, single files or sharded with an index.

Read here rather than through `safetensors.numpy`, which cannot return bfloat16 (what released
Llama weights are): the format is an 8-byte header length, a JSON header, then raw little-endian
tensors, so a read-only `np.memmap` per tensor streams a model of any size. Writing (float32
only) goes through the `safetensors` package itself.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from mtp_jax.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        if entry["dtype"] not in _DTYPES:
            raise UserError(f"tensor '{name}' in '{path}' has dtype {entry['dtype']}, which mtp-convert does not read")
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        flat = np.memmap(path, dtype=dtype, mode="r", offset=8 + length + begin, shape=((end - begin) // dtype.itemsize,))
        out[name] = flat.reshape(entry["shape"])
    return out


def read_safetensors_dir(src: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of `model.safetensors`, or of the shards `model.safetensors.index.json` names."""
    src = Path(src)
    if (src / INDEX_FILE).is_file():
        files = sorted(set(json.loads((src / INDEX_FILE).read_text())["weight_map"].values()))
    elif (src / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise UserError(f"'{src}' holds neither {SINGLE_FILE} nor {INDEX_FILE}; point at a Hugging Face model folder")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(read_safetensors(src / name))
    return tensors


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
