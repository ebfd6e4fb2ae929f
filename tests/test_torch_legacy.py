import os
import pickle
import re
import struct

import numpy as np
import pytest

from transferkit.models.efficientnet_lite import pretrained_weights_file
from transferkit.errors import TransferkitError
from transferkit.models.torch_legacy import _MAGIC_NUMBER, UnsafePickleError, load_legacy_state_dict


def test_reads_the_shipped_lite0_state_dict():
    state = load_legacy_state_dict(pretrained_weights_file("efficientnet_lite0"))
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_fc.weight"].dtype == np.float32
    assert np.isfinite(state["_fc.weight"]).all() and state["_fc.weight"].std() > 0.01
    assert state["_bn0.num_batches_tracked"].dtype == np.int64


class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _legacy_file(path, payload):
    with open(path, "wb") as f:
        for obj in (_MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        f.write(payload)


def test_refuses_a_planted_global_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    planted = _Planted()
    planted.marker = marker
    _Planted.marker = marker
    bad = tmp_path / "bad.pth"
    _legacy_file(bad, pickle.dumps({"w": planted}, protocol=2))
    with pytest.raises(UnsafePickleError, match="refused to load global 'posix.system'|refused to load global 'os.system'"):
        load_legacy_state_dict(str(bad))
    assert not marker.exists()


def test_bad_magic_and_zip_format_are_clear_errors(tmp_path):
    wrong = tmp_path / "wrong.pth"
    with open(wrong, "wb") as f:
        pickle.dump(12345, f, protocol=2)
    with pytest.raises(TransferkitError, match="bad magic number"):
        load_legacy_state_dict(str(wrong))
    zipped = tmp_path / "zipped.pth"
    zipped.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(TransferkitError, match="zip format"):
        load_legacy_state_dict(str(zipped))


def test_truncated_storage_is_detected(tmp_path):
    src = pretrained_weights_file("efficientnet_lite0")
    data = open(src, "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TransferkitError, match="truncated"):
        load_legacy_state_dict(str(cut))


# --- a small legacy file written opcode by opcode (torch is not needed, and every field is a fixed-width int32) ---

_STORAGE_TYPES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _op_int(n):
    return b"J" + struct.pack("<i", n)  # BININT: fixed width, so a test can find and edit any count


def _op_str(s):
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _op_tuple(items):
    return b"(" + b"".join(items) + b"t"


def _op_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _op_ordered_dict():
    return _op_global("collections", "OrderedDict") + b")R"


def _tensor_op(key, storage_type, storage_size, offset, shape, stride):
    pid = _op_tuple([_op_str("storage"), _op_global("torch", storage_type), _op_str(key), _op_str("cpu"),
                     _op_int(storage_size), b"N"])
    args = [pid + b"Q", _op_int(offset), _op_tuple(map(_op_int, shape)), _op_tuple(map(_op_int, stride)), b"\x89",
            _op_ordered_dict()]
    return _op_global("torch._utils", "_rebuild_tensor_v2") + _op_tuple(args) + b"R"


def legacy_bytes(tensors, metadata=True):
    """A legacy ``.pth`` as torch < 1.6 writes it: ``tensors`` is ``[(name, key, array, offset, shape, stride)]``;
    tensors naming the same key share that storage (its array is written once). The state dict carries torch's
    ``_metadata`` (set by the pickle's one BUILD) unless ``metadata`` is False."""
    storages = {}
    for _, key, array, *_ in tensors:
        storages.setdefault(key, np.ascontiguousarray(array).ravel())
    items = [_op_str(name) + _tensor_op(key, _STORAGE_TYPES[storages[key].dtype], storages[key].size, off, shape, st)
             for name, key, _, off, shape, st in tensors]
    state = b"\x80\x02" + _op_ordered_dict() + b"(" + b"".join(items) + b"u"
    if metadata:
        state += b"}" + _op_str("_metadata") + _op_ordered_dict() + b"s" + b"b"  # what torch writes: BUILD
    out = bytearray()
    for obj in (_MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True}):
        out += pickle.dumps(obj, protocol=2)
    out += state + b"."
    out += pickle.dumps(list(storages), protocol=2)
    for array in storages.values():
        out += struct.pack("<q", array.size) + array.astype(array.dtype.newbyteorder("<")).tobytes()
    return bytes(out)


def small_weights():
    """The tensors of a tiny legacy file: a 2x3 weight, a transposed view of it, a bias and a counter."""
    w = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    b = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    n = np.array([7], dtype=np.int64)
    tensors = [("fc.weight", "100", w, 0, (2, 3), (3, 1)), ("fc.weight_t", "100", w, 0, (3, 2), (1, 3)),
               ("fc.bias", "101", b, 0, (3,), (1,)), ("bn.num_batches_tracked", "102", n, 0, (), ())]
    expected = {"fc.weight": w, "fc.weight_t": w.T, "fc.bias": b, "bn.num_batches_tracked": n.reshape(())}
    return tensors, expected


def _write(tmp_path, data, name="w.pth"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_reads_a_small_legacy_file_written_like_torch(tmp_path):
    tensors, expected = small_weights()
    state = load_legacy_state_dict(_write(tmp_path, legacy_bytes(tensors)))
    assert list(state) == list(expected)
    for name, array in expected.items():
        assert state[name].dtype == array.dtype and np.array_equal(state[name], array), name


def test_a_tensor_claiming_more_than_its_storage_is_refused_not_read_from_the_heap(tmp_path):
    two = np.array([1.0, 2.0], dtype=np.float32)
    leaky = legacy_bytes([("w", "0", two, 0, (4096,), (1,))])
    with pytest.raises(TransferkitError, match=r"w\.pth: .*beyond its storage of 2 elements"):
        load_legacy_state_dict(_write(tmp_path, leaky))


@pytest.mark.parametrize(
    "offset, shape, stride, reason",
    [
        (0, (2,), (-1,), "negative or non-integer tensor stride"),
        (2, (2,), (-1,), "negative or non-integer tensor stride"),
        (5, (1,), (1,), "storage offset 5 is beyond its storage of 4 elements"),
        (4, (1,), (1,), "storage offset 4 is beyond its storage of 4 elements"),
        (3, (2,), (1,), "a tensor reaches element 4, beyond its storage of 4 elements"),
        (0, (2, 2), (0, 1), "zero stride"),
        (0, (-2,), (1,), "negative or non-integer tensor shape"),
        (0, (2, 2, 2), (1, 1, 1), "more elements than its storage"),
        (0, (2,), (1, 1), "shape and stride"),
        (-1, (1,), (1,), "negative or non-integer tensor storage offset"),
    ],
)
def test_impossible_views_are_refused(tmp_path, offset, shape, stride, reason):
    four = np.arange(4, dtype=np.float32)
    with pytest.raises(TransferkitError, match=re.escape(reason)):
        load_legacy_state_dict(_write(tmp_path, legacy_bytes([("w", "0", four, offset, shape, stride)])))


def test_build_on_anything_but_the_metadata_of_a_state_dict_is_refused(tmp_path):
    tensors, _ = small_weights()
    data = legacy_bytes(tensors, metadata=False)
    state_end = data.index(b"u.") + 1
    # BUILD on a rebuilt tensor's storage type, as an attacker would to overwrite the reader's own objects
    planted = _op_global("torch", "FloatStorage") + b"}" + _op_str("name") + _op_str("Evil") + b"sb0"
    with pytest.raises(UnsafePickleError, match=r"refused BUILD \(setting state\) on"):
        load_legacy_state_dict(_write(tmp_path, data[:state_end] + planted + data[state_end:]))
    extra_state = b"}" + _op_str("size") + _op_int(10**6) + b"s" + b"b"
    with pytest.raises(UnsafePickleError, match=r"refused BUILD \(setting state\) on"):
        load_legacy_state_dict(_write(tmp_path, data[:state_end] + extra_state + data[state_end:], "b.pth"))


def test_storage_count_must_match_and_be_backed_by_the_file(tmp_path):
    two = np.array([1.0, 2.0], dtype=np.float32)
    data = legacy_bytes([("w", "0", two, 0, (2,), (1,))])
    count_at = len(data) - 8 - 8
    bigger = data[:count_at] + struct.pack("<q", 3) + data[count_at + 8 :]
    with pytest.raises(TransferkitError, match="storage '0' holds 2 elements but its data says 3"):
        load_legacy_state_dict(_write(tmp_path, bigger))
    huge = legacy_bytes([("w", "0", two, 0, (2,), (1,))]).replace(_op_int(2) + b"N", _op_int(2**31 - 1) + b"N", 1)
    with pytest.raises(TransferkitError, match="larger than the whole file"):
        load_legacy_state_dict(_write(tmp_path, huge, "huge.pth"))


def test_every_failure_is_one_transferkit_error_line(tmp_path):
    deep = b"".join(pickle.dumps(o, protocol=2) for o in (_MAGIC_NUMBER, 1001, {"little_endian": True}))
    deep += b"\x80\x02}" + b"K\x00" + b"\x85" * 200_000 + b"K\x01s."  # a dict key nested 200,000 tuples deep
    cases = {
        "missing.pth": None,
        "empty.pth": b"",
        "deep.pth": deep,
        "garbage.pth": b"\x80\x02\xff\xfe",
        "utf8.pth": pickle.dumps(_MAGIC_NUMBER, protocol=2) + b"\x80\x02X\x02\x00\x00\x00\xff\xfe.",
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(TransferkitError) as info:
            load_legacy_state_dict(str(path))
        message = str(info.value)
        assert type(info.value) in (TransferkitError, UnsafePickleError), name
        assert message.startswith(str(path) + ": ") and len(message.splitlines()) == 1, message
        assert info.value.__cause__ is None and info.value.__suppress_context__, name


def test_names_sharing_a_view_share_one_array_and_views_cannot_outgrow_the_file(tmp_path):
    w = np.arange(256, dtype=np.float32)
    tied = legacy_bytes([("embed", "0", w, 0, (16, 16), (16, 1)), ("head", "0", w, 0, (16, 16), (16, 1))])
    state = load_legacy_state_dict(_write(tmp_path, tied))
    assert state["embed"] is state["head"] and np.array_equal(state["head"], w.reshape(16, 16))
    overlapping = legacy_bytes([(f"w{i}", "0", w, i, (256 - i,), (1,)) for i in range(40)])
    with pytest.raises(TransferkitError, match="views add up to more data than the file holds"):
        load_legacy_state_dict(_write(tmp_path, overlapping, "overlap.pth"))


def test_a_pickle_may_not_run_more_opcodes_than_the_bound(tmp_path, monkeypatch):
    from transferkit.models import torch_legacy

    tensors, _ = small_weights()
    path = _write(tmp_path, legacy_bytes(tensors))
    monkeypatch.setattr(torch_legacy, "_MAX_OPCODES", 50)
    with pytest.raises(TransferkitError, match="runs over 50 opcodes"):
        load_legacy_state_dict(path)


def test_a_call_on_anything_but_the_tensor_and_ordered_dict_rebuilders_is_refused(tmp_path):
    tensors, _ = small_weights()
    data = legacy_bytes(tensors, metadata=False)
    state_end = data.index(b"u.") + 1
    planted = _op_global("torch", "FloatStorage") + b")R0"  # REDUCE on a storage type
    with pytest.raises(UnsafePickleError, match=r"refused REDUCE \(a call\) on _StorageType"):
        load_legacy_state_dict(_write(tmp_path, data[:state_end] + planted + data[state_end:]))
