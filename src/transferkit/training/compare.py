"""Choosing the backbone from the data (``transferkit compare``, ``train --backbone auto``).

Which backbone transfers best depends on the data, and with the features cached it is cheap to measure: each
backbone extracts the features of the same split (the run's seed and validation share), the same head is fitted
on each (L2 logistic regression on the standardised final features: deterministic, a second on cached features),
and the table gives validation accuracy and macro F1 (scikit-learn) beside the images/s of that backbone's
feature extraction on this machine, on the engine the defaults use (decoding excluded).

The pick (``pick``): the best validation accuracy; every backbone within one standard error of it
(sqrt(p (1 - p) / n) of the best, on n validation images) counts as a tie, and of those the fastest is chosen,
since a difference the validation split cannot resolve is not worth a slower model. A test folder, when given, is
scored and shown but never used to pick. The extractor of each backbone is the one a training run with the same
options builds, so ``train --backbone auto`` trains the winner on the features the comparison cached.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.log import logger
from transferkit.options import TrainOptions

AUTO = "auto"  # --backbone auto
SPEED_SAMPLE = 32  # images timed per backbone
SPEED_SECONDS = 1.0  # timed at least this long, and at least SPEED_REPEATS batches
SPEED_REPEATS = 5


def auto_candidates() -> list[str]:
    """What ``--backbone auto`` compares: the registry's backbones whose weights need no network."""
    from transferkit.models.backbones import list_backbones

    return [b["name"] for b in list_backbones(offline=True)]


