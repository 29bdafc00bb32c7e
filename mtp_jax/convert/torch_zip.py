"""Reads a PyTorch `torch.save` file (the zip format, PyTorch >= 1.6) without importing torch.

The zip holds `<root>/data.pkl` (a pickle whose tensors refer to storages by key) and one
uncompressed member `<root>/data/<key>` per storage. Each storage becomes a read-only NumPy
memory map of the file, so a 13 GB state dict costs no memory until a tensor is read.
The file is untrusted: the pickle may name only the globals a state dict uses (no code runs), and
every tensor's offset, sizes and strides are checked against its storage, and every storage
against its zip member, before a view of it exists.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from mtp_jax.convert.files import map_range
from mtp_jax.errors import UserError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
# What a malformed pickle raises inside the unpickler (besides our own UserError).
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                  OverflowError, RecursionError, zipfile.BadZipFile)


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A tensor as the pickle describes it; checked (`_view`) before it becomes an array."""

    storage: Any
    offset: Any
    size: Any
    stride: Any


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


class _Unpickler(pickle.Unpickler):
    """Resolves exactly the globals a state dict uses; anything else is refused (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise UserError(f"data.pkl names {module}.{name}, which a PyTorch state dict does not use; refusing to load it")

    def persistent_load(self, pid: Any) -> _Storage:
        ok = isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
        if not ok or not _is_int(pid[4]) or pid[4] < 0 or not isinstance(pid[2], (str, int)):
            raise UserError(f"data.pkl holds a malformed storage reference {str(pid)[:80]!r}")
        return _Storage(str(pid[2]), pid[1].dtype, pid[4])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _geometry_problem(t: _Tensor) -> str | None:
    """Why the view (offset, size, stride) cannot be taken of its storage, or None: every element must lie inside
    the storage and no two elements may share one (stride 0 or aliasing strides would let a tiny storage stand
    for a tensor of any size)."""
    if not isinstance(t.storage, _Storage):
        return "its data is not a storage"
    size, stride = t.size, t.stride
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        return f"malformed sizes {size!r} / strides {stride!r}"
    if not all(_is_int(v) and v >= 0 for v in (t.offset, *size, *stride)):
        return f"negative or non-integer offset {t.offset!r}, sizes {size} or strides {stride}"
    if math.prod(size) == 0:
        return None
    last = t.offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= t.storage.numel:
        return (f"offset {t.offset}, sizes {size} and strides {stride} reach element {last} of a storage of "
                f"{t.storage.numel} elements (out of bounds)")
    reach = 0
    for n, s in sorted(((n, s) for n, s in zip(size, stride) if n > 1), key=lambda p: p[1]):
        if s <= reach:
            return f"strides {stride} for sizes {size} overlap (a broadcast or aliased view); save a contiguous copy"
        reach += (n - 1) * s
    return None


def _member_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data: after its local header (whose extra field may differ)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise UserError(f"'{path}' is a damaged zip (no local header for {info.filename})")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _read_pickle(path: Path) -> tuple[Any, dict[str, zipfile.ZipInfo], str]:
    """The unpickled data.pkl (no data read), the zip's members and their root folder."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = {i.filename: i for i in archive.infolist()}
            pickles = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pickles) != 1:
                raise UserError(f"'{path}' holds no single data.pkl; it is not a torch.save file")
            with archive.open(pickles[0]) as f:
                state = _Unpickler(f).load()
    except UserError as err:
        raise UserError(f"'{path}': {err}") from None
    except _PICKLE_ERRORS as err:
        raise UserError(f"'{path}' holds no readable state dict: data.pkl is malformed ({type(err).__name__}: {err})") from None
    return state, infos, pickles[0][: -len("data.pkl")]


def load_torch_file(path: str | Path) -> dict[str, np.ndarray]:
    """name -> memory-mapped array of a `torch.save`d state dict, every tensor's geometry checked first."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"'{path}' is not a PyTorch zip checkpoint (legacy pre-1.6 format?); re-save it with torch.save")
    state, infos, root = _read_pickle(path)
    if not isinstance(state, dict):
        raise UserError(f"'{path}' holds a {type(state).__name__}, not a state dict of tensors")
    maps: dict[str, np.ndarray] = {}

    def storage(s: _Storage, name: str) -> np.ndarray:
        if s.key not in maps:
            info = infos.get(f"{root}data/{s.key}")
            if info is None:
                raise UserError(f"tensor '{name}' in '{path}' refers to storage '{s.key}', which the zip does not hold")
            if info.compress_type != zipfile.ZIP_STORED:
                raise UserError(f"'{path}' stores tensor data compressed; re-save it with torch.save")
            if s.numel * s.dtype.itemsize > info.file_size:
                raise UserError(f"tensor '{name}' in '{path}': storage '{s.key}' of {s.numel} {s.dtype} elements needs "
                                f"{s.numel * s.dtype.itemsize} bytes but its zip member holds {info.file_size}")
            maps[s.key] = map_range(path, s.dtype, _member_offset(path, info), s.numel, f"storage '{s.key}'")
        return maps[s.key]

    out = {}
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, _Tensor):
            raise UserError(f"'{path}' entry {str(name)[:80]!r} is a {type(tensor).__name__}, not a tensor")
        problem = _geometry_problem(tensor)
        if problem:
            raise UserError(f"tensor '{name}' in '{path}': {problem}")
        out[name] = _view(storage(tensor.storage, name), tensor)
    return out


def _view(storage: np.ndarray, t: _Tensor) -> np.ndarray:
    """The checked tensor as a read-only view of its storage (element strides -> byte strides)."""
    if not t.size:
        return storage[t.offset:t.offset + 1].reshape(())
    item = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(storage[t.offset:], shape=t.size, strides=tuple(s * item for s in t.stride),
                                           writeable=False)
