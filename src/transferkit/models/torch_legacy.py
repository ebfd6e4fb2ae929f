"""Read PyTorch's legacy (pre-1.6, non-zip) ``.pth`` state dicts without torch, and without running pickled code.

The legacy format is a sequence of pickles (magic number, protocol version, system info, the state dict whose
tensors point at storages through persistent ids, the list of storage keys) followed by each storage's raw
little-endian bytes, each prefixed by its element count as int64. The unpickler below accepts only the handful of
globals that rebuild tensors and refuses every other global, so a planted ``os.system`` never runs.
"""

from __future__ import annotations

import collections
import pickle
import struct
from typing import BinaryIO

import numpy as np

from transferkit.errors import TransferkitError

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(TransferkitError):
    """A weights file asked to load a Python object other than a tensor: refused."""


class _Storage:
    """A storage named in the pickle; its bytes are read after the pickles."""

    def __init__(self, dtype: type, size: int):
        self.dtype = np.dtype(dtype)
        self.size = size
        self.array: np.ndarray | None = None


class _TensorRef:
    """A tensor view on a storage, materialised once the storage bytes are known."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def materialise(self) -> np.ndarray:
        itemsize = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            self.storage.array[self.offset :],
            shape=self.shape,
            strides=tuple(s * itemsize for s in self.stride),
        )
        return np.array(view)  # own the memory; no view into the storage survives


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    return _TensorRef(storage, storage_offset, size, stride)


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-rebuild globals; anything else raises UnsafePickleError."""

    def __init__(self, file: BinaryIO, storages: dict, source: str):
        super().__init__(file)
        self._storages = storages
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(
            f"{self._source}: refused to load global '{module}.{name}' (only tensor data is allowed in a weights file)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self._source}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, size = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"{self._source}: persistent id names no known storage type")
        if key not in self._storages:
            self._storages[key] = _Storage(_STORAGE_DTYPES[storage_type.name], int(size))
        return self._storages[key]


def load_legacy_state_dict(path: str) -> "collections.OrderedDict[str, np.ndarray]":
    """Return the ``{name: numpy array}`` state dict stored in a legacy-format ``.pth`` file."""
    source = str(path)
    with open(path, "rb") as f:
        header = f.read(2)
        f.seek(0)
        if header[:2] == b"PK":
            raise TransferkitError(f"{source}: this is torch's zip format, not the legacy format this reader handles")
        storages: dict = {}

        def next_pickle():
            return _RestrictedUnpickler(f, storages, source).load()

        try:
            if next_pickle() != _MAGIC_NUMBER:
                raise TransferkitError(f"{source}: not a PyTorch legacy weights file (bad magic number)")
            next_pickle()  # protocol version
            sys_info = next_pickle()
            if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
                raise TransferkitError(f"{source}: big-endian weights files are not supported")
            state = next_pickle()
            keys = next_pickle()
        except TransferkitError:  # already one clear line (a refused global, a bad magic number): as it is
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise TransferkitError(f"{source}: corrupt weights file ({exc})") from None
        for key in keys:
            storage = storages[key]
            (count,) = struct.unpack("<q", f.read(8))
            nbytes = count * storage.dtype.itemsize
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise TransferkitError(f"{source}: weights file is truncated")
            storage.array = np.frombuffer(data, dtype=storage.dtype.newbyteorder("<"))
    if not isinstance(state, dict):
        raise TransferkitError(f"{source}: expected a state dict, found {type(state).__name__}")
    return collections.OrderedDict(
        (name, value.materialise() if isinstance(value, _TensorRef) else np.asarray(value)) for name, value in state.items()
    )
