"""Hardening: model files and exports from elsewhere, engines certified on photos only, damaged caches rebuilt,
Unicode class folders, link loops, and runs killed with SIGKILL at several points."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import unicodedata
import zipfile

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import transferkit
from transferkit.errors import TransferkitError
from transferkit.files import cache_dir, file_digest, read_checked

from children import run_cli
from conftest import CLASSES, IMAGE_SIZE, require, write_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "transferkit"


# ----- 3. model files from elsewhere -----
def test_keras_floor_is_the_safe_mode_fix_and_safe_mode_is_never_off():
    """Every Python that requires-python admits gets Keras 3.14+ (Keras 3.13+ needs Python 3.11, so the project
    can admit no older Python), and the interpreter running the suite is one of them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    admitted = SpecifierSet(project["requires-python"])
    assert not admitted.contains("3.10.14") and admitted.contains(".".join(map(str, sys.version_info[:3])))
    keras = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "keras"]
    for python in ("3.11", "3.12", "3.13", "3.14"):
        floors = [r for r in keras if r.marker is None or r.marker.evaluate({"python_version": python})]
        assert floors and all(not r.specifier.contains("3.13.9") and r.specifier.contains("3.14.0")
                              for r in floors), python
    import keras as k

    assert Version(k.__version__) >= Version("3.14")
    for path in SRC.rglob("*.py"):
        assert "safe_mode=False" not in path.read_text(encoding="utf-8"), path


