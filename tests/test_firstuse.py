"""firstuse: the first prediction after training is as fast and light as every later one (issue 27).

- ``train`` leaves the saved model file's converted, checked engine in the cache: a ``predict`` in a fresh process
  right after it imports no TensorFlow (checked in ``sys.modules``);
- ``engines.convert.warm`` leaves exactly what ``CachedPredictor.find`` trusts (same key, same verdict);
- a model file never converted is converted by a child process: the process that predicts imports no
  TensorFlow, and the child's stderr carries no FutureWarning from Keras's tf2onnx module;
- ``serve`` converts before gunicorn forks its workers.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import transferkit
from transferkit.engines import cached, convert, runtimes
from transferkit.files import cache_dir
from transferkit.options import DEFAULT_ENGINE, EngineOptions

from children import predict_in_child
from conftest import IMAGE_SIZE, require

require("openvino", "a dependency of transferkit; the default engine converts to it")


def _cache_without_classifiers(tmp_path) -> str:
    """A copy of this session's cache (the backbone's conversion, the features) without any classifier's
    conversion: what a user's cache holds before a new model is trained."""
    target = tmp_path / "cache"
    shutil.copytree(cache_dir(), target, ignore=lambda folder, names: [n for n in names
                                                                      if n.startswith("classifier-")])
    return str(target)


def _photo(dataset) -> str:
    folder = os.path.join(dataset[1], sorted(os.listdir(dataset[1]))[0])
    return os.path.join(folder, sorted(os.listdir(folder))[0])


def test_after_train_a_predict_process_imports_no_tensorflow(trained, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", _cache_without_classifiers(tmp_path))
    result = transferkit.train(dataset[0], image_size=IMAGE_SIZE, epochs=15, augment_views=2,
                               out=str(tmp_path / "run"))  # the fixture's options: its features are cached
    model = result["model_path"]
    assert not cached.missing(model), "train left the converted, checked engine in the cache"
    photo = _photo(dataset)
    expected = transferkit.predict(model, [photo], runtime="keras")[0]
    rows, modules, proc = predict_in_child(model, photo, modules=("tensorflow", "keras"))
    assert modules == {"tensorflow": False, "keras": False}
    assert "child process" not in proc.stderr  # nothing was left to convert
    row = rows[0]
    assert row["label"] == expected["label"]
    assert row["probability"] == pytest.approx(expected["probability"], abs=1e-4)


def test_warm_leaves_what_find_trusts(trained, tmp_path, monkeypatch):
    model = trained[0]["model_path"]
    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "empty"))
    assert cached.missing(model) and cached.CachedPredictor.find(model) is None
    assert convert.warm(model, engine=EngineOptions(runtime="keras")) is None  # Keras: nothing to convert
    built = convert.warm(model)  # the model loaded from its file
    assert built.label == "openvino fp32" and built.check_cosine >= runtimes.FP32_COSINE
    found = cached.CachedPredictor.find(model, DEFAULT_ENGINE)
    assert found is not None and found.engine.verdict == built.verdict
    assert not cached.missing(model) and convert.warm(model) is None  # cached: nothing more to do
    assert convert.in_child(model) is False


CHILD = ("import json, sys\n"
         "from transferkit.engines import convert\n"
         "seen, relay = [], convert._relay\n"
         "convert._relay = lambda text: (seen.append(text), relay(text))[1]\n"
         "from transferkit.api import load_predictor\n"
         "found = load_predictor({model!r})\n"
         "print(json.dumps({{'kind': type(found).__name__, 'tensorflow': 'tensorflow' in sys.modules,\n"
         "                  'child_stderr': seen}}))\n")


def test_a_model_file_never_converted_is_converted_in_a_child_process(trained, tmp_path):
    model = trained[0]["model_path"]
    env = dict(os.environ, TRANSFERKIT_CACHE_DIR=str(tmp_path / "cold"), PYTHONWARNINGS="always")
    proc = subprocess.run([sys.executable, "-c", CHILD.format(model=model)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    assert done["kind"] == "CachedPredictor" and done["tensorflow"] is False
    assert len(done["child_stderr"]) == 1, "one child converted it"
    assert "np.object" not in done["child_stderr"][0]  # PYTHONWARNINGS=always: Keras's tf2onnx warning is filtered


def test_serve_converts_before_gunicorn_forks(trained, monkeypatch):
    from gunicorn.app.base import BaseApplication

    from transferkit.apps.serve import serve
    from transferkit.options import ServeOptions

    order = []
    monkeypatch.setattr(convert, "in_child", lambda path, engine: order.append(("convert", path, engine)))
    monkeypatch.setattr(BaseApplication, "run", lambda self: order.append(("gunicorn",)))
    model = trained[0]["model_path"]
    serve(model, ServeOptions(port=0, precision="fp32"))
    assert order == [("convert", model, EngineOptions(runtime="auto", precision="fp32")), ("gunicorn",)]
