"""The classifier's parts: the generated signature, set_params on a fitted model, the stage events, the model
record, the task seam and the predict options record."""

import dataclasses
import inspect
import json

import numpy as np
import pytest

import transferkit
from transferkit import ImageClassifier, TrainOptions
from transferkit.errors import OptionError, TransferkitError

from children import run_cli
from conftest import IMAGE_SIZE


def test_the_signature_is_the_options_record_and_clone_works():
    from sklearn.base import clone

    params = inspect.signature(ImageClassifier).parameters
    fields = dataclasses.fields(TrainOptions)
    assert list(params) == [f.name for f in fields]
    assert all(params[f.name].kind is inspect.Parameter.KEYWORD_ONLY and params[f.name].default == f.default
               for f in fields)
    assert "epochs = 30" in ImageClassifier.__init__.__doc__
    clf = ImageClassifier(epochs=3, head="logistic", weights=None)
    twin = clone(clf)  # scikit-learn checks every parameter comes back as the same object
    assert twin is not clf and twin.get_params() == clf.get_params() and repr(twin) == repr(clf)
    assert repr(clf) == "ImageClassifier(weights=None, epochs=3, head='logistic')"
    with pytest.raises(TypeError):
        ImageClassifier(3)  # keyword-only
    with pytest.raises(TransferkitError, match="unknown option 'epoch'; known: runtime, precision"):
        ImageClassifier(epoch=3)
    with pytest.raises(TransferkitError, match="unknown option 'epoch'"):
        clf.set_params(epoch=3)


def test_set_params_keeps_a_fitted_model(trained):
    clf = ImageClassifier.load(trained[0]["model_path"], runtime="keras")
    model, classes, validation = clf.model_, clf.classes_, clf.validation_
    assert clf.set_params(epochs=2, seed=7) is clf
    assert clf.model_ is model and clf.classes_ == classes and clf.validation_ == validation
    assert clf.get_params()["epochs"] == 2 and clf.path == trained[0]["model_path"]  # still the file it was read from


def test_stage_events_fire_in_order_and_the_end_always(dataset, tmp_path):
    from transferkit.training.events import STAGES, StageCallback

    class Record(StageCallback):
        def __init__(self):
            self.calls = []

        def on_stage_begin(self, stage, state):
            self.calls.append(("begin", stage))

        def on_stage_end(self, stage, state):
            self.calls.append(("end", stage, state.classes is not None, state.model is not None))

        def on_train_end(self, state):
            self.calls.append(("train_end", state.test is not None))

    record = Record()
    clf = ImageClassifier(image_size=IMAGE_SIZE, epochs=3, head="gap", runtime="keras")
    clf.fit(dataset[0], test_dir=dataset[1], out=str(tmp_path / "run"), callbacks=[record])
    assert record.calls == [("begin", "prepare"), ("end", "prepare", True, False),
                            ("begin", "features"), ("end", "features", True, False),
                            ("begin", "head"), ("end", "head", True, True),
                            ("begin", "evaluate"), ("end", "evaluate", True, True), ("train_end", True)]
    assert {c[1] for c in record.calls if c[0] == "begin"} <= set(STAGES)

    class Boom(StageCallback):
        def on_stage_begin(self, stage, state):
            if stage == "head":
                raise RuntimeError("stop here")

    again = Record()
    with pytest.raises(RuntimeError, match="stop here"):
        ImageClassifier(image_size=IMAGE_SIZE, epochs=3, head="gap", runtime="keras").fit(
            dataset[0], out=str(tmp_path / "boom"), callbacks=[again, Boom()])
    assert again.calls[-1] == ("train_end", False) and ("begin", "head") in again.calls
    assert ("end", "head", True, True) not in again.calls


def test_the_model_record_round_trips_and_keeps_what_it_does_not_know(trained, tmp_path):
    from transferkit.models import modelfile
    from transferkit.models.record import ModelRecord

    meta = modelfile.read_metadata(trained[0]["model_path"])
    record = ModelRecord.from_metadata(meta)
    assert record.to_metadata() == meta and record.task == "single_label" and record.format == meta["format"]
    assert ModelRecord.from_metadata(meta | {"from_the_future": [1, 2]}).to_metadata()["from_the_future"] == [1, 2]
    old = {k: v for k, v in meta.items() if k != "task"}  # a file written before tasks existed
    assert transferkit.tasks.task_of(old).name == "single_label"
    with pytest.raises(TransferkitError, match="unknown task 'regression'; known: single_label"):
        transferkit.tasks.task_of(meta | {"task": "regression"})
    clf = ImageClassifier.load(trained[0]["model_path"], runtime="keras")
    copy = clf.save(str(tmp_path / "copy.keras"))
    written = modelfile.read_metadata(copy)
    assert written["data"] == meta["data"] and written["fit"]["history"] == meta["fit"]["history"]
    assert written["novelty"] == meta["novelty"] and written["created"] >= meta["created"]


def test_the_single_label_task_decides_rows():
    from transferkit.tasks import get_task

    task = get_task()
    outputs = np.array([[0.7, 0.2, 0.1, 0.5], [0.1, 0.3, 0.6, 1.7]], np.float32)  # last column: novelty / threshold
    names = ["a", "b", "c"]
    rows = task.decide(["x.jpg", "y.jpg"], outputs, names, top_k=2, novelty={"threshold": 3.0})
    assert [r["label"] for r in rows] == ["a", None] and rows[1]["unknown"] and not rows[0]["unknown"]
    assert [t["label"] for t in rows[1]["top_k"]] == ["c", "b"]  # the nearest classes of an unknown photo
    kept = task.decide(["y.jpg"], outputs[1:], names, top_k=5, novelty={"threshold": 3.0}, reject=False)
    assert kept[0]["label"] == "c" and len(kept[0]["top_k"]) == 3
    assert task.score(outputs[:, :3], np.array([0, 1])) == pytest.approx((0.5, -(np.log(0.7) + np.log(0.3)) / 2))
    assert task.loss == "sparse_categorical_crossentropy"


def test_predict_options_are_one_record(trained, tmp_path):
    from transferkit.options import DEFAULT_PREDICT, PredictOptions

    for fn in (transferkit.predict, transferkit.explain, ImageClassifier.predict):
        params = inspect.signature(fn).parameters
        assert params["top_k"].default == DEFAULT_PREDICT.top_k and params["reject"].default == DEFAULT_PREDICT.reject
    with pytest.raises(OptionError, match="top_k must be >= 1, got 0"):
        PredictOptions(top_k=0)
    with pytest.raises(OptionError, match="top_k must be >= 1"):
        transferkit.predict(trained[0]["model_path"], [], top_k=0)
    proc = run_cli("predict", trained[0]["model_path"], trained[1], "--top-k", "0", check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "transferkit: error: --top-k must be >= 1, got 0")
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    proc = run_cli("predict", trained[0]["model_path"], notes, "--format", "json", "--no-reject", "--top-k", "1",
                   timeout=300)
    rows = json.loads(proc.stdout)
    assert len(rows) == 1 and rows[0]["error"] and rows[0]["label"] is None
