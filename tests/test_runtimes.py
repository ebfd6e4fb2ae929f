import keras
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import transferkit
from transferkit.engines import runtimes
from transferkit.models.backbones import build_feature_extractor, imagenet_classifier
from transferkit.errors import TransferkitError
from transferkit.training.features import FeatureExtractor
from transferkit.engines.keras_step import run_model, without_resize

from conftest import hardware_skip, require

SIZE = 96
CAT = {281, 282, 285}  # tabby, tiger cat, Egyptian cat: chelsea
CUP = {504, 505, 967, 968}  # coffee mug, coffeepot, espresso, cup: coffee


@pytest.fixture(scope="module")
def photos():
    pics = (skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket(), skdata.immunohistochemistry())
    return np.stack([np.asarray(Image.fromarray(p).resize((SIZE, SIZE))) for p in pics]).astype("float32")


@pytest.fixture(scope="module")
def reference(photos):
    extractor = without_resize(build_feature_extractor("efficientnet_lite0", SIZE), SIZE)
    return extractor, run_model(extractor, photos)


@pytest.fixture(scope="module")
def imagenet():
    """Lite0's own ImageNet classifier layer (pooled features -> 1000 logits), from the same weights file: an
    anchor that does not come from the Keras features under test."""
    dense = imagenet_classifier("efficientnet_lite0").get_layer("efficientnet_lite0").get_layer("predictions")
    kernel, bias = (np.asarray(w) for w in dense.weights)
    return lambda features: features @ kernel + bias


def _names_the_photos(logits) -> bool:
    """chelsea's top class is a cat and coffee's top 5 hold a cup (what lite0 says of them at 96 px)."""
    return int(np.argmax(logits[0])) in CAT and bool(CUP & set(np.argsort(logits[1])[::-1][:5].tolist()))


PATHS = [("keras", "fp32", 0.99999), ("onnxruntime", "fp32", 0.99999), ("openvino", "fp32", 0.99999),
         ("openvino", "bf16", runtimes.MIN_COSINE)]


@pytest.mark.parametrize("runtime,precision,bound", PATHS)
def test_each_runtime_matches_keras_fp32_on_real_photos(runtime, precision, bound, photos, reference, imagenet):
    require(runtime, "a dependency of transferkit, or [fast] in [test]")
    if precision == "bf16" and not runtimes.native_bf16():
        hardware_skip("this CPU has no native bf16")
    extractor, expected = reference
    engine = runtimes.build_engine(extractor, f"test-lite0-{SIZE}", runtime, precision, check_images=photos)
    assert (engine.runtime, engine.precision) == (runtime, precision)
    got = engine(photos)
    cos = runtimes.cosine(got, expected)
    print(f"{runtime} {precision}: cosine {cos:.6f} vs keras fp32")
    assert cos >= bound
    # and what it computes is the pretrained network's features (for keras, the cosine above is 1 by
    # construction: this is its test): through lite0's ImageNet layer they name the cat and the coffee
    assert _names_the_photos(imagenet(got))


def test_the_checks_above_catch_a_preprocessing_bug(photos, reference, imagenet):
    """The same backbone with its input scaled to [0, 1] instead of [-1, 1], or fed images/255: the cosine and
    ImageNet checks above reject it (measured: cosine 0.90 and 0.06 vs the reference)."""
    extractor, expected = reference
    zero_one = run_model(extractor, photos / 255 * 128 + 127)  # the first convolution sees x / 255
    div255 = run_model(extractor, photos / 255)
    assert runtimes.cosine(zero_one, expected) < min(bound for *_, bound in PATHS)
    assert runtimes.cosine(div255, expected) < min(bound for *_, bound in PATHS)
    assert not _names_the_photos(imagenet(div255))
    assert _names_the_photos(imagenet(expected))


def test_auto_resolution_and_clear_errors():
    runtime, precision = runtimes.resolve("auto", "auto")
    assert runtime in ("openvino", "onnxruntime", "keras")
    assert precision == ("bf16" if runtime == "openvino" and runtimes.fast_bf16() else "fp32")
    with pytest.raises(TransferkitError, match="precision bf16 needs runtime openvino"):
        runtimes.resolve("onnxruntime", "bf16")
    with pytest.raises(TransferkitError, match="runtime must be one of"):
        runtimes.resolve("tensorrt", "auto")


def test_low_precision_that_drifts_falls_back_to_fp32(photos, monkeypatch, caplog):
    require("openvino", "a dependency of transferkit")
    if not runtimes.native_bf16():
        hardware_skip("needs a CPU with native bf16")
    monkeypatch.setattr(runtimes, "MIN_COSINE", 1.01)  # no bf16 result can pass: the fallback must engage
    fx = FeatureExtractor("efficientnet_lite0", SIZE, runtime="openvino", precision="bf16", cache=False)
    fx.forward(photos)
    assert fx.engine.label == "openvino fp32"
    assert "drifts from fp32" in caplog.text


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_conversion_that_disagrees_with_keras_falls_back_to_keras(runtime, photos, monkeypatch, caplog):
    require(runtime, "a dependency of transferkit, or [fast] in [test]")
    monkeypatch.setattr(runtimes, "FP32_COSINE", 1.01)  # no converted model can pass: the fallback must engage
    fx = FeatureExtractor("efficientnet_lite0", SIZE, runtime=runtime, precision="fp32", cache=False)
    features = fx.forward(photos)
    assert fx.engine.label == "keras fp32"
    assert f"{runtime} fp32 disagrees with keras" in caplog.text
    np.testing.assert_allclose(features, run_model(without_resize(fx.model, SIZE), photos),
                               rtol=1e-5, atol=1e-5)


