"""Feature-extraction speed of each engine and precision, and what the precision changes, on real photos.

    python benchmarks/precision.py [--backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2]

For each backbone (offline weights) at its default size: img/s (batch 32, best of 3) of Keras fp32 and of
OpenVINO fp32 / bf16 / int8 (NNCF, calibrated on 64 training crops) and onnxruntime fp32 where installed; the
mean feature cosine vs Keras fp32 on held-out crops; and the label agreement with fp32 of a logistic-regression
head trained on fp32 features (8 classes of scikit-image photo crops, 24 train / 24 test each). The last column is
what `feature_precision=auto` and `--precision` act on: a lower precision is only used where it passes its check.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TRANSFERKIT_CACHE_DIR", tempfile.mkdtemp(prefix="tk-bench-precision-"))

import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from make_photo_dataset import PHOTOS, crop  # noqa: E402
from transferkit.engines import runtimes  # noqa: E402
from transferkit.engines.keras_step import run_model, without_resize  # noqa: E402
from transferkit.models.backbones import build_feature_extractor, get_spec  # noqa: E402


def photos(size: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, load in enumerate(PHOTOS.values()):
        photo = load()
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        for _ in range(per_class):
            images.append(np.asarray(crop(photo, rng).resize((size, size))))
            labels.append(k)
    return np.stack(images).astype(np.float32), np.asarray(labels)


def speed(engine, batch: np.ndarray) -> float:
    engine(batch)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        engine(batch)
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def rows(name: str):
    size = get_spec(name).default_size
    model = without_resize(build_feature_extractor(name, size), size)
    x_train, y_train = photos(size, 24, seed=1)
    x_test, _ = photos(size, 24, seed=2)
    reference = run_model(model, x_test)
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(run_model(model, x_train), y_train)
    labels = head.predict(reference)
    keras_engine = runtimes.Engine("keras", "fp32", lambda x: run_model(model, x))
    yield "keras", "fp32", speed(keras_engine, x_test[:32]), 1.0, 1.0
    key = f"bench-precision-{name}-{size}px"
    step = len(x_train) // runtimes.MAX_CALIBRATION
    calibration = x_train[::step][: runtimes.MAX_CALIBRATION]
    for runtime, precision in (("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"),
                               ("onnxruntime", "fp32")):
        if not runtimes.installed(runtime) or (precision == "int8" and not runtimes.installed("nncf")):
            continue
        if precision == "bf16" and not runtimes.native_bf16():
            continue
        with runtimes.onnx_file(model, key) as path:
            engine = runtimes.Engine(runtime, precision, runtimes.runner(path, runtime, precision, key, calibration))
        got = engine(x_test)
        yield (runtime, precision, speed(engine, x_test[:32]), runtimes.cosine(got, reference),
               float(np.mean(head.predict(got) == labels)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    args = p.parse_args()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = ", ".join(f for f in ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags) or "none"
    print(f"cpu cores: {os.cpu_count()}; flags: {isa}; batch 32; 192 held-out photo crops")
    print(f"{'backbone':<20} {'engine':<12} {'precision':<9} {'img/s':>7} {'cosine':>8} {'same label':>10}")
    for name in args.backbones.split(","):
        for runtime, precision, ips, cos, same in rows(name):
            print(f"{name:<20} {runtime:<12} {precision:<9} {ips:>7.0f} {cos:>8.4f} {same:>10.1%}", flush=True)


if __name__ == "__main__":
    main()
