import dataclasses
import functools
import io
import json
import os
import shutil

import keras
import numpy as np
import pytest
from PIL import Image

import transferkit
from transferkit.models import backbones, modelfile
from transferkit.models.backbones import build_feature_extractor
from transferkit.engines.keras_model import KerasPredictor
from transferkit.engines.keras_step import run_model
from transferkit.errors import TransferkitError
from transferkit.options import EngineOptions
from transferkit.training.features import FeatureExtractor
from transferkit.models.heads import build_head
from transferkit.data.images import load_image
from transferkit.training.callbacks import KeepBestEpoch

from conftest import CLASSES, IMAGE_SIZE, write_dataset
from photos import CHANNEL_ORDERS, PHOTOS, channel_crop, levelled_grey_crop, photo_crop, write_classes


def test_learning_happens_and_outputs_are_written(trained):
    result, out = trained
    assert result["test"]["accuracy"] >= 0.9  # chance is 1/3
    assert result["validation"]["accuracy"] >= 0.8
    for name in ("model.keras", "history.json", "history.png", "metrics.json", "confusion_matrix.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for png in ("history.png", "confusion_matrix.png"):
        with Image.open(os.path.join(out, png)) as img:
            assert img.format == "PNG" and img.size[0] > 200
    metrics = json.load(open(os.path.join(out, "metrics.json"), encoding="utf-8"))
    assert metrics["test"]["class_names"] == sorted(CLASSES)
    cm = np.array(metrics["test"]["confusion_matrix"])
    assert cm.sum() == metrics["test"]["n_images"] == 18
    assert np.trace(cm) / cm.sum() == pytest.approx(metrics["test"]["accuracy"])
    history = json.load(open(os.path.join(out, "history.json"), encoding="utf-8"))
    h = history["history"]
    best = history["best_epoch"]
    top = max(h["val_accuracy"])
    tied = [i for i, v in enumerate(h["val_accuracy"]) if v == top]
    assert best - 1 == min(tied, key=lambda i: h["val_loss"][i])  # best accuracy, ties -> lowest loss


def test_broken_preprocessing_and_random_weights_lose_the_accuracy(trained, dataset, tmp_path, monkeypatch):
    """The accuracy the tests ask for is the pretrained backbone's, seeing what it was trained on: the same run
    (same photos, options and seed) with the backbone fed images/255 (the common 0-1 scaling, in front of its own
    (x - 127) / 128) or with random weights falls to about chance on these photos, so the accuracy assertions
    above catch such a bug. Measured: correct 1.0, broken 0.33-0.44, random 0.33 (four crop seeds)."""
    correct = trained[0]["test"]["accuracy"]
    assert correct >= 0.9
    # keras runtime and no feature cache: a converted model or cached features are keyed by the backbone's name,
    # so they would be the correct model's
    # the softmax head on the final features alone: a logistic head on several depths (--head auto) reads
    # intermediate blocks too, and those still separate these three grey photographs under images/255 (0.89)
    kw = dict(test_dir=dataset[1], image_size=IMAGE_SIZE, epochs=15, augment_views=2, runtime="keras", cache=False,
              head="gap", depths=0)
    spec = backbones.get_spec("efficientnet_lite0")
    wrong = dataclasses.replace(spec, preprocess=lambda: [keras.layers.Rescaling(1 / 255, name="wrong_0_1_scaling")])
    monkeypatch.setitem(backbones.REGISTRY, "efficientnet_lite0", wrong)
    broken = transferkit.train(dataset[0], out=str(tmp_path / "broken"), **kw)
    monkeypatch.undo()
    layers = [layer.name for layer in modelfile.load(broken["model_path"]).keras_model.layers]
    assert "wrong_0_1_scaling" in layers  # the broken run did run the broken preprocessing
    random = transferkit.train(dataset[0], out=str(tmp_path / "random"), weights=None, **kw)
    print(f"test accuracy: correct {correct:.3f}, images/255 {broken['test']['accuracy']:.3f}, "
          f"random weights {random['test']['accuracy']:.3f}")
    assert broken["test"]["accuracy"] <= correct - 0.3
    assert random["test"]["accuracy"] <= correct - 0.3


def _wrong_scaling(monkeypatch):
    """Plant the fault: the backbone fed images/255 (the common 0-1 scaling, in front of its own (x - 127) / 128)."""
    spec = backbones.get_spec("efficientnet_lite0")
    wrong = dataclasses.replace(spec, preprocess=lambda: [keras.layers.Rescaling(1 / 255, name="wrong_0_1_scaling")])
    monkeypatch.setitem(backbones.REGISTRY, "efficientnet_lite0", wrong)


def test_the_default_recipe_fails_on_wrong_scaling_or_random_weights(tmp_path, monkeypatch):
    """The default recipe (head auto: gap or logistic on 0, 2 or 4 depths) on content that only a pretrained
    backbone reads: 16 classes, one photograph each, grey and levelled to one brightness and contrast, 4 training
    crops a class. Its intermediate depths still read the three grey photos above under images/255 (0.89), not
    these. Measured (three crop seeds): correct 0.91-0.98, images/255 0.43-0.49, random weights 0.06 (chance)."""
    make = {name: functools.partial(levelled_grey_crop, k) for k, name in enumerate(PHOTOS)}
    train = write_classes(tmp_path / "train", make, 4, seed=1)
    # keras runtime and no feature cache: a converted model or cached features are keyed by the backbone's name
    kw = dict(test_dir=write_classes(tmp_path / "test", make, 6, seed=2), image_size=IMAGE_SIZE, runtime="keras",
              cache=False)
    correct = transferkit.train(train, out=str(tmp_path / "correct"), **kw)["test"]["accuracy"]
    random = transferkit.train(train, out=str(tmp_path / "random"), weights=None, **kw)["test"]["accuracy"]
    _wrong_scaling(monkeypatch)
    broken = transferkit.train(train, out=str(tmp_path / "broken"), **kw)
    monkeypatch.undo()
    layers = [layer.name for layer in modelfile.load(broken["model_path"]).keras_model.layers]
    assert "wrong_0_1_scaling" in layers  # the broken run did run the broken preprocessing
    print(f"16 grey classes, test accuracy: correct {correct:.3f}, images/255 {broken['test']['accuracy']:.3f}, "
          f"random weights {random:.3f}")
    assert correct >= 0.85  # chance is 1/16
    assert broken["test"]["accuracy"] <= correct - 0.35
    assert random <= 0.25


def _accuracy(rows: list[dict]) -> float:
    return float(np.mean([r["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows]))


def test_the_default_recipe_fails_on_a_red_blue_swap_when_predicting(tmp_path, monkeypatch):
    """Colour decides these classes (one colour photograph with its channels in three orders): the default recipe
    learns them, and the same model predicting through a decoder that hands it BGR (OpenCV's order) gets the
    natural and swapped photos backwards. Random weights lose them too. Measured (two runs): correct 0.89,
    BGR at prediction 0.11-0.28, random weights 0.33 (chance)."""
    from transferkit.engines import predict as engine

    make = {name: functools.partial(channel_crop, name) for name in CHANNEL_ORDERS}
    train, test = write_classes(tmp_path / "train", make, 16, seed=1), write_classes(tmp_path / "test", make, 6, seed=2)
    kw = dict(test_dir=test, image_size=IMAGE_SIZE, runtime="keras", cache=False)
    model = transferkit.train(train, out=str(tmp_path / "run"), **kw)["model_path"]
    random = transferkit.train(train, out=str(tmp_path / "random"), weights=None, **kw)["test"]["accuracy"]
    correct = _accuracy(transferkit.predict(model, [test], runtime="keras", reject=False))
    real = engine.decode_batch

    def bgr(paths, size, pool):
        arrays, reasons = real(paths, size, pool)
        return [None if a is None else np.ascontiguousarray(a[..., ::-1]) for a in arrays], reasons

    monkeypatch.setattr(engine, "decode_batch", bgr)  # plant the fault: prediction only, training was right
    swapped = _accuracy(transferkit.predict(model, [test], runtime="keras", reject=False))
    monkeypatch.undo()
    print(f"colour classes, accuracy: correct {correct:.3f}, BGR at prediction {swapped:.3f}, random {random:.3f}")
    assert correct >= 0.8  # chance is 1/3
    assert swapped <= correct - 0.4
    assert random <= correct - 0.4


def test_model_file_carries_class_names_size_and_metadata(trained, dataset):
    result, out = trained
    model = transferkit.load_model(os.path.join(out, "model.keras"))
    assert model.class_names == sorted(CLASSES)
    assert model.image_size == IMAGE_SIZE
    assert model.metadata["backbone"] == "efficientnet_lite0"
    assert model.metadata["transferkit_version"] == transferkit.__version__
    assert model.metadata["validation"]["accuracy"] == result["validation"]["accuracy"]
    # evaluation of the saved file agrees with the cached-feature path used during training
    metrics = transferkit.evaluate(model, dataset[1])
    assert metrics["confusion_matrix"] == result["test"]["confusion_matrix"]
    # plain Keras can open the same file (metadata rides beside, not inside, the model config)
    plain = keras.models.load_model(os.path.join(out, "model.keras"), compile=False)
    assert plain.output.shape[-1] == len(CLASSES) + 1  # the probabilities, then the novelty score


def test_reloaded_file_predicts_exactly_like_the_in_memory_model(tmp_path, dataset):
    keras.utils.set_random_seed(0)  # the same head whatever ran before (float rounding differs per head)
    extractor = build_feature_extractor("efficientnet_lite0", IMAGE_SIZE)
    head = build_head("gap", extractor.output.shape[1:], 3)
    model = modelfile.assemble(extractor, head)
    path = modelfile.save(model, str(tmp_path / "m.keras"), {"class_names": ["a", "b", "c"], "image_size": IMAGE_SIZE})
    loaded = KerasPredictor.from_file(path, EngineOptions(runtime="keras"))
    folder = os.path.join(dataset[1], CLASSES[0])
    images = np.stack([load_image(os.path.join(folder, f), IMAGE_SIZE) for f in sorted(os.listdir(folder))])
    # the same compiled step on both sides (a batch of another size rounds differently, by ~1e-6)
    np.testing.assert_allclose(loaded.predict_images(images), run_model(model, images), atol=1e-6)
    # a photo of another size goes through the model's own resize layer
    assert loaded.keras_model.predict(np.zeros((1, 100, 37, 3), np.float32), verbose=0).shape == (1, 3)


def test_model_file_is_written_atomically(tmp_path):
    extractor = build_feature_extractor("efficientnet_lite0", 32)
    model = modelfile.assemble(extractor, build_head("gap", extractor.output.shape[1:], 2))
    target = tmp_path / "m.keras"
    target.write_bytes(b"previous model")
    with pytest.raises(TypeError):
        modelfile.save(model, str(target), {"not json": object()})
    assert target.read_bytes() == b"previous model"  # untouched by the failed save
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]  # no temporary file left behind
    with pytest.raises(TransferkitError, match="not a .keras model file"):
        modelfile.load(str(target))


def test_frozen_backbone_batchnorm_stays_in_inference_mode():
    extractor = build_feature_extractor("efficientnet_lite0", 32)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    before = [w.numpy().copy() for w in extractor.weights]
    np.testing.assert_allclose(extractor(x, training=True), extractor(x, training=False), atol=1e-5)
    for a, b in zip(before, extractor.weights):
        np.testing.assert_array_equal(a, b.numpy())  # moving statistics did not move


def test_same_seed_same_split_same_metrics(dataset, tmp_path):
    kw = dict(image_size=IMAGE_SIZE, epochs=4, augment_views=1)
    a = transferkit.train(dataset[0], out=str(tmp_path / "a"), seed=3, **kw)
    b = transferkit.train(dataset[0], out=str(tmp_path / "b"), seed=3, **kw)
    ha = json.load(open(tmp_path / "a" / "history.json"))["history"]
    hb = json.load(open(tmp_path / "b" / "history.json"))["history"]
    assert ha == hb
    assert a["validation"] == b["validation"]


def _cache_files(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_feature_cache_reused_and_invalidated_by_content(tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = shutil.copytree(dataset[1], tmp_path / "data")
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    fx = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE)
    first, kept, skipped = fx.extract(paths, views=2)
    assert first.shape == (len(paths), 3, 1280) and not skipped
    files = _cache_files(fx.cache_root)
    assert len(files) == 3 * len(paths)
    again, _, _ = fx.extract(paths, views=2)
    np.testing.assert_array_equal(first, again)
    assert _cache_files(fx.cache_root) == files  # nothing recomputed or rewritten
    # views differ from each other and from the original
    assert not np.allclose(first[:, 0], first[:, 1]) and not np.allclose(first[:, 1], first[:, 2])
    # change one file's content: only its entries are new
    Image.fromarray(photo_crop(1, np.random.default_rng(99))).save(paths[0], "JPEG")
    changed, _, _ = fx.extract(paths, views=2)
    after = _cache_files(fx.cache_root)
    assert len(after) == len(files) + 3
    assert not np.allclose(changed[0], first[0]) and np.array_equal(changed[1:], first[1:])
    # a damaged cache entry is recomputed, not trusted
    victim = next(iter(after))
    with open(victim, "wb") as f:
        f.write(b"garbage")
    repaired, _, _ = fx.extract(paths, views=2)
    np.testing.assert_allclose(repaired, changed, atol=1e-4)  # recomputed alone: batch-size rounding only


def test_bad_files_are_skipped_and_reported_never_crash(tmp_path):
    root = write_dataset(tmp_path / "data", 8, seed=5, classes=["bon", "mauvais"])
    buf = io.BytesIO()
    Image.fromarray(photo_crop(0, np.random.default_rng(1))).save(buf, "JPEG")
    (tmp_path / "data" / "bon" / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    (tmp_path / "data" / "bon" / "zero.jpg").write_bytes(b"")
    (tmp_path / "data" / "mauvais" / "readme.jpg").write_text("this is text")
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(tmp_path / "data" / "bon" / "cmyk.jpg")
    Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)).save(tmp_path / "data" / "mauvais" / "deep.png")
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "data" / "mauvais" / "alpha.png")
    result = transferkit.train(root, image_size=IMAGE_SIZE, epochs=2, augment_views=0, out=str(tmp_path / "run"))
    reasons = {os.path.basename(s["path"]): s["reason"] for s in result["skipped"]}
    assert set(reasons) == {"truncated.jpg", "zero.jpg", "readme.jpg"}
    assert "truncated image" in reasons["truncated.jpg"] and reasons["zero.jpg"] == "empty file"
    saved = json.load(open(tmp_path / "run" / "metrics.json", encoding="utf-8"))
    assert {os.path.basename(s["path"]) for s in saved["skipped"]} == set(reasons)
    rows = transferkit.predict(result["model_path"], [str(tmp_path / "data" / "bon")])
    assert {r["path"].rsplit("/", 1)[-1]: r.get("error") for r in rows if r.get("error")}.keys() == {"truncated.jpg", "zero.jpg"}


def test_empty_class_is_a_clear_error(tmp_path):
    root = write_dataset(tmp_path / "data", 4, seed=5, classes=["plein", "vide"])
    for f in (tmp_path / "data" / "vide").iterdir():
        f.write_text("broken")
    with pytest.raises(TransferkitError, match="class 'vide' has no readable images"):
        transferkit.train(root, image_size=IMAGE_SIZE, epochs=1, out=str(tmp_path / "run"))


def test_missing_monitored_metric_fails_loudly():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(TransferkitError, match="metric 'val_acc' not in training logs"):
        model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0, callbacks=[KeepBestEpoch("val_acc")])


def test_flatten_head_option_trains(dataset, tmp_path):
    result = transferkit.train(dataset[0], image_size=IMAGE_SIZE, epochs=3, augment_views=0, head="flatten-256-128",
                               out=str(tmp_path / "run"))
    model = transferkit.load_model(result["model_path"])
    assert model.metadata["training"]["head"] == "flatten-256-128"
    # every test photo, its folder its class; reject=False: the head's answer, even for a photo it finds novel
    rows = transferkit.predict(model, [dataset[1]], reject=False)
    correct = sum(r["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    # measured 18 of 18 (3 epochs); a model answering at random passes 16 of 18 with P(Binomial(18, 1/3) >= 16)
    # = 1.7e-6, one answering one class gets 6
    assert len(rows) == 18 and correct >= 16, correct


def test_head_fit_honours_class_weights():
    """A class weighted 0 contributes no loss, so the head never learns it; unweighted, it is learned."""
    from transferkit.training.head import fit_head

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    y = np.repeat(np.arange(3), 40)
    x = (centres[y] + rng.normal(size=(120, 16))).astype("float32")

    def class0_recall(class_weight):
        keras.utils.set_random_seed(0)
        head = build_head("gap", (16,), 3, dropout=0.0)
        fit_head(head, x, y, x[:30], y[:30], epochs=15, batch_size=16, learning_rate=1e-2,
                  class_weight=class_weight, seed=0, callbacks=[])
        return float(np.mean(np.argmax(head.predict(x[y == 0], verbose=0), axis=1) == 0))

    assert class0_recall(None) >= 0.9
    assert class0_recall({0: 0.0, 1: 1.0, 2: 1.0}) <= 0.1
