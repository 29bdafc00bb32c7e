"""Reads a PyTorch `torch.save` file (the zip format, PyTorch >= 1.6) without importing torch.

The zip holds `<root>/data.pkl` (a pickle whose tensors refer to storages by key) and one
uncompressed member `<root>/data/<key>` per storage. Each storage becomes a read-only NumPy
memory map of the file, so a 13 GB state dict costs no memory until a tensor is read.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from mtp_jax.errors import UserError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    """A view of the storage with the tensor's offset, shape and strides (element units)."""
    if not size:
        return storage[offset:offset + 1].reshape(())
    item = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride), writeable=False
    )


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


class _Unpickler(pickle.Unpickler):
    """Resolves exactly the globals a state dict uses; anything else is refused (no code runs)."""

    def __init__(self, file: Any, storages: Any):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"unsupported object {module}.{name} in a PyTorch checkpoint")

    def persistent_load(self, pid: Any) -> np.ndarray:
        _, storage_type, key, _location, numel = pid
        return self._storages(str(key), storage_type.dtype, int(numel))


def _member_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data: after its local header (whose extra field may differ)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def load_torch_file(path: str | Path) -> dict[str, np.ndarray]:
    """name -> memory-mapped array of a `torch.save`d state dict."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"'{path}' is not a PyTorch zip checkpoint (legacy pre-1.6 format?); re-save it with torch.save")
    with zipfile.ZipFile(path) as archive:
        infos = {i.filename: i for i in archive.infolist()}
        pickles = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise UserError(f"'{path}' holds no single data.pkl; it is not a torch.save file")
        root = pickles[0][: -len("data.pkl")]

        def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            info = infos[f"{root}data/{key}"]
            if info.compress_type != zipfile.ZIP_STORED:
                raise UserError(f"'{path}' stores tensor data compressed; re-save it with torch.save")
            return np.memmap(path, dtype=dtype, mode="r", offset=_member_offset(path, info), shape=(numel,))

        with archive.open(pickles[0]) as f:
            state = _Unpickler(f, storage).load()
    if not isinstance(state, dict):
        raise UserError(f"'{path}' holds a {type(state).__name__}, not a state dict of tensors")
    return dict(state)
