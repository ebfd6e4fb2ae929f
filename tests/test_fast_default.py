"""fast-default: the fast path for every user, and one answer from every path (issue fast-default).

- the `.keras` file on its default engine, the same file on Keras, its ONNX export and the server give the same
  label (and unknown verdict) to real photos: of every photograph scikit-image ships, not only the trained ones;
- after a model file's first use, `predict` and the server answer from the cached converted engine without
  importing TensorFlow (checked in fresh subprocesses);
- training views computed in int8 (OpenVINO + NNCF, calibrated on the run's photos) give a head whose reported
  test metrics are the ones `evaluate` reproduces on the model file;
- the novelty score that Keras computes for a batch equals the NumPy score (TensorFlow's oneDNN fusion once
  broadcast the first row's norm to the whole batch).
"""

import os
import time

import numpy as np
import pytest
from PIL import Image

import transferkit
from transferkit.engines.keras_step import run_model
from transferkit.export import export_model
from transferkit.models import modelfile, novelty

from children import post_images, predict_in_child, start_server, stop_server
from conftest import IMAGE_SIZE, hardware_skip
from photos import PHOTOS, photo_crop


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    """20 crops of each of the 16 photographs (320 files): the 3 trained ones, and 13 the model must call unknown
    or place somewhere."""
    folder = tmp_path_factory.mktemp("agreement")
    rng = np.random.default_rng(7)
    paths = []
    for k, name in enumerate(PHOTOS):
        for i in range(20):
            path = str(folder / f"{name}_{i:02d}.jpg")
            Image.fromarray(photo_crop(k, rng)).save(path, quality=int(rng.integers(70, 95)))
            paths.append(path)
    return paths


def _answers(rows):
    return [(r["label"], r.get("unknown")) for r in rows]


def _agreement(a, b) -> float:
    return float(np.mean([x == y for x, y in zip(a, b)]))


def _server_answers(model_path: str, paths: list[str], log_path) -> tuple[list, float]:
    """(answers of a real `transferkit serve` process, seconds until it answered /healthz)."""
    started = time.perf_counter()
    proc, url, log = start_server([model_path], log_path, timeout=180)
    try:
        ready = time.perf_counter() - started
        answers = []
        for start in range(0, len(paths), 32):
            reply = post_images(url, *paths[start:start + 32])
            assert reply.status_code == 200, reply.text
            answers += _answers(reply.json()["predictions"])
        return answers, ready
    finally:
        stop_server(proc, log, timeout=30)


def test_default_keras_onnx_and_server_give_the_same_answers(trained, many_photos, tmp_path):
    model_path = trained[0]["model_path"]
    first = _answers(transferkit.predict(model_path, many_photos))  # first use: converts, checks, caches
    cached = transferkit.load_predictor(model_path)
    assert type(cached).__name__ == "CachedPredictor" and cached.engine.label == "openvino fp32"
    default = _answers(transferkit.predict(cached, many_photos))
    on_keras = _answers(transferkit.predict(model_path, many_photos, runtime="keras"))
    export_model(model_path, "onnx", str(tmp_path / "m.onnx"))
    onnx_ort = _answers(transferkit.predict(str(tmp_path / "m.onnx"), many_photos, runtime="onnxruntime"))
    onnx_ov = _answers(transferkit.predict(str(tmp_path / "m.onnx"), many_photos, runtime="openvino"))
    served, ready = _server_answers(model_path, many_photos, tmp_path / "serve.log")
    print(f"server ready in {ready:.1f} s on the cached model")
    assert len(default) == len(many_photos) == len(served)
    assert sum(a[1] for a in on_keras) >= 100, "most crops of untrained photographs are unknown"
    for name, other in (("first use", first), ("keras", on_keras), ("onnx/onnxruntime", onnx_ort),
                        ("onnx/openvino", onnx_ov), ("server", served)):
        assert _agreement(default, other) >= 0.999, name


def test_predict_and_serve_on_a_cached_model_never_import_tensorflow(trained, dataset):
    model_path = trained[0]["model_path"]
    photo = os.path.join(dataset[1], sorted(os.listdir(dataset[1]))[0])
    expected = transferkit.predict(model_path, [photo], runtime="keras")  # what the model file says, on Keras
    transferkit.predict(model_path, [photo])  # a first use leaves the converted engine in the cache
    rows, modules, _ = predict_in_child(model_path, photo, then="from transferkit.apps.serve import create_app\n"
                                                                f"app = create_app({model_path!r})\n")
    # nor SciPy (18 MB of the 139 MB of one cached prediction, once imported for a softmax)
    assert modules == {"tensorflow": False, "keras": False, "scipy": False}
    assert rows[0]["label"] == expected[0]["label"] and rows[0]["novelty"] == pytest.approx(
        expected[0]["novelty"], rel=1e-3)


