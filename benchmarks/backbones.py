"""Feature-extraction speed of each registry backbone at its default size, batch 1 and 32, on this CPU.

    python benchmarks/backbones.py [--backbone NAME ...] [--seconds 5]

Measures the path training and prediction use (FeatureExtractor.forward: the compiled Keras predict step on a
numpy batch). Backbones whose ImageNet weights must be downloaded are timed with weights=None when offline:
speed does not depend on the weight values. Prints images/second and the process's peak memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from transferkit.backbones import REGISTRY  # noqa: E402
from transferkit.errors import TransferkitError  # noqa: E402
from transferkit.features import FeatureExtractor  # noqa: E402


def images_per_second(fx: FeatureExtractor, batch: int, seconds: float) -> float:
    x = np.random.default_rng(0).uniform(0, 255, (batch, fx.image_size, fx.image_size, 3)).astype("float32")
    fx.forward(x)  # trace + warm-up
    fx.forward(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fx.forward(x)
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", action="append", help="repeatable; default: all")
    p.add_argument("--seconds", type=float, default=5.0, help="timing window per measurement")
    args = p.parse_args()
    names = args.backbone or list(REGISTRY)
    print(f"cpu cores: {os.cpu_count()}")
    print(f"{'backbone':<20} {'size':>5} {'weights':>9} {'batch 1 img/s':>14} {'batch 32 img/s':>15}")
    for name in names:
        spec = REGISTRY[name]
        weights = "imagenet"
        try:
            fx = FeatureExtractor(name, spec.default_size, weights=weights, cache=False, verbose=False)
        except TransferkitError:
            weights = None  # offline: same graph, same speed
            fx = FeatureExtractor(name, spec.default_size, weights=None, cache=False, verbose=False)
        b1 = images_per_second(fx, 1, args.seconds)
        b32 = images_per_second(fx, 32, args.seconds)
        print(f"{name:<20} {spec.default_size:>5} {str(weights):>9} {b1:>14.1f} {b32:>15.1f}", flush=True)
    print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
