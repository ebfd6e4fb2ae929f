"""Read PyTorch's legacy (pre-1.6, non-zip) ``.pth`` state dicts without torch, without running pickled code, and
without trusting any number in the file.

The legacy format is a sequence of pickles (magic number, protocol version, system info, the state dict whose
tensors point at storages through persistent ids, the list of storage keys) followed by each storage's raw
little-endian bytes, each prefixed by its element count as int64.

Why every number is checked: a tensor is a (storage, offset, shape, stride) view and numpy's ``as_strided`` checks
nothing, so a file whose tensor claims 4,096 floats over a 2-float storage would copy the process heap into the
"weights"; a count or a nesting the file cannot back would size an allocation or crash the interpreter. Hence:

* the unpickler runs an allow-list of opcodes (plain data, memo, GLOBAL, BINPERSID; a bounded number of them),
  resolves only the globals that rebuild tensors and calls (REDUCE) nothing else, so a planted ``os.system`` never
  runs; dict keys must be strings (a deeply nested key would crash ``hash``); BUILD sets state on nothing: the one
  BUILD a real state dict carries, torch's ``_metadata`` on the OrderedDict, is dropped, and any other is refused;
* each storage's element count must fit in the file, match its data's count and be backed by the bytes left;
* each tensor's offset, shape and stride must stay inside its storage (no negative sizes or strides, a zero stride
  only on a dimension of size 1, no more elements than the storage holds), and the copies made stay within the
  file's size (names that share a view share one array, as in torch);
* every failure, of whatever type, becomes one ``TransferkitError`` line naming the file and the reason.
"""

from __future__ import annotations

import collections
import logging
import math
import pickle
import pickletools
import struct
from io import BytesIO
from pathlib import Path

import numpy as np

from transferkit.errors import TransferkitError

LOG = logging.getLogger("transferkit")

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001
_MAX_OPCODES = 1 << 22  # per pickle: ~100,000 tensors; bounds the objects a small file can make the reader build
_MAX_DIMS = 32
_STORAGE_DTYPES = {
    name: np.dtype(dtype).newbyteorder("<")
    for name, dtype in {
        "FloatStorage": np.float32,
        "DoubleStorage": np.float64,
        "HalfStorage": np.float16,
        "LongStorage": np.int64,
        "IntStorage": np.int32,
        "ShortStorage": np.int16,
        "CharStorage": np.int8,
        "ByteStorage": np.uint8,
        "BoolStorage": np.bool_,
    }.items()
}
# Opcodes that only build plain data (numbers, strings, tuples, lists) or resolve globals through find_class;
# SETITEM(S), REDUCE and BUILD are checked by _RestrictedUnpickler itself; every other opcode is refused.
_DATA_OPCODES = (
    "PROTO FRAME STOP MARK NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 BINFLOAT BINUNICODE SHORT_BINUNICODE "
    "BINSTRING SHORT_BINSTRING EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST APPEND APPENDS EMPTY_DICT BINPUT "
    "LONG_BINPUT MEMOIZE BINGET LONG_BINGET GLOBAL STACK_GLOBAL BINPERSID"
).split()


class UnsafePickleError(TransferkitError):
    """A weights file asked to load a Python object other than a tensor, or to set state on one: refused."""


class _Refused(Exception):
    """Internal: the file asks for something this reader never does (becomes UnsafePickleError)."""


class _Corrupt(Exception):
    """Internal: the file contradicts its format or itself (becomes TransferkitError)."""


