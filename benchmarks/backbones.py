"""Feature-extraction speed of the registry backbones on this CPU.

    python benchmarks/backbones.py                      # every backbone: compiled Keras step and auto engine, batch 1 and 32
    python benchmarks/backbones.py --backbone NAME      # Keras `predict` fp32 vs the `auto` engine, same images

The second form prints img/s of Keras `model.predict` (fp32) and of the engine `--runtime auto` picks, the % of
this CPU's measured matmul peak for that precision, the feature cosine vs Keras fp32, and as its last line
`speedup: R` (auto img/s / Keras predict img/s). Backbones whose ImageNet weights must be downloaded are timed
with weights=None when offline: the graph, hence the speed, is the same.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from transferkit.engines import runtimes  # noqa: E402
from transferkit.models.backbones import REGISTRY, build_feature_extractor  # noqa: E402
from transferkit.errors import TransferkitError  # noqa: E402
from transferkit.engines.keras_step import run_model, without_resize  # noqa: E402


def extractor(name: str, size: int) -> tuple[keras.Model, str]:
    for weights in ("imagenet", None):
        try:
            return without_resize(build_feature_extractor(name, size, weights=weights), size), str(weights)
        except TransferkitError:
            continue
    raise SystemExit(f"cannot build {name}")


UNCHECKED = ("* random weights (offline): their features are numerical noise, so the engine's check against Keras "
             "cannot certify them; the speed of the unchecked engine is shown")


def cache_key(name: str, weights: str, size: int) -> str | None:
    """Where the converted model is cached; random weights differ in every run, so theirs is not."""
    return f"bench-{name}-{weights}-{size}px" if weights != "None" else None


def engine_for(model: keras.Model, key: str | None, weights: str, images: np.ndarray) -> tuple[runtimes.Engine, str]:
    """The `auto` engine, checked on ``images``; with random weights that fail the check, the unchecked one ("*")."""
    engine = runtimes.build_engine(model, key, "auto", "auto", check_images=images)
    if engine.runtime == "keras" and weights == "None":
        unchecked = runtimes.build_engine(model, key, "auto", "auto")
        cos = runtimes.cosine(unchecked(images[:8]), run_model(model, images[:8]))
        if unchecked.runtime != "keras" and cos < runtimes.min_cosine(unchecked.precision):
            return unchecked, "*"  # refused for its (noise) features, not for its speed
    return engine, ""


def throughput(fn, batch: np.ndarray, seconds: float) -> float:
    fn(batch)
    fn(batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def model_flops(model: keras.Model) -> float:
    """Multiply-adds x 2 of the convolutions and dense layers of one image (the work that matters)."""
    total = 0.0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            h, w, c = layer.output.shape[1:]
            total += 2 * h * w * c * np.prod(layer.kernel_size)
        elif isinstance(layer, keras.layers.Conv2D):
            h, w, c_out = layer.output.shape[1:]
            c_in = layer.kernel.shape[2]
            total += 2 * h * w * c_out * c_in * np.prod(layer.kernel_size)
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * np.prod(layer.kernel.shape) * np.prod(layer.output.shape[1:-1] or [1])
    return float(total)


def matmul_peak(precision: str, n: int = 4096, seconds: float = 3.0) -> float:
    """GFLOP/s of a large matmul: numpy (fp32) or OpenVINO (bf16)."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    if precision == "bf16":
        import openvino as ov
        import openvino.opset13 as ops

        x, y = ops.parameter([n, n], np.float32), ops.parameter([n, n], np.float32)
        compiled = ov.Core().compile_model(ov.Model([ops.matmul(x, y, False, False)], [x, y]), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "bf16"})
        request = compiled.create_infer_request()
        fn = lambda: request.infer({0: a, 1: a})  # noqa: E731
    else:
        fn = lambda: a @ a  # noqa: E731
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def compare(name: str, batch: int, seconds: float) -> None:
    spec = REGISTRY[name]
    size = spec.default_size
    model, weights = extractor(name, size)
    from skimage import data as skdata  # real photos for the cosine check (test extra)
    from PIL import Image

    photos = [np.asarray(Image.fromarray(p).resize((size, size))) for p in
              (skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket())]
    x = np.stack([photos[i % len(photos)] for i in range(batch)]).astype("float32")
    engine, mark = engine_for(model, cache_key(name, weights, size), weights, x)
    keras_predict = throughput(lambda b: model.predict(b, batch_size=batch, verbose=0), x, seconds)
    keras_step = throughput(lambda b: run_model(model, b), x, seconds)
    auto = throughput(engine, x, seconds)
    cos = runtimes.cosine(engine(x), run_model(model, x))
    flops = model_flops(model)
    peak = matmul_peak("bf16" if engine.precision == "bf16" else "fp32")
    print(f"backbone {name} at {size}px, batch {batch}, weights {weights}, {flops / 1e9:.2f} GFLOP per image")
    print(f"keras predict fp32:        {keras_predict:8.1f} img/s")
    print(f"keras compiled step fp32:  {keras_step:8.1f} img/s")
    print(f"auto ({engine.label}{mark}):{' ' * max(1, 13 - len(engine.label))}{auto:8.1f} img/s  "
          f"= {auto * flops / 1e9:.0f} GFLOP/s, {100 * auto * flops / 1e9 / peak:.0f}% of the measured "
          f"{engine.precision} matmul peak ({peak:.0f} GFLOP/s)")
    print(f"feature cosine vs keras fp32: {cos:.5f}")
    if mark:
        print(UNCHECKED)
    print(f"speedup: {auto / keras_predict:.2f}")


def table(names: list[str], seconds: float) -> None:
    print(f"cpu cores: {os.cpu_count()}; img/s of feature extraction, random 0-255 input")
    print(f"{'backbone':<20} {'size':>5} {'weights':>9} {'keras b1':>9} {'keras b32':>10} {'auto engine':>16} "
          f"{'auto b1':>8} {'auto b32':>9}")
    marks = ""
    for name in names:
        size = REGISTRY[name].default_size
        model, weights = extractor(name, size)
        rng = np.random.default_rng(0)
        b1 = rng.uniform(0, 255, (1, size, size, 3)).astype("float32")
        b32 = rng.uniform(0, 255, (32, size, size, 3)).astype("float32")
        keras_step = lambda b: run_model(model, b)  # noqa: E731
        engine, mark = engine_for(model, cache_key(name, weights, size), weights, b32)
        marks += mark
        print(f"{name:<20} {size:>5} {weights:>9} {throughput(keras_step, b1, seconds):>9.1f} "
              f"{throughput(keras_step, b32, seconds):>10.1f} {engine.label + mark:>16} {throughput(engine, b1, seconds):>8.1f} "
              f"{throughput(engine, b32, seconds):>9.1f}", flush=True)
    if marks:
        print(UNCHECKED)
    print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", help="compare Keras predict with the auto engine for this backbone")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0, help="timing window per measurement")
    args = p.parse_args()
    if args.backbone:
        compare(args.backbone, args.batch, args.seconds)
    else:
        table(list(REGISTRY), args.seconds)


if __name__ == "__main__":
    main()
