import os
import pickle

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