class _Storage:
    """A storage named in the pickle; its bytes are read after the pickles."""

    def __init__(self, dtype: np.dtype, size: int):
        self.dtype, self.size = dtype, size
        self.array: np.ndarray | None = None


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _TensorRef:
    """A tensor view on a storage, checked against the storage's size when made; copied out once the bytes are read."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def materialise(self) -> np.ndarray:
        itemsize = self.storage.dtype.itemsize
        strides = tuple(s * itemsize if d > 1 else 0 for d, s in zip(self.shape, self.stride))
        view = np.lib.stride_tricks.as_strided(
            self.storage.array[self.offset :], shape=self.shape, strides=strides, writeable=False
        )
        return np.array(view)  # own the memory; no view into the file's bytes survives


def _ints(values, what: str, max_len: int = _MAX_DIMS) -> tuple:
    if type(values) not in (tuple, list) or len(values) > max_len:
        raise _Corrupt(f"tensor {what} is not a short tuple of integers")
    if not all(type(v) is int and v >= 0 for v in values):
        raise _Corrupt(f"negative or non-integer tensor {what}")
    return tuple(values)


def _check_view(size: int, offset: int, shape: tuple, stride: tuple) -> None:
    """Refuse a view that would reach outside its storage of ``size`` elements, or need more elements than it."""
    if len(shape) != len(stride):
        raise _Corrupt(f"tensor shape and stride differ in length ({len(shape)} and {len(stride)})")
    if any(s == 0 and d > 1 for d, s in zip(shape, stride)):
        raise _Corrupt("a zero stride on a tensor dimension of size > 1")
    numel = math.prod(shape)
    if offset > size or (numel and offset >= size):
        raise _Corrupt(f"storage offset {offset} is beyond its storage of {size} elements")
    last = offset + sum((d - 1) * s for d, s in zip(shape, stride) if d > 1)
    if numel and last >= size:
        raise _Corrupt(f"a tensor reaches element {last}, beyond its storage of {size} elements")
    if numel > size:
        raise _Corrupt(f"a tensor of {numel} elements has more elements than its storage ({size})")


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    """torch._utils._rebuild_tensor(_v2); the extra arguments (requires_grad, hooks, metadata) are ignored."""
    if not isinstance(storage, _Storage) or len(rest) > 3:
        raise _Corrupt("a tensor is not rebuilt from one storage")
    (offset,), shape, stride = _ints((storage_offset,), "storage offset"), _ints(size, "shape"), _ints(stride, "stride")
    _check_view(storage.size, offset, shape, stride)
    return _TensorRef(storage, offset, shape, stride)


def _ordered_dict(items=()):
    """collections.OrderedDict, from nothing (what torch writes) or a list of (string, value) pairs (Python 2)."""
    if type(items) not in (tuple, list) or not all(
        type(p) in (tuple, list) and len(p) == 2 and type(p[0]) is str for p in items
    ):
        raise _Corrupt("an OrderedDict built from something other than (name, value) pairs")
    return collections.OrderedDict(items)


def _refuser(name: str):
    def refuse(self):
        raise _Refused(f"refused pickle opcode {name} (only tensor data is allowed in a weights file)")

    return refuse


def _counted(load):
    def run(self):
        self.opcodes_left -= 1
        if self.opcodes_left < 0:
            raise _Corrupt(f"a pickle in the file runs over {_MAX_OPCODES} opcodes")
        load(self)

    return run


class _RestrictedUnpickler(pickle._Unpickler):  # the Python unpickler: its opcode table can be narrowed
    """Unpickler that builds only plain data and tensor references; see the module docstring."""

    def __init__(self, file: BytesIO, storages: dict, max_bytes: int):
        super().__init__(file)
        self._storages, self._max_bytes = storages, max_bytes
        self.opcodes_left = _MAX_OPCODES

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return _ordered_dict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise _Refused(f"refused to load global '{module}.{name}' (only tensor data is allowed in a weights file)")

    def persistent_load(self, pid):
        if type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] != "storage":
            raise _Corrupt("a persistent id that is not a storage")
        _, storage_type, key, _location, size = pid[:5]
        if len(pid) == 6 and pid[5] is not None:
            raise _Corrupt("storage views (files from torch before 0.4) are not supported")
        if not isinstance(storage_type, _StorageType) or type(key) is not str or type(size) is not int:
            raise _Corrupt("a malformed storage reference")
        dtype = _STORAGE_DTYPES[storage_type.name]
        if not 0 <= size * dtype.itemsize <= self._max_bytes:
            raise _Corrupt(f"storage '{key}' claims {size} elements: negative, or larger than the whole file")
        storage = self._storages.setdefault(key, _Storage(dtype, size))
        if storage.dtype != dtype or storage.size != size:
            raise _Corrupt(f"storage '{key}' is described with two different types or sizes")
        return storage

    def _set_items(self, items: list) -> None:
        target = self.stack[-1]
        if type(target) not in (dict, collections.OrderedDict) or any(type(k) is not str for k in items[::2]):
            raise _Corrupt("a dict item with a non-string key, or set on something that is not a dict")
        target.update(zip(items[::2], items[1::2]))

    def _load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._set_items([key, value])

    def _load_setitems(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise _Corrupt("SETITEMS with a key and no value")
        self._set_items(items)

    def _load_reduce(self):
        args, func = self.stack.pop(), self.stack[-1]
        if (func is not _rebuild_tensor and func is not _ordered_dict) or type(args) is not tuple:
            raise _Refused(f"refused REDUCE (a call) on {type(func).__name__}, not a tensor or an OrderedDict")
        self.stack[-1] = func(*args)

    def _load_build(self):
        state, target = self.stack.pop(), self.stack[-1]
        if type(target) is not collections.OrderedDict or type(state) is not dict or set(state) - {"_metadata"}:
            raise _Refused(f"refused BUILD (setting state) on {type(target).__name__}")
        # torch's per-module version numbers: no tensor data, dropped rather than set


def _dispatch_table(checked: dict) -> dict:
    """The Python unpickler's opcode table narrowed to _DATA_OPCODES and ``checked``; every opcode counted."""
    table = {code: _refuser(f"0x{code:02x}") for code in range(256)}
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")[0]
        table[code] = pickle._Unpickler.dispatch[code] if op.name in _DATA_OPCODES else _refuser(op.name)
    table.update(checked)
    return {code: _counted(load) for code, load in table.items()}


