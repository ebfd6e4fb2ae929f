"""Dataset health check (`transferkit inspect`): class counts and imbalance, image sizes, modes and formats,
unreadable files (the same decoder as training), exact duplicates (content hash) and near duplicates (perceptual
hash: resized or re-encoded copies), within a class, across classes (a likely label error) and between the train
and test folders (leakage: the test score would lie). Streams the images: memory stays bounded."""

from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor

import imagehash
import numpy as np

from transferkit.data.folders import label_text, scan_folder
from transferkit.files import file_digest, write_json_atomic
from transferkit.data.images import UnreadableImage, open_rgb
from transferkit.log import progress_bar

NEAR_THRESHOLD = 6  # max differing bits of the 64-bit perceptual hash for "near duplicate"
MAX_PAIRS = 1000  # listed; all are counted


def _examine(path: str) -> dict:
    """Decode one file fully (as training would) and fingerprint it."""
    info: dict = {}
    try:
        img = open_rgb(path, draft_size=256, info=info)
    except UnreadableImage as exc:
        return {"path": path, "error": exc.reason}
    return {"path": path, "digest": file_digest(path), "phash": int(str(imagehash.phash(img)), 16), **info}


def _near_pairs(hashes: np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming distance <= threshold, in blocks (bounded memory)."""
    pairs = []
    h = hashes.astype(np.uint64)
    block = 512
    for start in range(0, len(h), block):
        a = h[start : start + block]
        dist = np.bitwise_count(a[:, None] ^ h[None, :])
        i, j = np.nonzero(dist <= threshold)
        i = i + start
        keep = j > i
        pairs.extend(zip(i[keep].tolist(), j[keep].tolist(), dist[i[keep] - start, j[keep]].tolist()))
    return pairs


def _kind(a: dict, b: dict) -> str:
    if a["split"] != b["split"]:
        return "train-test leak"
    return "same class" if a["label"] == b["label"] else "across classes"


def _examine_all(splits: list, progress: bool) -> tuple[list[dict], list[dict]]:
    """Decode and fingerprint every file of every split: (records of readable images, unreadable files)."""
    items = [(split, label_text(data.class_names, label), path) for split, data in splits
             for path, label in zip(data.paths, data.labels)]
    unreadable = [dict(s, split=split) for split, data in splits for s in data.skipped]
    records = []
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        bar = progress_bar(len(items), "inspect", disable=not progress)
        for (split, label, _), rec in zip(items, pool.map(_examine, [p for _, _, p in items])):
            bar.update(1)
            if "error" in rec:
                unreadable.append({"path": rec["path"], "reason": rec["error"], "split": split})
            else:
                records.append(dict(rec, split=split, label=label))
        bar.close()
    return records, unreadable


def _where(record: dict) -> dict:
    return {k: record[k] for k in ("path", "split", "label")}


def _exact_duplicates(records: list[dict]) -> dict:
    """Groups of files with the same content hash, and what kind of pair each group holds."""
    exact = collections.defaultdict(list)
    for i, r in enumerate(records):
        exact[r["digest"]].append(i)
    groups = []
    for members in exact.values():
        if len(members) > 1:
            kinds = sorted({_kind(records[a], records[b]) for a in members for b in members if a < b})
            groups.append({"kinds": kinds, "files": [_where(records[m]) for m in members]})
    return {"groups": groups, "counts": dict(collections.Counter(k for g in groups for k in g["kinds"]))}


def _near_duplicates(records: list[dict], threshold: int) -> dict:
    """Pairs of different files whose perceptual hashes differ by at most ``threshold`` bits."""
    near, counts = [], collections.Counter()
    if records:
        for i, j, d in _near_pairs(np.array([r["phash"] for r in records], dtype=np.uint64), threshold):
            if records[i]["digest"] == records[j]["digest"]:
                continue  # already an exact duplicate
            kind = _kind(records[i], records[j])
            counts[kind] += 1
            if len(near) < MAX_PAIRS:
                near.append({"kind": kind, "distance": d, "a": _where(records[i]), "b": _where(records[j])})
    return {"threshold_bits": threshold, "pairs": near, "counts": dict(counts)}


def _sizes(records: list[dict]) -> dict:
    sizes = np.array([(r["width"], r["height"]) for r in records]) if records else np.zeros((0, 2))
    return {
        "min": sizes.min(axis=0).tolist() if len(sizes) else None,
        "median": np.median(sizes, axis=0).tolist() if len(sizes) else None,
        "max": sizes.max(axis=0).tolist() if len(sizes) else None,
        "distinct": len({tuple(s) for s in sizes.tolist()}),
    }


def inspect_dataset(data_dir: str, test_dir: str | None = None, near_threshold: int = NEAR_THRESHOLD,
                    progress: bool = True) -> dict:
    """The health report of a dataset as a JSON-ready dict. A label file's splits are its own (train, valid,
    test: duplicates across them are leaks), and its bad rows are listed (``bad_rows``) instead of refused."""
    from transferkit.data import labelfile

    bad_rows = []
    if labelfile.is_label_source(data_dir):
        splits, bad_rows = labelfile.health_splits(data_dir)
    else:
        splits = [("train", scan_folder(data_dir, min_classes=1))]
    train = splits[0][1]
    if test_dir:
        name = "test_dir" if any(split == "test" for split, _ in splits) else "test"  # a label file's test rows
        splits.append((name, scan_folder(test_dir, class_names=train.class_names, min_classes=1)))
    records, unreadable = _examine_all(splits, progress)
    counts = {split: {name: 0 for name in train.class_names} for split, _ in splits}
    for r in records:
        counts[r["split"]][r["label"]] += 1
    nonzero = [c for c in counts["train"].values() if c]

    def distribution(key):
        return dict(collections.Counter(str(r[key]) for r in records).most_common())

    return {
        "data_dir": str(data_dir),
        "test_dir": str(test_dir) if test_dir else None,
        "class_names": train.class_names,
        "counts": counts,
        "n_images": len(records),
        "imbalance_ratio": (max(nonzero) / min(nonzero)) if nonzero else None,
        "formats": distribution("format"),
        "modes": distribution("mode"),
        "sizes": _sizes(records),
        "unreadable": unreadable,
        "bad_rows": bad_rows,
        "exact_duplicates": _exact_duplicates(records),
        "near_duplicates": _near_duplicates(records, near_threshold),
        "samples": {name: [r["path"] for r in records if r["label"] == name and r["split"] == "train"][:5]
                    for name in train.class_names},
    }


def text_summary(report: dict) -> str:
    """The short table a person reads."""
    splits = list(report["counts"])
    names = report["class_names"]
    width = max([len(n) for n in names] + [10])
    lines = [f"{'class':<{width}}" + "".join(f"{s:>8}" for s in splits)]
    for name in names:
        lines.append(f"{name:<{width}}" + "".join(f"{report['counts'][s][name]:>8}" for s in splits))
    lines.append(f"{'total':<{width}}" + "".join(f"{sum(report['counts'][s].values()):>8}" for s in splits))
    ratio = report["imbalance_ratio"]
    lines.append("")
    lines.append(f"imbalance (largest / smallest class): {ratio:.2f}" if ratio else "imbalance: n/a")
    lines.append(f"formats: {report['formats']}   modes: {report['modes']}")
    s = report["sizes"]
    if s["min"]:
        lines.append(f"sizes (w x h): min {s['min'][0]}x{s['min'][1]}, median {s['median'][0]:.0f}x{s['median'][1]:.0f}, "
                     f"max {s['max'][0]}x{s['max'][1]} ({s['distinct']} distinct)")
    if report.get("bad_rows"):
        lines.append(f"bad rows of the label file: {len(report['bad_rows'])}")
        lines.extend(f"  line {b['line']}: {b['path']!r}: {b['reason']}" for b in report["bad_rows"][:20])
    lines.append(f"unreadable files: {len(report['unreadable'])}")
    lines.extend(f"  {u['path']}: {u['reason']}" for u in report["unreadable"][:20])
    ex, ne = report["exact_duplicates"], report["near_duplicates"]
    lines.append(f"exact duplicate groups: {len(ex['groups'])} {ex['counts'] or ''}")
    lines.append(f"near-duplicate pairs (<= {ne['threshold_bits']} bits): {sum(ne['counts'].values())} {ne['counts'] or ''}")
    leaks = ex["counts"].get("train-test leak", 0) + ne["counts"].get("train-test leak", 0)
    if leaks:
        lines.append(f"WARNING: {leaks} duplicate(s) between train and test: the test score overstates accuracy")
    if ex["counts"].get("across classes") or ne["counts"].get("across classes"):
        lines.append("WARNING: the same picture appears under different classes: check these labels")
    return "\n".join(lines)


def write_inspection(report: dict, out: str) -> dict:
    """health.json and samples.png in ``out``; returns the paths."""
    from transferkit.reports.plots import plot_samples

    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "health.json"), "samples": os.path.join(out, "samples.png")}
    write_json_atomic(paths["json"], report)
    plot_samples(report["samples"], paths["samples"])
    return paths


def run_duplicates(data, test=None, limit: int = 10) -> dict:
    """What ``train`` records about duplicates (the model card reads it): exact copies by the content hashes the
    split already computed (no image is decoded again, so it costs nothing), within a class, across classes (a
    likely label error) and between training and validation or the test folder (leakage: that score would lie).
    Near duplicates need every image decoded and hashed perceptually: ``transferkit inspect``."""
    rows = [("train", label_text(data.class_names, y), p) for p, y in zip(data.train_paths, data.y_train)]
    rows += [("validation", label_text(data.class_names, y), p) for p, y in zip(data.val_paths, data.y_val)]
    digests = dict(data.digests)
    if test is not None:
        rows += [("test", label_text(test.class_names, y), p) for p, y in zip(test.paths, test.labels)]
        digests |= {p: file_digest(p) for p in test.paths if p not in digests}
    by_digest = collections.defaultdict(list)
    for split, label, path in rows:
        by_digest[digests[path]].append({"split": split, "label": label, "path": path})
    groups, counts = [], collections.Counter()
    for members in by_digest.values():
        if len(members) < 2:
            continue
        kinds = sorted({_run_kind(a, b) for i, a in enumerate(members) for b in members[i + 1:]})
        counts.update(kinds)
        if len(groups) < limit:
            groups.append({"kinds": kinds, "files": [dict(m, path=_relative(m["path"], data, test)) for m in members]})
    return {"method": "exact copies by content hash", "checked": ["train", "validation"] + (["test"] if test else []),
            "n_groups": sum(len(m) > 1 for m in by_digest.values()), "counts": dict(counts), "groups": groups}


def _run_kind(a: dict, b: dict) -> str:
    splits = {a["split"], b["split"]}
    if "test" in splits and len(splits) > 1:
        return "train-test leak"
    if splits == {"train", "validation"}:
        return "train-validation leak"
    return "same class" if a["label"] == b["label"] else "across classes"


def _relative(path: str, data, test) -> str:
    for root in (data.root, test.root if test is not None else None):
        if root and os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
            return os.path.relpath(path, root)
    return os.path.basename(path)
