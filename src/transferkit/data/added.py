"""``train DATA --add labels.csv``: rows of label files (the review queue's accepted photos, say) joined to the
TRAINING side of a split, never to validation: the validation photos, and so the model's validation figures and
the drift reference of ``transferkit monitor``, stay those of the original data and comparable between runs. The
features of the original photos are cached, so a retrain with 50 added photos extracts only those 50.

A row labelled ``unknown`` (the review's "none of the classes") is kept out: never a class, not in training, and
not used by the novelty score; the log says how many. Measured (``benchmarks/unknown_labels.py``, 3 classes of
photo crops, 3 seeds, 6 or 12 such photos from two other photographs): moving the *unknown* threshold with them
(Youden's J against the known held-out scores, never looser) changed nothing in 3 of 4 settings, since the shipped
threshold already rejected 97-100 % of them, and in the fourth raised the in-domain false unknowns 4.4 -> 5.2 %.
(A score that also subtracts the distance to their mean did better: AUROC on other domains 0.985-0.990 ->
0.997-0.998, their unknown rate 86-92 % -> 97-100 %, false unknowns 4.4 -> 1.9-3.0 %; it needs their features in
the novelty fit, which the training stages do not pass yet.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from transferkit.data.folders import TrainingData, fingerprint
from transferkit.errors import TransferkitError
from transferkit.log import logger

UNKNOWN = "unknown"  # the review's label for a photo of none of the classes (reports.review.UNKNOWN)


def add_training_rows(data: TrainingData, label_files) -> TrainingData:
    """``data`` with the rows of ``label_files`` appended to its training split (their labels must be classes of
    ``data``; a photo already in the split is not added twice); the fingerprint covers the added files too."""
    from transferkit.data.labelfile import scan_label_file

    if not label_files:
        return data
    if np.ndim(data.y_train) != 1:
        raise TransferkitError(f"{label_files[0]}: --add joins single-label rows; this training data is multi-label")
    known = set(data.train_paths) | set(data.val_paths)
    seen = set(data.digests.get(p) for p in known)
    paths, labels, digests = list(data.train_paths), list(data.y_train), dict(data.digests)
    names, left_out = list(data.class_names), 0
    if UNKNOWN not in names:  # a label file's "unknown" rows are read, then kept out (a class named so stays one)
        names.append(UNKNOWN)
    for source in label_files:
        added = scan_label_file(source, class_names=names, min_classes=1)
        for path, label in zip(added.paths, added.labels):
            if int(label) >= len(data.class_names):
                left_out += 1
                continue
            digest = added.digests[path]
            if path in known or digest in seen:
                continue
            known.add(path)
            seen.add(digest)
            paths.append(path)
            labels.append(int(label))
            digests[path] = digest
    if left_out:
        logger.info(f"{', '.join(map(str, label_files))}: {left_out} photo(s) labelled {UNKNOWN} kept out of the "
                    f"classes and of the novelty score (none of the classes: not a class, not in training)")
    if len(paths) == len(data.train_paths):
        raise TransferkitError(f"{label_files[0]}: --add gave no photo that is not already in the training data"
                               + (f" ({left_out} labelled {UNKNOWN}, kept out of the classes)" if left_out else ""))
    logger.info(f"--add: {len(paths) - len(data.train_paths)} photo(s) joined the training split")
    extra = fingerprint("/", {p: d for p, d in digests.items() if p not in data.digests})
    return dataclasses.replace(data, train_paths=paths, y_train=np.asarray(labels, dtype=data.y_train.dtype),
                               digests=digests, fingerprint=f"{data.fingerprint}+{extra[:16]}")
