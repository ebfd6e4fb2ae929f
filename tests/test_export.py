import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import transferkit
from transferkit.errors import TransferkitError
from transferkit.export import export_model
from transferkit.data.images import load_image

from conftest import CLASSES, IMAGE_SIZE


@pytest.fixture(scope="module")
def images(dataset):
    """Real photos (scikit-image) and the test set, at the model's size, as the exported models take them."""
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(dataset[1]) for f in fs)
    photos = [np.asarray(Image.fromarray(p).resize((IMAGE_SIZE, IMAGE_SIZE))) for p in
              (skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket())]
    return np.stack([load_image(p, IMAGE_SIZE) for p in paths] + photos).astype("float32")


@pytest.fixture(scope="module")
def reference(trained, images):
    model = transferkit.load_model(trained[0]["model_path"], runtime="keras")
    return model.predict_images(images)


def _tflite_run(path, x):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    it = Interpreter(model_path=path)
    index = it.get_input_details()[0]["index"]
    it.resize_tensor_input(index, x.shape)
    it.allocate_tensors()
    it.set_tensor(index, x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def _onnx_run(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _saved_model_run(path, x):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)  # keep a reference: its variables die with it
    return loaded.serve(x).numpy()


RUNNERS = {"onnx": (_onnx_run, ".onnx"), "tflite": (_tflite_run, ".tflite"), "saved_model": (_saved_model_run, "")}


@pytest.mark.parametrize("fmt", list(RUNNERS))
def test_float_export_matches_keras(fmt, trained, images, reference, tmp_path):
    run, ext = RUNNERS[fmt]
    out = str(tmp_path / f"model{ext}")
    export_model(trained[0]["model_path"], fmt, out)
    got = run(out, images)
    assert np.abs(got - reference).max() < 1e-4
    labels = os.path.join(out, "labels.txt") if fmt == "saved_model" else str(tmp_path / "model.labels.txt")
    assert open(labels, encoding="utf-8").read().splitlines() == sorted(CLASSES)


# largest |probability difference| vs Keras fp32 on the 22 images; measured 0.0047, 0.040, 0.0002, 0.0004 (Xeon
# with AVX-512 VNNI); the bounds leave room for other CPUs' int8 kernels, far below what a broken scale gives
QUANTIZED = [("onnx", "int8", 0.05), ("tflite", "int8", 0.1), ("onnx", "float16", 0.005), ("tflite", "float16", 0.005)]


@pytest.mark.parametrize("fmt,quantize,max_diff", QUANTIZED)
def test_quantized_export_agrees_on_top1(fmt, quantize, max_diff, trained, dataset, images, reference, tmp_path):
    run, ext = RUNNERS[fmt]
    out = str(tmp_path / f"model{ext}")
    export_model(trained[0]["model_path"], fmt, out, quantize=quantize, calibration=dataset[0])
    got = run(out, images)
    agreement = float((got.argmax(1) == reference.argmax(1)).mean())
    diff = float(np.abs(got - reference).max())
    print(f"{fmt} {quantize}: top-1 agreement {agreement:.3f} on {len(images)} images, max abs diff {diff:.4f}")
    assert agreement >= 0.99
    assert diff <= max_diff
    meta = json.load(open(tmp_path / "model.json", encoding="utf-8"))
    assert meta["export"]["quantize"] == quantize and meta["class_names"] == sorted(CLASSES)


def test_predict_with_onnx_without_tensorflow(trained, dataset, tmp_path):
    out = str(tmp_path / "model.onnx")
    subprocess.run([sys.executable, "-m", "transferkit", "export", trained[0]["model_path"], "--format", "onnx",
                    "--out", out], check=True, capture_output=True, timeout=300)
    keras_rows = transferkit.predict(trained[0]["model_path"], [dataset[1]])
    code = ("import sys, json; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
            "from transferkit.apps.cli import main\n"
            f"sys.exit(main(['predict', {out!r}, {dataset[1]!r}, '--format', 'json']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    onnx_rows = json.loads(proc.stdout)
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in keras_rows]
    for a, b in zip(onnx_rows, keras_rows):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)
    metrics = transferkit.evaluate(out, dataset[1])  # evaluation takes the ONNX file too
    assert metrics["n_images"] == 18


def test_export_errors_are_clear(trained, tmp_path):
    with pytest.raises(TransferkitError, match="not available for saved_model"):
        export_model(trained[0]["model_path"], "saved_model", str(tmp_path / "sm"), quantize="int8")
    with pytest.raises(TransferkitError, match="calibration"):
        export_model(trained[0]["model_path"], "onnx", str(tmp_path / "m.onnx"), quantize="int8",
                     calibration=str(tmp_path / "nowhere"))
