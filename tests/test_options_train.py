"""Options of ``train`` that no other test would see ignored: ``--dropout``, ``--learning-rate``, ``--keep-known``,
``--class-weight none``, ``--label-sep``, ``--weights``, ``--precision``.

One real ``transferkit train`` child takes them all (what reaches the model file), and the classifier's own
stages (prepare, features from the cache, head) are run here once per option, each against a baseline that differs
in that option only, so that each effect is the option's: on a folder of 20 / 20 / 5 photos (imbalanced, so that
class weights matter)."""

import csv
import os
import re
import shutil

import numpy as np
import pytest

from children import run_cli
from conftest import CLASSES, IMAGE_SIZE, write_dataset

COMMON = dict(image_size=IMAGE_SIZE, head="gap", epochs=6, patience=50)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    root = tmp_path_factory.mktemp("imbalanced")
    data = write_dataset(root / "data", 20, seed=71)
    small = os.path.join(data, CLASSES[2])
    for name in sorted(os.listdir(small))[5:]:
        os.remove(os.path.join(small, name))
    return data


@pytest.fixture(scope="module")
def cli_run(imbalanced, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-options")
    done = run_cli("train", imbalanced, "--image-size", IMAGE_SIZE, "--head", "gap", "--epochs", 6, "--patience", 50,
                   "--dropout", 0.5, "--learning-rate", 0.05, "--keep-known", 0.5, "--class-weight", "none",
                   "--label-sep", ";", "--precision", "bf16", "--out", out)
    return str(out), done


@pytest.fixture(scope="module")
def fitted(imbalanced, cli_run, tmp_path_factory):
    """name -> (classifier after prepare, features and head, its features): the baseline (the defaults but for
    COMMON) and one variant per option. The features come from the cache the command filled (fp32)."""
    from transferkit.classifier import ImageClassifier

    found = {}
    for name, changes in (("base", {}), ("lr", {"learning_rate": 0.05}), ("none", {"class_weight": "none"}),
                          ("keep", {"keep_known": 0.5}), ("dropout", {"dropout": 0.5})):
        clf = ImageClassifier(**COMMON, **changes)
        clf.prepare(imbalanced, out=str(tmp_path_factory.mktemp(name)))
        features = clf.extract_features()
        clf.fit_head(features)
        found[name] = clf, features
    return found


def _layer(model, name):
    """The layer ``name`` anywhere inside ``model`` (nested models searched)."""
    for layer in model.layers:
        if layer.name == name:
            return layer
        if hasattr(layer, "layers"):
            inner = _layer(layer, name)
            if inner is not None:
                return inner
    return None


def test_the_command_carries_every_option_into_the_model_file(cli_run):
    from transferkit.models import modelfile
    from transferkit.options import EngineOptions

    out, done = cli_run
    meta = modelfile.read_metadata(os.path.join(out, "model.keras"))
    given = {"dropout": 0.5, "learning_rate": 0.05, "keep_known": 0.5, "class_weight": "none", "label_sep": ";",
             "precision": "bf16", "head": "gap", "epochs": 6, "patience": 50, "image_size": IMAGE_SIZE}
    assert {k: meta["training"][k] for k in given} == given
    assert meta["novelty"]["keep_known"] == 0.5
    model = modelfile.load(os.path.join(out, "model.keras")).keras_model
    assert _layer(model, "head_dropout").rate == pytest.approx(0.5)
    # --precision: the validation photos (every reported metric) went through the bf16 engine, not the default's
    found = re.search(r"(\d+) train x 1 views \((\w+)\), (\d+) validation \((\w+)\)", done.stderr)
    assert found and found.group(4) == "bf16" != EngineOptions().precision, done.stderr[-2000:]


def test_dropout_is_the_rate_of_the_heads_dropout_layer(fitted):
    base, dropout = fitted["base"][0], fitted["dropout"][0]
    assert _layer(base.model_, "head_dropout").rate == pytest.approx(0.2)
    assert _layer(dropout.model_, "head_dropout").rate == pytest.approx(0.5)
    # the softmax head's own fit has no dropout (its L2 instead): the same curves, which also shows the fits are
    # deterministic, so that a difference below is the option's
    assert dropout.history_ == base.history_


def test_learning_rate_reaches_the_heads_fit(fitted):
    base, lr, dropout = fitted["base"][0], fitted["lr"][0], fitted["dropout"][0]
    print(f"\nfirst-epoch training loss at learning rate 1e-3: {base.history_['loss'][0]:.4f}, at 0.05: "
          f"{lr.history_['loss'][0]:.4f}")
    assert lr.history_["loss"][0] != pytest.approx(base.history_["loss"][0], rel=1e-3)
    assert dropout.history_["loss"] == base.history_["loss"]


def test_class_weight_none_drops_the_balanced_weights(fitted):
    from transferkit.engines.keras_step import run_model

    base, features = fitted["base"]
    none = fitted["none"][0]
    y = base.data_.y_train
    counts = np.bincount(y, minlength=3)
    expected = {k: len(y) / (3 * counts[k]) for k in range(3)}  # inverse frequency, scikit-learn's "balanced"
    assert dict(zip(base.classes_, counts.tolist())) == {CLASSES[0]: 16, CLASSES[1]: 16, CLASSES[2]: 4}
    assert base._trainer.class_weights() == pytest.approx(expected)
    assert none._trainer.class_weights() is None
    # the head's fit weighs the small class 4x as much with "balanced": it gets more probability on every photo
    small = base.classes_.index(CLASSES[2])
    mean_small = {name: float(run_model(fitted[name][0].head_, features.x_val)[:, small].mean())
                  for name in ("base", "none")}
    print(f"\nmean probability of the small class on validation: balanced {mean_small['base']:.4f}, "
          f"none {mean_small['none']:.4f}")
    assert mean_small["base"] > mean_small["none"]


def test_keep_known_sets_the_unknown_threshold(fitted):
    """The threshold keeps ``keep_known`` of the known photos' novelty scores: half of them with 0.5. What the
    model answers on its validation photos (novelty over threshold > 1: unknown) is counted here."""
    shares = {}
    for name in ("base", "keep"):
        clf = fitted[name][0]
        rows = clf.predict(clf.data_.val_paths, top_k=1)
        shares[name] = float(np.mean([not r["unknown"] for r in rows]))
        assert shares[name] == pytest.approx(clf.novelty_["validation_kept"])
        assert clf.novelty_["keep_known"] == {"base": 0.95, "keep": 0.5}[name]
    base, keep = fitted["base"][0].novelty_, fitted["keep"][0].novelty_
    print(f"\nthreshold at keep_known 0.95: {base['threshold']:.2f}, at 0.5: {keep['threshold']:.2f}; validation "
          f"photos kept: {shares['base']:.2f}, {shares['keep']:.2f}")
    assert keep["threshold"] < base["threshold"] and shares["keep"] < shares["base"]
    assert 0.2 <= shares["keep"] <= 0.8


def test_label_sep_splits_a_multi_label_cell(tmp_path, dataset):
    from transferkit.classifier import ImageClassifier

    photos = sorted(os.path.join(d, f) for d, _, fs in os.walk(dataset[0]) for f in fs)[::2]  # 24
    os.makedirs(tmp_path / "images")
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for i, path in enumerate(photos):
            shutil.copy(path, tmp_path / "images" / f"{i}.jpg")
            writer.writerow([f"images/{i}.jpg", ["a;b", "b", "c;a", "c"][i % 4]])
    clf = ImageClassifier(multi_label=True, label_sep=";", image_size=IMAGE_SIZE)
    clf.prepare(str(labels), out=str(tmp_path / "run"))
    assert clf.classes_ == ["a", "b", "c"]
    y = np.concatenate([clf.data_.y_train, clf.data_.y_val])
    assert y.shape == (24, 3) and np.bincount(y.sum(axis=1).astype(int)).tolist() == [0, 12, 12]  # half the
    # cells name one label, half two
    assert y.sum(axis=0).tolist() == [12, 12, 12]  # a: "a;b" and "c;a"; b: "a;b" and "b"; c: "c;a" and "c"


def test_weights_file_is_the_backbone_the_features_come_from(fitted, tmp_path):
    """``--weights PATH`` (a ``.npz`` of the converted Lite0 arrays, as backbones.lite_weights caches them) with
    the stem convolution's kernel halved: the backbone holds that kernel, and the features differ."""
    from transferkit.classifier import ImageClassifier
    from transferkit.models.backbones import find_backbone, lite_weights
    from transferkit.models.efficientnet_lite import pretrained_weights_file

    arrays = lite_weights("efficientnet_lite0", pretrained_weights_file("efficientnet_lite0"))
    stem = next(name for name in arrays if "stem" in name and "conv" in name)
    arrays[stem] = [arrays[stem][0] * 0.5] + arrays[stem][1:]
    path = tmp_path / "halved.npz"
    np.savez(path, **{f"{layer}/{i}": a for layer, items in arrays.items() for i, a in enumerate(items)})

    base, features = fitted["base"]
    clf = ImageClassifier(**COMMON, weights=str(path), runtime="keras")  # Keras: no engine to convert
    clf.prepare(base.data_.root, out=str(tmp_path / "run"))
    mine = clf.extract_features()
    backbone = find_backbone(clf._state.extractor.model)
    assert np.array_equal(backbone.get_layer(stem).get_weights()[0], arrays[stem][0])
    assert mine.val_paths == features.val_paths
    cosine = float(np.mean(np.sum(mine.x_val * features.x_val, 1) / np.linalg.norm(mine.x_val, axis=1)
                           / np.linalg.norm(features.x_val, axis=1)))
    print(f"\nmean feature cosine, halved stem vs ImageNet weights: {cosine:.4f}")
    assert cosine < 0.99