def _bad_model_files(trained, folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Damaged or foreign model files, each built from the real trained model file."""
    good = pathlib.Path(trained[1]) / "model.keras"
    files = {}

    def rewrite(name, edit):
        target = folder / f"{name}.keras"
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(target, "w") as dst:
            for item in src.infolist():
                data = edit(item.filename, src.read(item.filename))
                if data is not None:
                    dst.writestr(item, data)
        files[name] = target

    rewrite("no_metadata", lambda n, d: None if n == "transferkit.json" else d)
    rewrite("bad_json", lambda n, d: b"{not json" if n == "transferkit.json" else d)
    rewrite("not_an_object", lambda n, d: b"[1, 2]" if n == "transferkit.json" else d)
    rewrite("no_class_names", lambda n, d: json.dumps({k: v for k, v in json.loads(d).items()
                                                        if k != "class_names"}).encode()
            if n == "transferkit.json" else d)
    rewrite("number_class_names", lambda n, d: json.dumps(json.loads(d) | {"class_names": [1, 2, 3]}).encode()
            if n == "transferkit.json" else d)
    rewrite("bad_config", lambda n, d: b"{}" if n == "config.json" else d)
    (folder / "random.keras").write_bytes(os.urandom(3000))
    files["random"] = folder / "random.keras"
    (folder / "random.onnx").write_bytes(os.urandom(3000))
    files["random_onnx"] = folder / "random.onnx"
    return files


def _no_resize_model(folder: pathlib.Path, classes: int) -> pathlib.Path:
    import keras

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    model = keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(inputs)))
    path = folder / "no_resize.keras"
    model.save(path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("transferkit.json", json.dumps({"class_names": CLASSES}))
    return path


def _foreign_onnx(folder: pathlib.Path) -> pathlib.Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    model = helper.make_model(graph)
    entry = model.metadata_props.add()
    entry.key, entry.value = "transferkit", json.dumps({"class_names": ["a", "b"]})
    path = folder / "foreign.onnx"
    onnx.save(model, path)
    return path


def _lambda_model(folder: pathlib.Path) -> pathlib.Path:
    """A model file whose config runs code at load time (a Lambda layer): safe_mode must refuse it."""
    import keras

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    resized = keras.layers.Resizing(IMAGE_SIZE, IMAGE_SIZE, name="resize")(inputs)
    out = keras.layers.Lambda(lambda t: keras.ops.mean(t, axis=(1, 2)))(resized)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(out))
    path = folder / "lambda.keras"
    model.save(path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("transferkit.json", json.dumps({"class_names": CLASSES, "image_size": IMAGE_SIZE}))
    return path


def test_damaged_or_foreign_model_files_give_one_line(trained, tmp_path):
    files = _bad_model_files(trained, tmp_path)
    files["no_resize"] = _no_resize_model(tmp_path, 3)
    files["foreign_onnx"] = _foreign_onnx(tmp_path)
    files["lambda"] = _lambda_model(tmp_path)
    for name, path in files.items():
        engine = {} if path.suffix == ".onnx" else {"runtime": "keras"}
        with pytest.raises(TransferkitError) as info:
            transferkit.load_model(str(path), **engine)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, (name, message)
    # the command line: one line on stderr, no traceback
    for name in ("no_class_names", "no_resize", "foreign_onnx"):
        proc = run_cli("predict", files[name], tmp_path, check=False, timeout=300)  # and no traceback
        assert proc.returncode != 0, proc.stderr[-2000:]
        assert str(files[name]) in proc.stderr


# ----- 4, 5. exports: no local paths; a SavedModel never deletes a folder that is not its own -----
def test_exports_carry_no_local_path_and_saved_model_refuses_foreign_folders(trained, dataset, tmp_path):
    from transferkit.export import export_model

    model = os.path.join(trained[1], "model.keras")
    assert os.path.isabs(transferkit.load_model(model, runtime="keras").metadata["data"]["dir"])
    onnx_path = tmp_path / "m.onnx"
    export_model(model, "onnx", str(onnx_path))
    import onnx

    embedded = onnx.load(str(onnx_path)).metadata_props[0].value
    for text in (embedded, (tmp_path / "m.json").read_text(encoding="utf-8")):
        for local in (str(pathlib.Path(dataset[0]).parent), str(tmp_path), os.path.expanduser("~")):
            assert local not in text
    assert json.loads(embedded)["data"]["dir"] == os.path.basename(dataset[0])

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for target in (precious, pathlib.Path(".")):
        with pytest.raises(TransferkitError, match="not a previous transferkit SavedModel export"):
            export_model(model, "saved_model", str(target))
    assert (precious / "notes.txt").read_text() == "keep me"
    previous = tmp_path / "previous_export"
    previous.mkdir()
    for name in ("saved_model.pb", "transferkit.json", "stale.txt"):
        (previous / name).write_text("old")
    export_model(model, "saved_model", str(previous))
    assert not (previous / "stale.txt").exists() and (previous / "labels.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


# ----- 6. engines are certified on photos, never on a warm-up batch of zeros -----
def test_server_checks_its_engine_on_the_models_validation_photos(trained):
    require("openvino", "a dependency of transferkit")
    from transferkit.apps.serve import create_app
    from transferkit.data.images import load_image
    from transferkit.engines import runtimes
    from transferkit.files import file_digest
    from transferkit.options import ServeOptions

    path = os.path.join(trained[1], "model.keras")
    loaded = transferkit.load_model(path, runtime="keras")
    photos = loaded.check_images_
    split = json.load(open(os.path.join(trained[1], "split.json"), encoding="utf-8"))
    val = [load_image(os.path.join(split["root"], p), IMAGE_SIZE) for p in split["validation"][:len(photos)]]
    np.testing.assert_array_equal(photos, np.stack(val))  # the model file carries its validation photos
    key = f"classifier-{file_digest(path)[:16]}-{IMAGE_SIZE}px"
    verdict_file = runtimes.verdict_path(key, "openvino", "fp32")
    verdict_file.unlink(missing_ok=True)
    create_app(path, ServeOptions(runtime="openvino", precision="fp32"))
    verdict = json.loads(read_checked(verdict_file))
    assert verdict["sample"]["digest"] == runtimes.sample_id(photos.astype(np.float32))["digest"]
    assert verdict["sample"]["pixel_std"] > 20 and verdict["cosine"] >= runtimes.FP32_COSINE

    clf = transferkit.load_model(path, runtime="openvino", precision="fp32")
    clf.check_images_ = None  # an older model file: no photos inside
    clf._predictor = None
    zeros = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    clf.predict_images(zeros)
    assert clf._predictor._engine is None  # zeros are answered by Keras and certify nothing
    clf.predict_images(photos[:2])
    assert clf._predictor._engine is not None and clf._predictor._engine.runtime == "openvino"


# ----- 7. damaged caches are rebuilt -----
def _tiny_model():
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_damaged_conversion_and_verdict_are_rebuilt_not_trusted(tmp_path):
    require("openvino", "a dependency of transferkit")
    from transferkit.engines import runtimes

    model, key = _tiny_model(), f"test-tiny-{os.getpid()}-{time.time_ns()}"
    photos = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    first = runtimes.build_engine(model, key, "openvino", "fp32", check_images=photos)
    assert first.runtime == "openvino"
    onnx_path = cache_dir("runtimes") / f"{key}-{runtimes.CONVERSION}.onnx"
    verdict = runtimes.verdict_path(key, "openvino", "fp32")
    # a truncated conversion: detected by its checksum and converted again, not a permanent fallback to Keras
    data = onnx_path.read_bytes()
    onnx_path.write_bytes(data[: len(data) // 2])
    again = runtimes.build_engine(model, key, "openvino", "fp32", check_images=photos)
    digest_file = onnx_path.with_name(onnx_path.name + ".blake2b")
    assert again.runtime == "openvino" and read_checked(digest_file) == file_digest(onnx_path).encode()
    assert len(onnx_path.read_bytes()) > len(data) // 2
    # an edited verdict (valid JSON, cosine lowered): its checksum fails, the check is measured again
    text = read_checked(verdict).decode()
    forged = re.sub(r'"cosine": [0-9.e-]+', '"cosine": 0.5', text).encode()
    verdict.write_bytes(forged + verdict.read_bytes()[len(text):])
    third = runtimes.build_engine(model, key, "openvino", "fp32", check_images=photos)
    assert third.runtime == "openvino" and third.check_cosine > 0.999
    np.testing.assert_allclose(third(photos), first(photos), rtol=1e-4, atol=1e-5)


def test_flipped_bit_in_a_cached_feature_is_recomputed(dataset):
    import io

    from transferkit.files import CHECK_TAG
    from transferkit.training.features import FeatureExtractor

    paths = sorted(str(p) for p in pathlib.Path(dataset[0]).rglob("*.jpg"))[:3]
    extractor = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE, runtime="keras")
    fresh, _, _ = extractor.extract(paths, 0)
    cached = extractor._cache_file(file_digest(paths[0]), 0)
    raw = bytearray(cached.read_bytes())
    trailer = len(CHECK_TAG) + 20
    raw[-trailer - 1] ^= 0x40  # an exponent bit of the last float: a trusting reader would train on a wild value
    cached.write_bytes(bytes(raw))
    flipped = np.load(io.BytesIO(bytes(raw[:-trailer])))
    assert np.abs(flipped - fresh[0, 0]).max() > 1.0
    again, _, _ = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE, runtime="keras").extract(paths, 0)
    # recomputed (a batch of one rounds differently from the first batch of three, by ~1e-5)
    np.testing.assert_allclose(again, fresh, rtol=1e-4, atol=1e-4)
    assert read_checked(cached) is not None  # rewritten whole


# ----- 8. Unicode class folders, link loops -----
def test_class_folders_differing_only_by_unicode_form_are_an_error(tmp_path):
    from transferkit.data.folders import scan_folder

    write_dataset(tmp_path, 2, seed=3, classes=[unicodedata.normalize("NFC", "pêche"), "fraise"])
    write_dataset(tmp_path, 2, seed=4, classes=[unicodedata.normalize("NFD", "pêche")])
    with pytest.raises(TransferkitError, match="different Unicode forms") as info:
        scan_folder(str(tmp_path))
    assert "NFC" in str(info.value) and "NFD" in str(info.value)


def test_link_loop_inside_a_class_folder_is_walked_once(tmp_path):
    from transferkit.data.folders import expand_paths, scan_folder

    write_dataset(tmp_path, 3, seed=5, classes=CLASSES[:2])
    os.symlink("..", tmp_path / CLASSES[0] / "loop")
    os.symlink(".", tmp_path / CLASSES[1] / "self")
    data = scan_folder(str(tmp_path))
    assert data.counts() == {CLASSES[0]: 6, CLASSES[1]: 3}  # the loop reaches the other class once, no more
    assert any("link loop" in s["reason"] for s in data.skipped)
    assert len(expand_paths([str(tmp_path)])) == 6  # every file once


# ----- 9. SIGKILL at several points -----
def _kill_when(args, ready, timeout=300):
    with tempfile.TemporaryFile() as stderr:  # a file: a pipe nobody reads while polling blocks past 64 KiB
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline, reached = time.time() + timeout, False
        while time.time() < deadline and proc.poll() is None and not (reached := ready()):
            time.sleep(0.01)
        if proc.poll() is not None:  # ended: its file is whole (a seek while it runs would move its offset)
            stderr.seek(0)
            pytest.fail("the run ended before it could be killed: " + stderr.read().decode()[-2000:])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if not reached:  # killed at the deadline, not at the point the test means: what follows would check that
            stderr.seek(0)
            pytest.fail(f"the point to kill it at was not reached in {timeout} s: " + stderr.read().decode()[-2000:])


def _feature_files() -> set:
    """The feature cache's entries (not the temporary file of a write a kill interrupted: never read)."""
    return {p for p in cache_dir("features").rglob("*.npy") if not p.name.startswith(".")}


def _model_is_whole_or_absent(out: pathlib.Path):
    if (out / "model.keras").exists():
        assert transferkit.load_model(str(out / "model.keras"), runtime="keras").classes_ == sorted(CLASSES)


def test_sigkill_during_features_head_and_save_then_resume(tmp_path):
    data = write_dataset(tmp_path / "data", 12, seed=11)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "transferkit", "train", data, "--out", str(out), "--image-size", "72",
            "--epochs", "40", "--augment-views", "2", "--fine-tune-epochs", "2", "--unfreeze-top", "1", "--quiet"]
    before = _feature_files()
    # 1. during feature extraction: some views cached, not all
    _kill_when(args, lambda: len(_feature_files() - before) >= 20)
    kept = {p: p.stat().st_mtime_ns for p in _feature_files() - before}
    assert not (out / "model.keras").exists() and all(read_checked(p) is not None for p in kept)
    split = json.loads((out / "split.json").read_text())
    total = len(split["train"]) * 3 + len(split["validation"])
    # 2. resumed, killed once every view is cached: in the head's fit (or just after it)
    _kill_when(args + ["--resume"], lambda: len(_feature_files() - before) >= total)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # the killed run's features were reused
    _model_is_whole_or_absent(out)
    # 3. resumed, killed while a model file is being written (its temporary file exists)
    (out / "model.keras").unlink(missing_ok=True)
    _kill_when(args + ["--resume"], lambda: any(p.name.startswith(".model.keras.") for p in out.iterdir()))
    assert len(_feature_files() - before) == total  # nothing extracted twice
    _model_is_whole_or_absent(out)
    # 4. resumed to the end
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial file left behind
    state = json.loads((out / "finetune_state.json").read_text())
    assert state["status"] == "done" and state["epochs_done"] == 2
    _model_is_whole_or_absent(out)
    again = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already finished" in again.stderr and "Traceback" not in again.stderr
