"""quality: multi-depth features and a head chosen on validation (issue quality), on real photos.

- multi-depth features are cached (one entry per image, view and depth set) and reused, and the final features
  are their prefix (what a head on fewer depths reads);
- a logistic head on several depths is saved in the one `.keras` file as Keras layers: the same probabilities and
  unknown scores after load, and after ONNX export;
- `--head auto` (the default) records the table it chose from; `refit` is recorded.
"""

import os

import numpy as np
import pytest

import transferkit
from transferkit.data.folders import scan_folder
from transferkit.data.images import load_image
from transferkit.engines.keras_step import run_model
from transferkit.export import export_model
from transferkit.files import cache_dir
from transferkit.models import modelfile
from transferkit.training.features import FeatureExtractor

from conftest import IMAGE_SIZE


def _cached_files() -> set:
    return set(cache_dir("features").rglob("*.npy"))


def test_multi_depth_features_are_cached_reused_and_extend_the_final_ones(dataset):
    paths = scan_folder(dataset[1]).paths[:6]
    before = _cached_files()
    deep = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE, depths=2, runtime="keras")
    first, kept, _ = deep.extract(paths, 1)
    written = _cached_files() - before
    assert first.shape == (6, 2, 1280 + 320 + 192) and len(written) == 12  # 6 images x 2 views, one file each
    assert all("+d2" in str(p) for p in written)
    mtimes = {p: p.stat().st_mtime_ns for p in written}
    again, _, _ = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE, depths=2, runtime="keras").extract(paths, 1)
    assert _cached_files() - before == written and all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    np.testing.assert_array_equal(first, again)
    final, _, _ = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE, runtime="keras", cache=False).extract(paths, 0)
    np.testing.assert_allclose(first[:, 0, :1280], final[:, 0], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def logistic_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("logistic")
    result = transferkit.train(dataset[0], test_dir=dataset[1], image_size=IMAGE_SIZE, augment_views=1,
                               head="logistic", depths=2, out=str(out))
    return result, out


def _standardises_the_training_features(clf, standardise, dataset):
    """The head's frozen standardisation holds the training features' mean and variance: the training photos'
    features (what the head reads, from the model's own layers) come out of it centred with unit spread (the
    layer's defaults, mean 0 and variance 1, leave them at a median |mean| / SD of about 1)."""
    from transferkit.data.folders import split_training_folder
    from transferkit.models.novelty import feature_view

    assert not standardise.trainable
    _, _, mean, variance = (np.asarray(w, np.float64) for w in standardise.get_weights())
    options = clf.metadata["training"]
    split = split_training_folder(dataset[0], options["val_split"], options["seed"])
    images = np.stack([load_image(p, IMAGE_SIZE) for p in split.train_paths]).astype(np.float32)
    features = np.asarray(feature_view(clf.model_)(images), np.float64)[:, : len(mean)]
    z = (features - mean) / np.sqrt(variance + standardise.epsilon)
    spread = features.std(axis=0) > 1e-6  # columns that vary on these photos
    centre, scale = np.median(np.abs(z.mean(axis=0))[spread]), np.median(z.std(axis=0)[spread])
    raw = np.median((np.abs(features.mean(axis=0)) / np.maximum(features.std(axis=0), 1e-12))[spread])
    print(f"\nstandardised training features: median |mean| {centre:.3f}, median SD {scale:.3f} (unstandardised: "
          f"median |mean| / SD {raw:.3f})")
    assert centre < 0.25 and 0.6 < scale < 1.5


def test_logistic_multi_depth_head_is_one_model_file_and_exports(logistic_run, dataset, tmp_path):
    result, _ = logistic_run
    assert result["test"]["accuracy"] >= 0.9 and result["head_choice"]["chosen"]["head"] == "logistic"
    clf = transferkit.ImageClassifier.load(result["model_path"], runtime="keras")
    head = clf.model_.get_layer("head")
    _standardises_the_training_features(clf, head.get_layer("head_body").get_layer("head_standardise"), dataset)
    assert head.input.shape[-1] == 1280 + 320 + 192
    assert head.get_layer("novelty_final").output.shape[-1] == 1280  # the score reads the final features
    paths = scan_folder(dataset[1]).paths + scan_folder(dataset[0]).paths[:6]
    images = np.stack([load_image(p, IMAGE_SIZE) for p in paths]).astype(np.float32)
    loaded = run_model(modelfile.load(result["model_path"]).keras_model, images)
    assert loaded.shape == (len(paths), 4)
    np.testing.assert_allclose(clf.predict_images(images), loaded, rtol=1e-5, atol=1e-5)
    export_model(result["model_path"], "onnx", str(tmp_path / "m.onnx"))
    exported = transferkit.load_model(str(tmp_path / "m.onnx")).predict_images(images)
    np.testing.assert_allclose(exported[:, :3], loaded[:, :3], atol=1e-4)
    np.testing.assert_allclose(exported[:, 3], loaded[:, 3], rtol=1e-4, atol=1e-4)
    again = transferkit.evaluate(result["model_path"], dataset[1])
    assert again["confusion_matrix"] == result["test"]["confusion_matrix"]


def test_auto_head_records_its_choice_and_refit_is_recorded(trained, dataset, tmp_path):
    result, _ = trained  # the shared run trains with the defaults: head auto
    choice = modelfile.read_metadata(result["model_path"])["fit"]["head_choice"]
    names = [(c["head"], c["depths"], c["views"]) for c in choice["candidates"]]
    assert names[0] == ("gap", 0, True) and ("logistic", 4, False) in names and len(names) == 7
    best = max(c["val_accuracy"] for c in choice["candidates"])
    assert choice["chosen"]["val_accuracy"] == best and choice["refit"] is False
    refit = transferkit.train(dataset[0], image_size=IMAGE_SIZE, augment_views=0, head="logistic", refit=True,
                              out=str(tmp_path / "refit"))
    assert refit["head_choice"]["refit"] is True
    assert os.path.exists(refit["model_path"])
