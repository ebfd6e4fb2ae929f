"""Fuzz the legacy ``.pth`` reader: a small legacy file, mutated a few thousand times with a seeded RNG, must give
either one clean ``TransferkitError`` line or exactly the tensors the mutated file describes, each within the
storage the file holds. The tensors it describes come from an independent, element-by-element reference decoder."""

import collections
import io
import pickle
import pickletools
import random
import struct
import time

import numpy as np
import pytest

from test_torch_legacy import legacy_bytes, small_weights
from transferkit.errors import TransferkitError
from transferkit.models.torch_legacy import UnsafePickleError, load_legacy_state_dict

CASES = 3000
SEED = 20240611
_DTYPES = {"FloatStorage": np.dtype("<f4"), "LongStorage": np.dtype("<i8")}
_INSERTS = [
    b"b", b"R", b"0", b"2", b".", b"N", b"\x85", b"\x81", b"}b", b")b", b"(tb", b"h\x00", b"q\x07", b"\x94",
    b"r\xff\xff\xff\x7f", b"cos\nsystem\n", b"cbuiltins\neval\n", b"c__builtin__\ngetattr\n", b"ios\nsystem\n",
    b"ctorch\nFloatStorage\n", b"ccollections\nOrderedDict\n)R", b"ctorch._utils\n_rebuild_tensor\n",
    b"\x8c\x02os\x8c\x06system\x93", b"X\x03\x00\x00\x00abcX\x03\x00\x00\x00defs", b"K\x01\x85" * 50,
]
_INTS = [-(2**31), -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1000, 2**31 - 1]


def _reference(data):
    """(state, storages) as the file describes them, decoded by a plain unpickler and indexing; only used on
    files the reader accepted, so it needs no defences of its own. A tensor is (storage key, offset, shape, stride)."""
    dtypes = {}

    class Reference(pickle._Unpickler):  # the Python one: its memo is a dict, a huge memo index costs nothing
        def find_class(self, module, name):
            if name == "OrderedDict":
                return collections.OrderedDict
            if name.startswith("_rebuild_tensor"):
                return lambda storage, offset, shape, stride, *rest: (storage, offset, tuple(shape), tuple(stride))
            return name

        def persistent_load(self, pid):
            dtypes[pid[2]] = _DTYPES[pid[1]]
            return pid[2]

    stream = io.BytesIO(data)
    state, keys = [Reference(stream).load() for _ in range(5)][3:]
    storages, pos = {}, stream.tell()
    for key in keys:
        (count,) = struct.unpack_from("<q", data, pos)
        storages[key] = np.frombuffer(data, dtype=dtypes[key], count=count, offset=pos + 8)
        pos += 8 + storages[key].nbytes
    return state, storages


def _expected(view, storages, label):
    """The view's values read element by element; every element must lie inside the storage the file holds."""
    key, offset, shape, stride = view
    storage = storages[key]
    indices = [offset + sum(i * s for i, s in zip(index, stride)) for index in np.ndindex(*shape)]
    assert all(0 <= i < storage.size for i in indices), (label, "the reader returned a view beyond its storage", view)
    return storage[indices].reshape(shape)


def _opcodes(data):
    """[(pickle index, position, opcode name)] for the five pickles, and where the storages' bytes start."""
    stream, found = io.BytesIO(data), []
    for index in range(5):
        for op, _arg, pos in pickletools.genops(stream):
            found.append((index, pos, op.name))
    return found, stream.tell()


class _Base:
    """The small legacy file, where its opcodes and storage counts are, and what it decodes to."""

    def __init__(self):
        tensors, self.original = small_weights()
        self.data = legacy_bytes(tensors)
        self.opcodes, data_start = _opcodes(self.data)
        self.state, self.storages = _reference(self.data)
        self.ints = [pos + 1 for index, pos, name in self.opcodes if index == 3 and name == "BININT"]
        self.counts = [data_start]
        for storage in list(self.storages.values())[:-1]:
            self.counts.append(self.counts[-1] + 8 + storage.nbytes)


def _mutate(rng, base):
    kind = rng.choice(["flip", "truncate", "int", "count", "insert", "delete"])
    data = bytearray(base.data)
    if kind == "flip":
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(len(data)) :]
    elif kind == "int":  # a storage size, offset, shape or stride entry (each a BININT in the state pickle)
        pos = rng.choice(base.ints)
        data[pos : pos + 4] = struct.pack("<i", rng.choice(_INTS + [rng.randint(-(2**31), 2**31 - 1)]))
    elif kind == "count":  # a storage's int64 element count, before its bytes
        pos = rng.choice(base.counts)
        data[pos : pos + 8] = struct.pack("<q", rng.choice(_INTS + [2**62, -(2**63), rng.getrandbits(63)]))
    elif kind == "insert":  # at an opcode boundary of any of the five pickles
        pos = rng.choice(base.opcodes)[1]
        data[pos:pos] = rng.choice(_INSERTS)
    else:
        pos = rng.randrange(len(data))
        del data[pos : pos + rng.randint(1, 6)]
    return kind, bytes(data)


def _load(path, data, label):
    """The reader's state dict, or None after checking its refusal is one clean TransferkitError line."""
    path.write_bytes(data)
    try:
        return load_legacy_state_dict(str(path))
    except TransferkitError as exc:
        message = str(exc)
        assert type(exc) in (TransferkitError, UnsafePickleError), (label, type(exc))
        assert message.startswith(f"{path}: ") and len(message.splitlines()) == 1, (label, message)
        assert exc.__cause__ is None and exc.__suppress_context__, label
    except Exception as exc:  # noqa: BLE001 - the failure this test hunts for
        pytest.fail(f"{label}: {type(exc).__name__} escaped the reader: {exc}")
    return None


def _check_accepted(state, data, base, label):
    """The reader's tensors are exactly those the reference decodes, within their storage; and where the view and
    the storage's bytes are the original ones, the values are the original ones."""
    ref_state, storages = _reference(data)
    assert list(state) == list(ref_state), label
    for name, array in state.items():
        view = ref_state[name]
        expected = _expected(view, storages, label)
        assert array.dtype == expected.dtype and array.shape == expected.shape, (label, name)
        assert array.tobytes() == expected.tobytes(), (label, name)
        assert array.nbytes <= storages[view[0]].nbytes, (label, name, array.nbytes)
        key = view[0]
        if view == base.state.get(name) and storages[key].tobytes() == base.storages[key].tobytes():
            assert array.tobytes() == base.original[name].tobytes(), (label, name)


def test_mutated_legacy_files_give_a_clean_error_or_exactly_what_they_describe(tmp_path):
    base, rng, outcomes = _Base(), random.Random(SEED), collections.Counter()
    started = time.perf_counter()
    for case in range(CASES):
        kind, data = _mutate(rng, base)
        label = f"case {case} ({kind}, seed {SEED})"
        state = _load(tmp_path / "fuzz.pth", data, label)
        if state is not None:
            _check_accepted(state, data, base, label)
        outcomes[f"{kind} {'refused' if state is None else 'read'}"] += 1
    elapsed = time.perf_counter() - started
    print(f"{CASES} mutated files in {elapsed:.1f} s: {dict(sorted(outcomes.items()))}")
    assert outcomes["insert refused"] and outcomes["int read"] and outcomes["int refused"] and outcomes["count refused"]


def test_the_file_cut_at_every_offset_is_refused(tmp_path):
    base = _Base()
    for cut in range(len(base.data)):
        assert _load(tmp_path / "cut.pth", base.data[:cut], f"cut at {cut}") is None, cut