def _scores(probs: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[float, float]:
    from sklearn.metrics import f1_score

    pred = probs.argmax(1)
    return float(np.mean(pred == y)), float(f1_score(y, pred, labels=list(range(n_classes)), average="macro",
                                                     zero_division=0))


def images_per_second(extractor, paths: list[str]) -> float:
    """Backbone images/s of ``extractor``'s engine on up to SPEED_SAMPLE of ``paths`` (decoded first; the engine
    is built before the clock starts), from the fastest of several batches: on a shared machine the mean mixes in
    the other processes' load (measured: Lite2 timed faster than Lite0 by the mean while tests ran beside it)."""
    from transferkit.data.images import decode_batch

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        arrays = [a for a in decode_batch(paths[:SPEED_SAMPLE], extractor.image_size, pool)[0] if a is not None]
    if not arrays:
        return 0.0
    batch = np.stack(arrays)
    extractor.forward(batch)  # builds (converts, checks) the engine: not timed
    times, start = [], time.perf_counter()
    while len(times) < SPEED_REPEATS or time.perf_counter() - start < SPEED_SECONDS:
        t0 = time.perf_counter()
        extractor.forward(batch)
        times.append(time.perf_counter() - t0)
    return len(batch) / min(times)  # the best batch: what the machine does when nothing else runs (timeit's rule)


def _features(options: TrainOptions, data, test):
    """(extractor, training features (n, views, d), validation (n, d), test (n, d) or None, their labels)."""
    from transferkit.engines import runtimes
    from transferkit.training.features import FeatureExtractor

    extractor = FeatureExtractor.from_options(options)  # the one a training run with these options builds
    precision = runtimes.training_precision(options.feature_precision, options.runtime,
                                            len(data.train_paths) * (options.augment_views + 1))
    views = extractor.with_precision(precision, data.train_paths)
    name = options.backbone
    f_train, kept_t, _ = views.extract(data.train_paths, options.augment_views, desc=f"{name} train",
                                       digests=data.digests)
    f_val, kept_v, _ = extractor.extract(data.val_paths, 0, desc=f"{name} validation", digests=data.digests)
    if not len(kept_v) or not len(kept_t):
        raise TransferkitError(f"{data.root}: no readable training or validation image")
    found = [extractor, (f_train, data.y_train[kept_t]), (f_val[:, 0], data.y_val[kept_v]), None]
    if test is not None:
        f_test, kept, _ = extractor.extract(test.paths, 0, desc=f"{name} test")
        found[3] = (f_test[:, 0], test.labels[kept])
    return found


def compare_one(options: TrainOptions, data, test=None) -> dict:
    """One backbone's row: features (cached), the logistic head on the final features, its scores, its speed."""
    from transferkit.models.backbones import depth_dims
    from transferkit.training import select
    from transferkit.tasks import get_task
    from transferkit.training.head import flatten_views

    t0 = time.perf_counter()
    extractor, (f_train, y_train), (x_val, y_val), tested = _features(options, data, test)
    feature_seconds = time.perf_counter() - t0
    n_classes, views = len(data.class_names), options.augment_views + 1
    x_train, y_views = flatten_views(f_train, y_train)
    head = select.Candidate("logistic", 0, True)
    select.fit_candidate(head, options, (x_train, y_views, x_val, y_val, views), depth_dims(extractor.model),
                         n_classes, get_task().class_weights(options.class_weight, y_views, n_classes))
    accuracy, macro_f1 = _scores(head.predict(x_val), y_val, n_classes)
    row = {"backbone": options.backbone, "image_size": options.size, "val_images": int(len(y_val)),
           "val_accuracy": accuracy, "val_macro_f1": macro_f1,
           "val_accuracy_se": math.sqrt(accuracy * (1 - accuracy) / len(y_val)), "val_log_loss": head.val_loss}
    if tested is not None:
        row["test_accuracy"], row["test_macro_f1"] = _scores(head.predict(tested[0]), tested[1], n_classes)
        row["test_images"] = int(len(tested[1]))
    row["images_per_second"] = images_per_second(extractor, data.val_paths + data.train_paths)
    row |= {"engine": extractor.engine.label if extractor.engine else extractor.runtime,
            "feature_seconds": round(feature_seconds, 2), "head_seconds": round(head.seconds, 2)}
    logger.info(f"{options.backbone}: validation accuracy {accuracy:.4f}, macro F1 {macro_f1:.4f}, "
                f"{row['images_per_second']:.0f} images/s ({row['engine']})")
    return row


def pick(results: list[dict]) -> tuple[str, str]:
    """(the chosen backbone, the one-line reason): the best validation accuracy, and among the backbones within
    one standard error of it, the fastest."""
    best = max(results, key=lambda r: (r["val_accuracy"], r["val_macro_f1"], r["images_per_second"]))
    se = best["val_accuracy_se"]
    tied = [r for r in results if r["val_accuracy"] >= best["val_accuracy"] - se - 1e-12]
    chosen = max(tied, key=lambda r: r["images_per_second"])
    others = [r for r in results if r is not chosen]
    if chosen is best:
        runner = max(others, key=lambda r: r["val_accuracy"], default=None)
        if runner is None:
            return chosen["backbone"], "the only backbone compared"
        if len(tied) > 1:
            return chosen["backbone"], (f"best validation accuracy {best['val_accuracy']:.4f}, and the fastest of "
                                        f"the {len(tied)} within one standard error ({se:.4f}) of it")
        return chosen["backbone"], (f"best validation accuracy {best['val_accuracy']:.4f}; the next "
                                    f"({runner['backbone']}, {runner['val_accuracy']:.4f}) is more than one "
                                    f"standard error ({se:.4f}) below")
    speedup = chosen["images_per_second"] / max(best["images_per_second"], 1e-9)
    return chosen["backbone"], (f"validation accuracy {chosen['val_accuracy']:.4f} is within one standard error "
                                f"({se:.4f}) of the best ({best['backbone']}, {best['val_accuracy']:.4f}), and it "
                                f"is {speedup:.1f}x as fast")


def notes(results: list[dict], chosen: str) -> list[str]:
    """What a person should know about the pick, from the figures: a validation split every backbone gets fully
    right cannot rank them (measured: on benchmarks/datasets.py's photos all three Lite models had 100 % validation
    and 90.0 / 95.6 / 97.5 % test accuracy), and a test folder that ranks them otherwise than the pick."""
    found = []
    if len(results) > 1 and all(r["val_accuracy"] == 1.0 for r in results):
        found.append("every backbone is right on every validation photo: validation cannot rank them, so the "
                     "fastest is picked; a test folder of other photos can: transferkit compare --test-dir")
    tested = [r for r in results if "test_accuracy" in r]
    if tested:
        mine = next(r for r in tested if r["backbone"] == chosen)
        best = max(tested, key=lambda r: r["test_accuracy"])
        se = math.sqrt(best["test_accuracy"] * (1 - best["test_accuracy"]) / max(best["test_images"], 1))
        if best is not mine and best["test_accuracy"] - mine["test_accuracy"] > se:
            found.append(f"on the test folder {best['backbone']} scores higher ({best['test_accuracy']:.4f} vs "
                         f"{mine['test_accuracy']:.4f}, more than one standard error): to train it, "
                         f"--backbone {best['backbone']}")
    return found


def compare_backbones(data_dir: str, backbones: list[str] | None = None, *, test_dir: str | None = None,
                      out: str | None = None, data=None, **options) -> dict:
    """Compare ``backbones`` (default: the offline ones) on the same split of ``data_dir`` with the same head;
    ``options``: the fields of TrainOptions (seed, val_split, image_size, runtime, ...). With ``out``,
    compare.json and compare.png there. Returns the record (``results``, ``chosen``, ``reason``)."""
    from transferkit.data.folders import scan_folder, split_training_folder

    names = list(backbones or auto_candidates())
    if not names or AUTO in names:
        raise TransferkitError("compare needs backbone names (see `transferkit backbones`), e.g. "
                               "efficientnet_lite0,efficientnet_lite1")
    options = {k: v for k, v in options.items() if k != "backbone"}
    TrainOptions.check_names(options)
    each = [TrainOptions(**options, backbone=name).for_training() for name in names]  # all checked before work
    if each[0].head == "flatten-256-128":  # its features are maps: the comparison's head reads pooled ones
        each = [dataclasses.replace(o, head="auto") for o in each]
    data = data or split_training_folder(data_dir, each[0].val_split, each[0].seed)
    test = scan_folder(test_dir, class_names=data.class_names) if test_dir else None
    results = [compare_one(o, data, test) for o in each]
    chosen, reason = pick(results)
    found = {"results": results, "chosen": chosen, "reason": reason, "notes": notes(results, chosen),
             "rule": "best validation accuracy; within one standard error of it, the fastest",
             "head": "logistic regression on the final features", "seed": each[0].seed,
             "val_split": each[0].val_split, "n_train": len(data.train_paths), "n_val": len(data.val_paths)}
    logger.info(f"backbone chosen: {chosen} ({reason})")
    for line in found["notes"]:
        logger.warning(f"compare: {line}")
    if out:
        found |= write_comparison(found, out)
    return found


def write_comparison(found: dict, out: str) -> dict:
    """compare.json and compare.png (accuracy and macro F1 against images/s) in ``out``; returns their paths."""
    from transferkit.files import write_json_atomic
    from transferkit.reports.plots import plot_comparison

    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "compare.json"), "plot": os.path.join(out, "compare.png")}
    plot_comparison(found["results"], found["chosen"], paths["plot"])
    write_json_atomic(paths["json"], found | paths)
    return paths


def text_table(found: dict) -> str:
    """The table ``transferkit compare`` prints."""
    tested = any("test_accuracy" in r for r in found["results"])
    lines = [f"{'backbone':<20} {'size':>4} {'val acc':>8} {'val F1':>7}" + (f" {'test acc':>8} {'test F1':>7}"
                                                                           if tested else "") + f" {'img/s':>7}"]
    for r in found["results"]:
        test = f" {r['test_accuracy']:>8.4f} {r['test_macro_f1']:>7.4f}" if tested else ""
        mark = "  <- chosen" if r["backbone"] == found["chosen"] else ""
        lines.append(f"{r['backbone']:<20} {r['image_size']:>4} {r['val_accuracy']:>8.4f} {r['val_macro_f1']:>7.4f}"
                     f"{test} {r['images_per_second']:>7.0f}{mark}")
    lines.append(f"\nchosen: {found['chosen']}: {found['reason']} ({found['n_val']} validation images, seed "
                 f"{found['seed']}; the same {found['head']} on each)")
    lines += [f"note: {n}" for n in found.get("notes", [])]
    return "\n".join(lines)