_RestrictedUnpickler.dispatch = _dispatch_table(
    {
        pickle.SETITEM[0]: _RestrictedUnpickler._load_setitem,
        pickle.SETITEMS[0]: _RestrictedUnpickler._load_setitems,
        pickle.REDUCE[0]: _RestrictedUnpickler._load_reduce,
        pickle.BUILD[0]: _RestrictedUnpickler._load_build,
    }
)


def _read_pickles(stream: BytesIO, storages: dict, max_bytes: int) -> tuple:
    """The header pickles, checked; returns (state dict, storage keys)."""

    def next_pickle():
        return _RestrictedUnpickler(stream, storages, max_bytes).load()

    magic = next_pickle()
    if type(magic) is not int or magic != _MAGIC_NUMBER:
        raise _Corrupt("not a PyTorch legacy weights file (bad magic number)")
    version = next_pickle()
    if type(version) is not int or version != _PROTOCOL_VERSION:
        raise _Corrupt(f"unsupported legacy format version (expected {_PROTOCOL_VERSION})")
    sys_info = next_pickle()
    if type(sys_info) is not dict or sys_info.get("little_endian", True) is not True:
        raise _Corrupt("big-endian or undescribed weights files are not supported")
    return next_pickle(), next_pickle()


def _read_storages(data: bytes, pos: int, keys, storages: dict) -> None:
    """Attach each storage's bytes (a read-only view on ``data``), checking its count against the file."""
    if type(keys) is not list or not all(type(k) is str for k in keys) or len(set(keys)) != len(keys):
        raise _Corrupt("the list of storage keys is malformed")
    if set(keys) != set(storages):
        raise _Corrupt("the storages listed do not match those the tensors use")
    for key in keys:
        storage = storages[key]
        if pos + 8 > len(data):
            raise _Corrupt("weights file is truncated")
        (count,) = struct.unpack_from("<q", data, pos)
        if count != storage.size:
            raise _Corrupt(f"storage '{key}' holds {storage.size} elements but its data says {count}")
        pos += 8
        if pos + count * storage.dtype.itemsize > len(data):
            raise _Corrupt("weights file is truncated")
        storage.array = np.frombuffer(data, dtype=storage.dtype, count=count, offset=pos)
        pos += count * storage.dtype.itemsize


def _materialise(state, budget: int) -> collections.OrderedDict:
    """``{name: array}``: copies of the tensor views (one per distinct view, within ``budget`` bytes) or numbers."""
    if type(state) not in (dict, collections.OrderedDict):
        raise _Corrupt(f"expected a state dict, found {type(state).__name__}")
    out, copies = collections.OrderedDict(), {}
    for name, value in state.items():
        if isinstance(value, _TensorRef):
            view = (id(value.storage), value.offset, value.shape, value.stride)
            if view not in copies:
                budget -= math.prod(value.shape) * value.storage.dtype.itemsize
                if budget < 0:
                    raise _Corrupt("the tensors' views add up to more data than the file holds")
                copies[view] = value.materialise()
            out[name] = copies[view]
        elif type(value) in (int, float, bool) and np.asarray(value).dtype.kind in "biuf":
            out[name] = np.asarray(value)
        else:
            raise _Corrupt(f"state dict entry '{name}' is a {type(value).__name__}, not a tensor or a number")
    return out


def _load(path: str) -> collections.OrderedDict:
    data = Path(path).read_bytes()  # all of it: every read below is bounded by what the file really holds
    if data[:2] == b"PK":
        raise _Corrupt("this is torch's zip format, not the legacy format this reader handles")
    stream, storages = BytesIO(data), {}
    state, keys = _read_pickles(stream, storages, len(data))
    _read_storages(data, stream.tell(), keys, storages)
    weights = _materialise(state, len(data))
    LOG.debug("%s: %d tensors from %d storages", path, len(weights), len(storages))
    return weights


def _error(cls: type, source: str, reason: str) -> TransferkitError:
    """``cls("<file>: <reason>")`` on one line, the reason cut short (it may quote a long name from the file)."""
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    return cls(" ".join(f"{source}: {reason}".splitlines()))


def load_legacy_state_dict(path: str) -> "collections.OrderedDict[str, np.ndarray]":
    """Return the ``{name: numpy array}`` state dict stored in a legacy-format ``.pth`` file.

    Any problem with the file, whatever raised it, is one ``TransferkitError`` (``UnsafePickleError`` for code or
    state the file asks to load) whose one-line message names the file and the reason."""
    source = str(path)
    try:
        return _load(source)
    except _Refused as exc:
        error = _error(UnsafePickleError, source, str(exc))
    except _Corrupt as exc:
        error = _error(TransferkitError, source, str(exc))
    except (EOFError, struct.error):
        error = _error(TransferkitError, source, "weights file is truncated or corrupt (it ends inside a pickle)")
    except OSError as exc:
        error = _error(TransferkitError, source, f"cannot read the weights file ({exc.strerror or exc})")
    except Exception as exc:  # a damaged or hostile file can raise anything (MemoryError too): the user gets one line
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        error = _error(TransferkitError, source, f"corrupt weights file ({reason})")
    raise error from None
