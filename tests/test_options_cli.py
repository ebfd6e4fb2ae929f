"""Options of the smaller commands, each run as a real ``transferkit`` child and checked against a figure computed
here another way, so that the option being ignored fails the test: ``--version``, ``-v``, ``backbones --json``,
``card`` without ``--out``, ``compare --test-dir``, ``inspect --near-threshold`` and ``--backbone``, ``export
--quantize int8 --calibration``."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from children import run_cli
from conftest import CLASSES, IMAGE_SIZE, write_dataset


def _files(folder) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


def test_version_prints_the_package_version():
    from transferkit._version import __version__

    done = run_cli("--version")
    assert done.stdout.strip() == f"transferkit {__version__}"


def test_verbose_shows_debug_lines_the_default_output_lacks(tmp_path):
    """A legacy ``.pth`` weights file is read (a DEBUG record: its tensor and storage counts), then refused as
    lite0 weights: the run stops with one error line, before any training, with or without ``-v``."""
    from test_torch_legacy import legacy_bytes

    data = write_dataset(tmp_path / "data", 3, seed=31)
    weights = tmp_path / "tiny.pth"
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    weights.write_bytes(legacy_bytes([("only.weight", "0", w, 0, (2, 3), (3, 1))]))
    args = ("train", data, "--weights", weights, "--image-size", IMAGE_SIZE, "--out", tmp_path / "run")
    debug = re.compile(rf"^transferkit: {re.escape(str(weights))}: 1 tensors from 1 storages$", re.M)
    plain, verbose = run_cli(*args, check=False), run_cli(*args, "-v", check=False)
    for done in (plain, verbose):
        assert done.returncode == 2 and "transferkit: error:" in done.stderr, done.stderr[-2000:]
    assert debug.search(verbose.stderr), verbose.stderr[-2000:]
    assert not debug.search(plain.stderr), plain.stderr[-2000:]


def test_backbones_json_lists_the_registry():
    from transferkit.models.backbones import REGISTRY

    rows = json.loads(run_cli("backbones", "--json").stdout)
    assert [r["name"] for r in rows] == list(REGISTRY)
    for row in rows:
        spec = REGISTRY[row["name"]]
        assert (row["default_size"], row["feature_dim"], row["n_blocks"], row["offline"]) == (
            spec.default_size, spec.feature_dim, spec.n_blocks, spec.offline)


def test_card_without_out_prints_the_card_and_writes_nothing(trained, tmp_path):
    from transferkit.models.modelfile import read_metadata
    from transferkit.reports.card import model_card

    model = trained[0]["model_path"]
    expected = model_card(read_metadata(model))  # rendered here from the metadata, in this process
    printed = run_cli("card", model, cwd=tmp_path)
    assert printed.stdout == expected and os.listdir(tmp_path) == []
    written = run_cli("card", model, "--out", tmp_path / "CARD.md", cwd=tmp_path)
    assert written.stdout.strip() == f"transferkit: wrote {tmp_path / 'CARD.md'}"
    assert (tmp_path / "CARD.md").read_text(encoding="utf-8") == expected


def test_compare_test_dir_is_scored_and_shown_in_the_table(dataset, tmp_path):
    """A test folder whose first class holds crops of the second class's photograph: those 4 of its 12 photos
    can only be wrong, so its accuracy is at most 8/12 whatever the validation split says."""
    test = tmp_path / "test"
    write_dataset(test, 4, seed=41)
    wrong = _files(test / CLASSES[1])
    shutil.rmtree(test / CLASSES[0])
    os.makedirs(test / CLASSES[0])
    for i, path in enumerate(wrong):  # other crops of the same photograph, under the first class's name
        shutil.copy(path, test / CLASSES[0] / f"from_second_{i}.jpg")
    for path in wrong:  # the second class keeps crops of its own photograph, drawn again
        os.remove(path)
    write_dataset(tmp_path / "second", 4, seed=42, classes=CLASSES[:2])
    for path in _files(tmp_path / "second" / CLASSES[1]):
        shutil.copy(path, test / CLASSES[1] / os.path.basename(path))
    n_test = len(_files(test))
    assert n_test == 12
    out = tmp_path / "cmp"
    done = run_cli("compare", dataset[0], "--backbones", "efficientnet_lite0", "--image-size", IMAGE_SIZE,
                   "--test-dir", test, "--out", out)
    found = json.load(open(out / "compare.json", encoding="utf-8"))
    (row,) = found["results"]
    assert row["test_images"] == n_test and row["test_accuracy"] <= 8 / 12 + 1e-9
    assert row["val_accuracy"] > row["test_accuracy"]  # the validation split is not what the test column shows
    header, line = done.stdout.splitlines()[:2]
    assert header.split()[-5:] == ["test", "acc", "test", "F1", "img/s"]
    cells = line.split()
    assert cells[0] == "efficientnet_lite0" and float(cells[4]) == pytest.approx(row["test_accuracy"], abs=5e-5)
    assert float(cells[5]) == pytest.approx(row["test_macro_f1"], abs=5e-5)


@pytest.fixture(scope="module")
def mislabelled(tmp_path_factory):
    """12 crops of each class, and 2 crops of each of the second and third photographs filed one class too low."""
    root = tmp_path_factory.mktemp("mislabelled")
    data = write_dataset(root / "data", 12, seed=51)
    for k in (1, 2):
        for path in _files(os.path.join(data, CLASSES[k]))[:2]:
            shutil.move(path, os.path.join(data, CLASSES[k - 1], "moved_" + os.path.basename(path)))
    return data


def test_inspect_near_threshold_and_backbone(mislabelled, tmp_path):
    import imagehash

    from transferkit.training.audit import audit_folder

    done = run_cli("inspect", mislabelled, "--near-threshold", 20, "--labels", "--backbone", "efficientnet_lite1",
                   "--image-size", IMAGE_SIZE, "--json", "--out", tmp_path / "inspect")
    report = json.loads(done.stdout)

    # near duplicates: every pair of files whose 64-bit perceptual hashes differ in at most N bits, counted here
    hashes = [imagehash.phash(Image.open(p).convert("RGB")) for p in _files(mislabelled)]
    pairs = {t: sum(hashes[i] - hashes[j] <= t for i in range(len(hashes)) for j in range(i + 1, len(hashes)))
             for t in (6, 20)}
    print(f"\nnear-duplicate pairs at 6 bits: {pairs[6]}, at 20 bits: {pairs[20]}")
    assert pairs[20] != pairs[6]
    near = report["near_duplicates"]
    assert near["threshold_bits"] == 20 and sum(near["counts"].values()) == pairs[20]

    # the label audit on the features of the backbone asked for: the same ranking as lite1's audit run here, not
    # lite0's
    def audit(backbone):
        found = audit_folder(mislabelled, backbone, IMAGE_SIZE).to_json()
        return [(os.path.basename(r["path"]), r["given"], r["suggested"], r["score"])
                for r in found["label_issues"] + found["outliers"]]

    shown = [(os.path.basename(r["path"]), r["given"], r["suggested"], r["score"])
             for r in report["label_issues"] + report["outliers"]]
    lite1, lite0 = audit("efficientnet_lite1"), audit("efficientnet_lite0")
    assert shown == lite1 and lite1 != lite0
    moved = {f for k in CLASSES for f in os.listdir(os.path.join(mislabelled, k)) if f.startswith("moved_")}
    assert {os.path.basename(r["path"]) for r in report["label_issues"]} & moved  # the planted ones are found


def test_export_int8_with_calibration_from_the_command_line(trained, dataset, tmp_path):
    import onnx
    import onnxruntime as ort

    from transferkit.api import load_predictor
    from transferkit.data.images import load_image

    model = trained[0]["model_path"]
    calibration = tmp_path / "calibration"  # 7 photos: not the training folder's 48 (the default)
    for i, path in enumerate(_files(dataset[1])[:7]):
        os.makedirs(calibration, exist_ok=True)
        shutil.copy(path, calibration / f"c{i}.jpg")
    out = tmp_path / "m.onnx"
    done = run_cli("export", model, "--format", "onnx", "--quantize", "int8", "--calibration", calibration,
                   "--out", out)
    assert "quantize int8" in done.stdout
    sidecar = json.load(open(tmp_path / "m.json", encoding="utf-8"))["export"]
    assert sidecar["quantize"] == "int8" and sidecar["calibration_images"] == 7
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in onnx.load(str(out)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) > 10

    reference = load_predictor(model)
    photos = _files(dataset[1])
    batch = np.stack([load_image(p, reference.image_size) for p in photos]).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    quantized = session.run(None, {session.get_inputs()[0].name: batch})[0]
    fp32, n = reference.predict_images(batch), len(reference.class_names)
    assert not np.allclose(quantized[:, :n], fp32[:, :n], atol=1e-6)  # not the fp32 graph
    agree = float(np.mean(quantized[:, :n].argmax(1) == fp32[:, :n].argmax(1)))
    print(f"\nint8 export vs fp32: top-1 agreement {agree:.3f} on {len(photos)} test photos, max abs diff "
          f"{np.abs(quantized[:, :n] - fp32[:, :n]).max():.4f}")
    assert agree >= 0.8