def test_int8_training_views_report_what_evaluate_reproduces(dataset, tmp_path):
    result = transferkit.train(dataset[0], test_dir=dataset[1], image_size=IMAGE_SIZE, epochs=10, augment_views=1,
                               feature_precision="int8", out=str(tmp_path / "int8"))
    meta = modelfile.read_metadata(result["model_path"])
    check = meta["fit"]["feature_check"]
    assert meta["fit"]["feature_runtime"] == "openvino int8", "int8 passed its check on these photos"
    assert check["engine"] == "openvino int8" and check["reference"] == "openvino fp32"
    assert check["cosine"] >= 0.95 and check["label_agreement"] >= 0.9  # the gate (0.98) was on its check photos
    again = transferkit.evaluate(result["model_path"], dataset[1])
    assert again["confusion_matrix"] == result["test"]["confusion_matrix"]
    assert again["accuracy"] == result["test"]["accuracy"] >= 0.9


def test_keras_novelty_of_a_batch_equals_numpy(trained, many_photos):
    loaded = modelfile.load(trained[0]["model_path"])
    from transferkit.data.images import load_image

    images = np.stack([load_image(p, IMAGE_SIZE) for p in many_photos[::20]]).astype(np.float32)  # 16 photos
    head = loaded.keras_model.get_layer("head")
    dim = novelty.novelty_dim(head) or None  # the score reads the final features (a prefix of multi-depth ones)
    features = run_model(novelty.feature_view(loaded.keras_model), images)[:, :dim]
    whitening = head.get_layer("novelty_whiten").get_weights()[0].T
    centers = -head.get_layer("novelty_cross").get_weights()[0].T / 2
    threshold = loaded.metadata["novelty"]["threshold"]
    expected = novelty.mahalanobis(features, whitening, centers) / threshold
    got = run_model(loaded.keras_model, images)[:, -1]
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)
    assert np.std(expected) > 0.05  # distinct photos, distinct scores: a broadcast first row would fail this


def test_an_engine_on_one_thread_computes_the_same_features(many_photos):
    """train computes the test photos' features ahead on one thread (training.features.Prefetch) and evaluate
    reads them from the cache: they must be the very numbers the engine gives on every core."""
    from transferkit.data.images import load_image
    from transferkit.training.features import FeatureExtractor

    extractor = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE)
    batch = np.stack([load_image(p, IMAGE_SIZE) for p in many_photos[::10]]).astype(np.float32)
    every = extractor.forward(batch)
    if extractor.engine.respawn is None:
        hardware_skip(f"{extractor.engine.label}: no converted engine to run on fewer threads")
    one = extractor.engine.on_threads(1)
    assert one is not extractor.engine
    np.testing.assert_array_equal(one(batch), every)


def test_train_computes_test_features_ahead_and_reports_what_evaluate_reproduces(dataset, tmp_path,
                                                                                  monkeypatch):
    import shutil

    from transferkit.files import cache_dir
    from transferkit.training import features

    shutil.rmtree(cache_dir("features"), ignore_errors=True)  # a cold run (this process's private cache)
    done, stop = [], features.Prefetch.stop

    def finish_then_stop(self):  # the whole window, however slow this machine: every test photo ahead
        self._thread.join()
        stop(self)
        done.append((self.computed, self.error))

    monkeypatch.setattr(features.Prefetch, "stop", finish_then_stop)
    result = transferkit.train(dataset[0], test_dir=dataset[1], image_size=IMAGE_SIZE, epochs=10,
                               out=str(tmp_path / "ahead"))
    assert done == [(18, None)]  # the 3 x 6 test photos, computed on the one-thread engine, without error
    again = transferkit.evaluate(result["model_path"], dataset[1])  # the model file on its own engine
    assert again["confusion_matrix"] == result["test"]["confusion_matrix"]
    assert again["per_class"] == result["test"]["per_class"]
    for key in ("least_confident_correct", "most_confident_errors"):
        assert [(e["path"], e["predicted"]) for e in again[key]] == [(e["path"], e["predicted"])
                                                                      for e in result["test"][key]]
        assert [e["probability"] for e in again[key]] == pytest.approx(
            [e["probability"] for e in result["test"][key]], abs=1e-4)


def test_a_stopped_prefetch_leaves_only_right_features_in_the_cache(many_photos):
    from transferkit.training.features import FeatureExtractor, Prefetch

    extractor = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE, batch_size=8)
    paths = many_photos[1::4]  # 80 photos none of the other tests extracted here
    extractor.extract(many_photos[:8:2])  # the engine, built and checked on photos
    ahead = Prefetch(extractor, paths)
    deadline = time.monotonic() + 120
    while ahead.computed < 8 and ahead.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ahead.stop()  # after its first batch of 8 at least (or done: either way what is cached must be right)
    assert ahead.error is None and ahead.computed >= 8
    cached, kept, _ = extractor.extract(paths)
    fresh, _, _ = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE, cache=False).extract(paths)
    assert len(kept) == len(paths)
    np.testing.assert_allclose(cached, fresh, rtol=1e-5, atol=1e-5)
