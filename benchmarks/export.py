"""Images/second of a model file vs its ONNX exports (fp32 and int8), batch 1 and 32, plus the int8 top-1
agreement with Keras on a folder of real photos.

    python benchmarks/export.py MODEL --photos DIR [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from transferkit.export import calibration_images, export_model  # noqa: E402
from transferkit.api import load_model  # noqa: E402


def images_per_second(model, batch: np.ndarray, seconds: float) -> float:
    model.predict_images(batch)
    model.predict_images(batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.predict_images(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--photos", required=True, help="real photos: int8 calibration and the agreement check")
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="tk-export-bench-")
    keras_model = load_model(args.model, runtime="keras")
    size = keras_model.image_size
    photos = calibration_images(args.photos, size, limit=10_000)
    fp32, int8 = os.path.join(work, "fp32.onnx"), os.path.join(work, "int8.onnx")
    export_model(args.model, "onnx", fp32)
    export_model(args.model, "onnx", int8, quantize="int8", calibration=args.photos)
    models = {"keras (compiled predict step)": keras_model, "onnxruntime fp32": load_model(fp32),
              "onnxruntime int8": load_model(int8)}
    reference = np.concatenate([keras_model.predict_images(photos[i:i + 32]) for i in range(0, len(photos), 32)])
    print(f"cpu cores: {os.cpu_count()}  image size {size}  {len(photos)} photos")
    print(f"{'runtime':<32} {'batch 1 img/s':>14} {'batch 32 img/s':>15} {'top-1 agreement':>16} {'max abs diff':>13}")
    for name, model in models.items():
        got = np.concatenate([model.predict_images(photos[i:i + 32]) for i in range(0, len(photos), 32)])
        agree = float((got.argmax(1) == reference.argmax(1)).mean())
        b1 = images_per_second(model, photos[:1], args.seconds)
        b32 = images_per_second(model, np.resize(photos, (32,) + photos.shape[1:]), args.seconds)
        print(f"{name:<32} {b1:>14.1f} {b32:>15.1f} {agree:>16.4f} {np.abs(got - reference).max():>13.5f}", flush=True)


if __name__ == "__main__":
    main()