def test_auto_keeps_keras_where_keras_measured_faster(photos, reference, monkeypatch, caplog):
    require("openvino", "a dependency of transferkit: auto's first choice")
    runtime, _ = runtimes.resolve()
    extractor, expected = reference
    # the speeds measured once per model: make Keras the faster one, as it is for MobileNetV3 on OpenVINO
    monkeypatch.setattr(runtimes, "_speeds", lambda engines, images: {
        name: 1000.0 if engine.runtime == "keras" else 10.0 for name, engine in engines.items()})
    auto = runtimes.build_engine(extractor, f"test-speed-{SIZE}", "auto", "auto", check_images=photos)
    assert auto.label == "keras fp32"
    assert "keras fp32 is faster than" in caplog.text
    # asked for by name, the runtime is used anyway; and the verdict (cached) is the same on the next run
    named = runtimes.build_engine(extractor, f"test-speed-{SIZE}", runtime, "fp32", check_images=photos)
    assert named.runtime == runtime
    monkeypatch.undo()
    again = runtimes.build_engine(extractor, f"test-speed-{SIZE}", "auto", "auto", check_images=photos)
    assert again.label == "keras fp32"


def test_random_weights_are_never_cached(photos):
    """weights=None differ in every process: a cached conversion or cached features of them would be another
    model's."""
    from transferkit.files import cache_dir

    before = set(cache_dir().rglob("*"))
    fx = FeatureExtractor("efficientnet_lite0", SIZE, weights=None, runtime="auto")
    assert fx.model_key is None and fx.cache_root is None
    fx.forward(photos)
    assert set(cache_dir().rglob("*")) == before


def test_uncached_conversions_each_run_their_own_model(photos):
    """Converted without a key (random weights), each engine computes its own model, and nothing is cached."""
    from transferkit.files import cache_dir

    require("openvino", "a dependency of transferkit: auto's first choice")
    runtime = runtimes.resolve()[0]
    before = set(cache_dir().rglob("*"))
    outputs = []
    for seed in (1, 2):  # two different small models, converted without a key: each engine runs its own
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((SIZE, SIZE, 3))
        model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3)(inputs)))
        engine = runtimes.build_engine(model, None, runtime, "fp32")
        assert engine.runtime == runtime
        outputs.append(engine(photos))
        np.testing.assert_allclose(outputs[-1], run_model(model, photos), rtol=1e-4, atol=1e-3)
    assert not np.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-3)
    assert set(cache_dir().rglob("*")) == before


def test_training_on_keras_and_auto_runtimes_agree(dataset, tmp_path):
    kw = dict(image_size=64, epochs=10, augment_views=1)
    a = transferkit.train(dataset[0], out=str(tmp_path / "keras"), runtime="keras", **kw)
    b = transferkit.train(dataset[0], out=str(tmp_path / "auto"), runtime="auto", **kw)
    ra = transferkit.predict(a["model_path"], dataset[1])
    rb = transferkit.predict(b["model_path"], dataset[1], runtime="auto")
    agreement = np.mean([x["label"] == y["label"] for x, y in zip(ra, rb)])
    assert agreement >= 0.99


def test_adapted_normalization_exports_as_constants(photos, tmp_path):
    """Keras's adapted Normalization (the stem of EfficientNet B*) used to become two extra ONNX inputs; now its
    mean and variance are constants of the graph and onnxruntime computes what Keras computes."""
    import onnxruntime as ort

    from transferkit.engines.keras_onnx import save_onnx

    norm = keras.layers.Normalization(axis=-1)
    norm.adapt(photos)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(norm(inputs)))
    expected = run_model(model, photos)
    assert np.abs(expected).max() > 0.1  # the statistics matter to the output
    save_onnx(model, tmp_path / "norm.onnx")
    session = ort.InferenceSession(str(tmp_path / "norm.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    np.testing.assert_allclose(session.run(None, {"image": photos})[0], expected, atol=1e-5)
    assert norm.mean is not norm.adapt_mean  # the layer is left as it was

    # and the registry's EfficientNetB0 now runs on the fast runtimes instead of falling back to Keras
    extractor = without_resize(build_feature_extractor("efficientnet_b0", SIZE, weights=None), SIZE)
    save_onnx(extractor, tmp_path / "effb0.onnx")
    session = ort.InferenceSession(str(tmp_path / "effb0.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]


def test_a_cap_on_onednn_instructions_changes_what_auto_chooses(monkeypatch):
    """ONEDNN_MAX_CPU_ISA (obeyed by OpenVINO's kernels) below AMX: auto no longer takes bf16, which is then
    slower than fp32 (benchmarks/precision.py: 132 vs 154 img/s), but int8 on VNNI for long runs."""
    require("openvino", "a dependency of transferkit")
    if not runtimes.cpu_has("amx_bf16"):
        hardware_skip("needs a CPU with AMX")
    assert runtimes.fast_bf16() and runtimes.resolve("auto", "auto") == ("openvino", "bf16")
    assert runtimes.training_precision("auto", "openvino", 5000) == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert not runtimes.fast_bf16() and runtimes.native_bf16()
    assert runtimes.resolve("auto", "auto") == ("openvino", "fp32")
    expected = "int8" if runtimes.installed("nncf") and runtimes.cpu_has("avx512_vnni") else "fp32"
    assert runtimes.training_precision("auto", "openvino", 5000) == expected
    assert runtimes.training_precision("auto", "openvino", 500) == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert not runtimes.native_bf16() and not runtimes.cpu_has("avx512_vnni")
