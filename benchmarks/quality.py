"""Test accuracy and wall time of training recipes on real-photo datasets from registry packages: the evidence
behind the defaults (augmented views, the second stage).

    python benchmarks/quality.py [--datasets photos,textures,digits,faces] [--recipes old,views0,views1,finetune]

Each recipe trains `transferkit.train` on the dataset's train folder (seed 42, its own empty feature cache, so the
wall time includes every backbone pass) and is scored on the test folder. `±` is the binomial standard error of
the test accuracy (the noise a difference must beat). Datasets: benchmarks/datasets.py.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import datasets  # noqa: E402

RECIPES = {  # name -> train options (on top of the defaults)
    "old": {"augment_views": 4},  # the defaults before fast-default
    "views0": {"augment_views": 0},
    "views1": {"augment_views": 1},
    "views2": {"augment_views": 2},
    "finetune": {"augment_views": 0, "fine_tune_epochs": 3, "unfreeze_top": 2, "fine_tune_lr": 1e-5},
}


def run(train: str, test: str, options: dict) -> tuple[float, float, int]:
    import transferkit
    from transferkit.files import cache_dir  # noqa: F401  (the cache folder is read from the environment)

    os.environ["TRANSFERKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="tk-quality-cache-")
    start = time.perf_counter()
    result = transferkit.train(train, test_dir=test, out=tempfile.mkdtemp(prefix="tk-quality-run-"), **options)
    return result["test"]["accuracy"], time.perf_counter() - start, result["test"]["n_images"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(datasets.NAMES))
    p.add_argument("--recipes", default="old,views0,views1,finetune")
    args = p.parse_args()
    import logging

    logging.getLogger("transferkit").setLevel(logging.WARNING)
    root = tempfile.mkdtemp(prefix="tk-quality-data-")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    print(f"cpu cores: {os.cpu_count()} ({'AMX' if 'amx_bf16' in flags else 'no AMX'}); backbone efficientnet_lite0")
    print(f"{'dataset':<10} {'recipe':<10} {'test acc':>9} {'±':>6} {'wall s':>7}")
    for name in args.datasets.split(","):
        train, test = datasets.write(name, os.path.join(root, name))
        for recipe in args.recipes.split(","):
            accuracy, seconds, n = run(train, test, RECIPES[recipe])
            se = math.sqrt(accuracy * (1 - accuracy) / n)
            print(f"{name:<10} {recipe:<10} {accuracy:>9.3f} {se:>6.3f} {seconds:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
