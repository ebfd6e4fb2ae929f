"""The ImageClassifier object, the options record, resume, and the package's shape."""

import ast
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import transferkit
from transferkit import ImageClassifier, TrainOptions
from transferkit.errors import OptionError, TransferkitError
from transferkit.models.novelty import split_outputs
from transferkit.options import SPLIT_AND_FEATURES

from children import run_cli
from conftest import CLASSES, IMAGE_SIZE
from photos import photo_crop

SRC = pathlib.Path(transferkit.__file__).parent
FAST = dict(image_size=IMAGE_SIZE, epochs=3, augment_views=0)


def _test_paths(dataset):
    return sorted(str(p) for p in pathlib.Path(dataset[1]).rglob("*.jpg"))


def test_fit_save_load_predict_round_trip(dataset, tmp_path):
    clf = ImageClassifier(runtime="keras", **FAST)
    assert clf.fit(dataset[0], out=str(tmp_path / "run")) is clf  # fit returns self
    assert clf.classes_ == sorted(CLASSES) and clf.best_epoch_ >= 1
    assert len(clf.history_["val_accuracy"]) >= 1 and 0 <= clf.validation_["accuracy"] <= 1
    paths = _test_paths(dataset)
    before = clf.predict_proba(paths)
    copy = clf.save(str(tmp_path / "copy.keras"))
    loaded = ImageClassifier.load(copy, runtime="keras")
    np.testing.assert_allclose(loaded.predict_proba(paths), before, atol=1e-5)
    assert loaded.classes_ == clf.classes_ and loaded.best_epoch_ == clf.best_epoch_
    assert loaded.get_params()["image_size"] == IMAGE_SIZE
    rows = loaded.predict(dataset[1], top_k=2, reject=False)  # the nearest class even for a photo it rejects
    assert [r["label"] for r in rows] == [clf.classes_[i] for i in before.argmax(1)]
    # and right: each photo's folder is its class (measured 18 of 18, 3 epochs); a model answering at random
    # passes >= 16 of 18 with P(Binomial(18, 1/3) >= 16) = 1.7e-6, so an unfitted head or shuffled classes fail
    correct = sum(r["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    assert len(rows) == 18 and correct >= 16, correct
    # arrays of another size go through the same resize as files; a single image is not a batch
    photo = np.asarray(Image.open(paths[0]).convert("RGB"))
    np.testing.assert_allclose(loaded.predict_proba(photo[None]), before[:1], atol=1e-5)
    with pytest.raises(TransferkitError, match="takes a batch of images"):
        loaded.predict_proba(photo)
    # what the loaded object says about itself is what the file says, and a re-save keeps it true
    assert loaded.metadata == clf.metadata
    loaded.save(str(tmp_path / "again.keras"))
    again = ImageClassifier.load(str(tmp_path / "again.keras"), runtime="keras")
    assert again.image_size == IMAGE_SIZE and again.metadata["training"] == clf.metadata["training"]
    with pytest.raises(TransferkitError, match="fine_tune needs the training images"):
        loaded.fine_tune(1)


def test_protocol_and_a_second_fit_starts_from_nothing(dataset, tmp_path):
    from transferkit.engines.base import FilePredictor, Predictor

    clf = ImageClassifier(runtime="keras", **FAST)
    assert not isinstance(clf, Predictor)  # not fitted: no class names yet
    with pytest.raises(TransferkitError, match="not fitted"):
        clf.predict([dataset[1]])
    clf.fit(dataset[0], test_dir=dataset[1], out=str(tmp_path / "a"))
    assert isinstance(clf, FilePredictor) and clf.test_["n_images"] == 18
    clf.set_params(epochs=2).fit(dataset[0], out=str(tmp_path / "b"))
    assert clf.test_ is None and len(clf.history_["loss"]) <= 2
    assert "test" not in json.load(open(tmp_path / "b" / "metrics.json", encoding="utf-8"))
    assert "test" not in clf.metadata


def test_each_stage_is_a_method_a_test_can_call(dataset, tmp_path):
    """prepare -> extract_features -> fit_head -> save -> evaluate, one at a time, as fit runs them."""
    clf = ImageClassifier(runtime="keras", **FAST).prepare(dataset[0], out=str(tmp_path / "run"))
    assert len(clf.data_.train_paths) + len(clf.data_.val_paths) == 48 and clf.model_ is None
    features = clf.extract_features()
    assert features.x_train.shape == (len(clf.data_.train_paths), 1280 + 896)  # final + 4 blocks (head auto)
    assert clf.fit_head(features) is clf and clf.best_epoch_ >= 1
    path = clf.save(str(tmp_path / "staged.keras"))
    whole = ImageClassifier(runtime="keras", **FAST).fit(dataset[0], out=str(tmp_path / "whole"))
    assert clf.history_ == whole.history_  # the same seeded stages
    staged = clf.evaluate(dataset[1])  # from the feature cache (the backbone is still the frozen one)
    from_file = transferkit.evaluate(path, dataset[1], runtime="keras")  # through the model file
    assert staged["confusion_matrix"] == from_file["confusion_matrix"]
    paths = _test_paths(dataset)
    cached, kept, _ = clf.probabilities_for_files(paths)  # the cached-feature shortcut ...
    assert kept == list(range(len(paths)))
    from_model = ImageClassifier.load(path, runtime="keras")
    np.testing.assert_allclose(split_outputs(cached, 3)[0], from_model.predict_proba(paths),
                               atol=1e-4)  # ... computes what the model file computes, novelty score included
    np.testing.assert_allclose(split_outputs(cached, 3)[1], [r["novelty"] for r in from_model.predict(paths)],
                               rtol=1e-3)


def test_metadata_training_is_the_options_record(trained):
    meta = transferkit.load_model(trained[0]["model_path"]).metadata
    record = TrainOptions(**meta["training"])  # the stored record validates as it is
    assert record.size == IMAGE_SIZE and meta["training"]["augment_views"] == 2
    assert set(meta["training"]) == set(TrainOptions.names())
    assert meta["fit"]["best_epoch"] == trained[0]["best_epoch"]


def test_bad_option_fails_before_any_image_is_read(dataset, tmp_path, monkeypatch):
    from transferkit.data import folders

    def no_reading(*args, **kwargs):
        raise AssertionError("an image folder was read before the options were checked")

    monkeypatch.setattr(folders, "split_training_folder", no_reading)
    cases = [(dict(batch_size=0), "batch_size must be >= 1 and <= 4096, got 0"),
             (dict(unfreeze_top=99, fine_tune_epochs=1), "unfreeze_top must be between 1 and 18 for "
                                                         "efficientnet_lite0, got 99"),
             (dict(val_split=1.5), "val_split must be > 0.0 and < 1.0, got 1.5"),
             (dict(head="mlp"), "head must be one of auto, gap, logistic, flatten-256-128, got 'mlp'"),
             (dict(backbone="resnet9000"), "backbone is unknown"),
             (dict(epochs=2.5), "epochs must be a whole number, got 2.5"),
             (dict(precision="int8"), "--feature-precision int8 computes the training views in int8"),
             (dict(depths=9), "depths must be >= 0 and <= 8, got 9"),
             (dict(weights=str(tmp_path / "missing.pth")), "weights must be 'imagenet' or an existing weights file")]
    for options, message in cases:
        with pytest.raises(OptionError) as caught:
            ImageClassifier(**options).fit(dataset[0], out=str(tmp_path / "never"))
        assert message in str(caught.value), (options, str(caught.value))
        assert isinstance(caught.value, ValueError)  # TransferkitError subclasses ValueError
    with pytest.raises(TransferkitError, match="unknown option 'epoch'"):
        ImageClassifier(epoch=3)
    monkeypatch.undo()
    for data, test in ((str(tmp_path / "nowhere"), None), (dataset[0], str(tmp_path / "no-test"))):
        with pytest.raises(TransferkitError, match="not a folder"):  # before any feature is extracted
            ImageClassifier(**FAST).fit(data, test_dir=test, out=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()  # no empty run folder left behind
    with pytest.raises(OptionError, match="runtime of an .onnx export is onnxruntime or openvino, fp32"):
        transferkit.load_model(str(tmp_path / "m.onnx"), runtime="keras")
    with pytest.raises(OptionError, match="runtime of an .onnx export is onnxruntime or openvino, fp32"):
        transferkit.load_model(str(tmp_path / "m.onnx"), runtime="openvino", precision="bf16")


def test_cli_flags_come_from_the_record_and_errors_name_the_flag(dataset, tmp_path):
    proc = run_cli("train", "--help", timeout=120)
    for name in TrainOptions.names():
        flag = "--no-cache" if name == "cache" else "--" + name.replace("_", "-")
        assert flag in proc.stdout, flag
    start = time.perf_counter()
    proc = run_cli("train", dataset[0], "--batch-size", "0", "--out", tmp_path / "x", check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("transferkit: error: --batch-size must be >= 1 and <= 4096, "
                                                    "got 0")
    print(f"bad option refused in {time.perf_counter() - start:.1f} s (process start included)")


def test_one_default_engine_for_every_entry_point():
    import inspect

    from transferkit import api
    from transferkit.options import EngineOptions, ServeOptions

    default = EngineOptions()
    assert (TrainOptions().runtime, TrainOptions().precision) == (default.runtime, default.precision)
    assert (ServeOptions().runtime, ServeOptions().precision) == (default.runtime, default.precision)
    for fn in (api.predict, api.evaluate, api.load_model, ImageClassifier.load):
        params = inspect.signature(fn).parameters
        assert (params["runtime"].default, params["precision"].default) == (default.runtime, default.precision), fn


class Interrupt:
    """A Keras callback that raises KeyboardInterrupt at the end of the first fine-tuning epoch."""

    def __new__(cls):
        import keras

        class _Interrupt(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                raise KeyboardInterrupt

        return _Interrupt()


def test_resume_refuses_another_split_or_other_features(dataset, tmp_path):
    data = shutil.copytree(dataset[0], tmp_path / "data")
    out = str(tmp_path / "run")
    kw = dict(FAST, fine_tune_epochs=2, unfreeze_top=1, fine_tune_lr=1e-3)
    with pytest.raises(KeyboardInterrupt):
        ImageClassifier(**kw).fit(str(data), out=out, callbacks=[Interrupt()])
    split = json.load(open(os.path.join(out, "split.json"), encoding="utf-8"))
    assert len(split["train"]) + len(split["validation"]) == 48
    for change, word in ((dict(seed=7), "seed"), (dict(image_size=96), "image_size"),
                         (dict(augment_views=1), "augment_views"), (dict(val_split=0.3), "val_split")):
        with pytest.raises(TransferkitError, match=f"cannot resume with {word}="):
            ImageClassifier(**(kw | change)).fit(str(data), out=out, resume=True)
    extra = data / CLASSES[0] / "new_photo.jpg"
    Image.fromarray(photo_crop(0, np.random.default_rng(5))).save(extra)
    with pytest.raises(TransferkitError, match="training files changed.*new_photo.jpg' was added"):
        ImageClassifier(**kw).fit(str(data), out=out, resume=True)
    extra.unlink()
    clf = ImageClassifier(**kw).fit(str(data), out=out, resume=True)  # the same options and files: continues
    assert clf.fine_tune_["epochs_done"] == 2 and clf.fine_tune_["status"] == "done"
    assert [(s["first_epoch"], s["epochs_run"]) for s in clf.fine_tune_["sessions"]] == [(1, 1), (2, 1)]  # continued
    assert json.load(open(os.path.join(out, "split.json"), encoding="utf-8")) == split
    assert set(SPLIT_AND_FEATURES) <= set(TrainOptions.names())


def test_resume_after_sigkill_in_the_second_stage(dataset, tmp_path):
    """A real `transferkit train` process killed with SIGKILL during fine-tuning; `--resume` continues from the
    last saved epoch with the same split."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "transferkit", "train", dataset[0], "--out", str(out), "--image-size",
            str(IMAGE_SIZE), "--epochs", "3", "--augment-views", "0", "--fine-tune-epochs", "5", "--unfreeze-top", "1",
            "--fine-tune-lr", "1e-3", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # --quiet: nothing to read
    state_path, deadline, state = out / "finetune_state.json", time.time() + 300, {}
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("epochs_done", 0) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed = json.loads(state_path.read_text())
    assert 1 <= killed["epochs_done"] < 5 and killed.get("status") != "done"
    split = (out / "split.json").read_text()
    loaded = transferkit.load_model(str(out / "model.keras"), runtime="keras")  # a loadable model was left
    assert loaded.classes_ == sorted(CLASSES)
    resumed = subprocess.Popen(args + ["--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    state = json.loads(state_path.read_text())
    assert state["status"] == "done" and state["epochs_done"] == 5
    done = killed["epochs_done"]
    # the epochs each process ran: the killed one from epoch 1, the resumed one only the rest (a run that ignored
    # --resume and restarted would record one process, from epoch 1, with the same history, training being
    # bit-identical per seed)
    assert [s["pid"] for s in state["sessions"]] == [proc.pid, resumed.pid]
    assert state["sessions"][1] == {"pid": resumed.pid, "first_epoch": done + 1, "epochs_run": 5 - done}
    assert state["history"]["val_loss"][:done] == killed["history"]["val_loss"]  # continued, not restarted
    assert len(state["history"]["val_loss"]) == 5
    assert (out / "split.json").read_text() == split  # the same split
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fine_tune"]["epochs"] == 5


def test_logging_not_print(tmp_path):
    printing = [f"{p.relative_to(SRC)}:{node.lineno}" for p in SRC.rglob("*.py")
                for node in ast.walk(ast.parse(p.read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
                and not p.match("apps/*.py")]
    assert printing == [], "library code logs through logging.getLogger('transferkit'): " + ", ".join(printing)
    proc = run_cli("backbones", "efficientnet_lite*", "--offline", timeout=120)
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_functions_are_short_and_imports_have_no_cycles():
    long = [f"{p.relative_to(SRC)}:{f.name} ({f.end_lineno - f.lineno + 1} lines)" for p in SRC.rglob("*.py")
            for f in _functions(ast.parse(p.read_text())) if f.end_lineno - f.lineno + 1 > 60]
    assert long == []
    graph = {}
    for p in SRC.rglob("*.py"):
        module = "transferkit." + ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(p.read_text())
        graph[module] = {a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}"
                         for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                         for a in node.names if (getattr(node, "module", None) or a.name).startswith("transferkit")}
    graph = {m: {d if d in graph else d.rsplit(".", 1)[0] for d in deps} & set(graph) - {m}
             for m, deps in graph.items()}

    done = set()

    def visit(node, path):
        assert node not in path, "import cycle: " + " -> ".join(path + [node])
        if node not in done:
            for dep in graph[node]:
                visit(dep, path + [node])
            done.add(node)

    for module in graph:
        visit(module, [])
