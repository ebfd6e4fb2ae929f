"""Test accuracy and wall time of the training recipes and of every head `--head auto` compares, on real-photo
datasets from registry packages: the evidence behind the defaults.

    python benchmarks/quality.py [--datasets photos,textures,digits,faces] [--views 4] [--no-finetune]

Per dataset (benchmarks/datasets.py), rows:
- `old defaults`: the recipe before issues fast-default/quality (softmax head on the final features, 4 views);
- every candidate of `--head auto` (fitted on the same cached training features, scored on validation to choose,
  and here also on the test folder), trained with the views (`+views`) and without;
- `auto (default)`: the new defaults end to end, the head chosen on validation;
- `+ fine-tune`: the new defaults then 3 epochs of the second stage (top 2 blocks, lr 1e-5).
Wall times are end to end with an empty feature cache (conversions included); a candidate's is its fit alone.
`±` is the binomial standard error of the test accuracy, the noise a difference must beat.
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

import numpy as np  # noqa: E402

import datasets  # noqa: E402

OLD = {"head": "gap", "augment_views": 4, "depths": 0}


def fresh_cache() -> None:
    os.environ["TRANSFERKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="tk-quality-cache-")


def train(train_dir: str, test_dir: str, **options) -> tuple[dict, float]:
    import transferkit

    fresh_cache()
    start = time.perf_counter()
    result = transferkit.train(train_dir, test_dir=test_dir, out=tempfile.mkdtemp(prefix="tk-quality-run-"),
                               **options)
    return result, time.perf_counter() - start


def candidates(train_dir: str, test_dir: str, views: int) -> list[tuple[str, float, float, bool]]:
    """(name, test accuracy, fit seconds, chosen) of every head auto compares, on one extraction."""
    from transferkit import ImageClassifier
    from transferkit.data.folders import scan_folder
    from transferkit.models.backbones import depth_dims
    from transferkit.tasks import get_task
    from transferkit.training import select

    clf = ImageClassifier(augment_views=views).prepare(train_dir, out=tempfile.mkdtemp(prefix="tk-quality-c-"))
    features = clf.extract_features()
    dims = depth_dims(clf.extractor_.model)
    weights = get_task().class_weights(clf.options_.class_weight, clf.data_.y_train, len(clf.classes_))
    chosen, found = select.select_head(clf.options_, (features.x_train, features.y_train, features.x_val,
                                                      features.y_val, views + 1), dims, len(clf.classes_), weights)
    test = scan_folder(test_dir, class_names=clf.classes_)
    x_test, kept, _ = clf.extractor_.extract(test.paths, 0, desc="test features")
    y_test = np.asarray(test.labels)[kept]
    rows = []
    for c in found:
        accuracy = float(np.mean(c.predict(x_test[:, 0]).argmax(1) == y_test))
        rows.append((c.name, accuracy, c.seconds, c is chosen))
    return rows


def line(dataset: str, recipe: str, accuracy: float, n: int, seconds: float) -> None:
    se = math.sqrt(accuracy * (1 - accuracy) / n)
    print(f"{dataset:<9} {recipe:<26} {accuracy:>8.3f} {se:>6.3f} {seconds:>7.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(datasets.NAMES))
    p.add_argument("--views", type=int, default=4, help="augmented views of the candidates' +views rows")
    p.add_argument("--no-finetune", action="store_true")
    args = p.parse_args()
    import logging

    from transferkit.log import logger

    logger.setLevel(logging.WARNING)
    root = tempfile.mkdtemp(prefix="tk-quality-data-")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    print(f"cpu cores: {os.cpu_count()} ({'AMX' if 'amx_bf16' in flags else 'no AMX'}); backbone efficientnet_lite0")
    print(f"{'dataset':<9} {'recipe':<26} {'test acc':>8} {'±':>6} {'wall s':>7}")
    for name in args.datasets.split(","):
        train_dir, test_dir = datasets.write(name, os.path.join(root, name))
        old, seconds = train(train_dir, test_dir, **OLD)
        n = old["test"]["n_images"]
        line(name, "old defaults", old["test"]["accuracy"], n, seconds)
        fresh_cache()
        for recipe, accuracy, fit_seconds, chosen in candidates(train_dir, test_dir, args.views):
            line(name, f"  {recipe}" + (" (val pick)" if chosen else ""), accuracy, n, fit_seconds)
        new, seconds = train(train_dir, test_dir)
        chosen = new.get("head_choice", {}).get("chosen", {})
        label = f"auto (default): {chosen.get('head')} d{chosen.get('depths')}"
        line(name, label, new["test"]["accuracy"], n, seconds)
        if not args.no_finetune:
            tuned, seconds = train(train_dir, test_dir, fine_tune_epochs=3, unfreeze_top=2, fine_tune_lr=1e-5)
            line(name, "  + fine-tune 3 epochs", tuned["test"]["accuracy"], n, seconds)


if __name__ == "__main__":
    main()
