"""``train DATA --add labels.csv``: rows of label files (the review queue's accepted photos, say) joined to the
TRAINING side of a split, never to validation: the validation photos, and so the model's validation figures and
the drift reference of ``transferkit monitor``, stay those of the original data and comparable between runs. The
features of the original photos are cached, so a retrain with 50 added photos extracts only those 50.

A row labelled ``unknown`` (the review's "none of the classes") is never a class: it is kept aside in
``TrainingData.negative_paths`` (in the fingerprint, so the feature cache and ``--resume`` notice it), and the
novelty score uses it as "none of these" examples: the score minus the squared distance to their mean feature (a
likelihood ratio against a background class, ``models.novelty.fit_trust``), the threshold again keeping 95 % of
the known held-out scores. Measured (``benchmarks/unknown_labels.py``, 3 classes of photo crops, 3 seeds, 6 or 12
such photos from two other photographs): AUROC on photos of other domains 0.985-0.990 kept out -> 0.996-0.998,
their unknown rate 86-92 % -> 97-100 %, in-domain false unknowns 4.4 -> 1.9-3.0 %. (Moving only the threshold
with them changed nothing in 3 of 4 settings: the shipped threshold already rejected 97-100 % of them.)
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
    ``data``; a photo already in the split is not added twice), and its ``unknown`` rows in ``negative_paths``;
    the fingerprint covers both."""
    from transferkit.data.labelfile import scan_label_file

    if not label_files:
        return data
    if np.ndim(data.y_train) != 1:
        raise TransferkitError(f"{label_files[0]}: --add joins single-label rows; this training data is multi-label")
    known = set(data.train_paths) | set(data.val_paths)
    seen = set(data.digests.get(p) for p in known)
    paths, labels, digests = list(data.train_paths), list(data.y_train), dict(data.digests)
    names, negatives = list(data.class_names), list(data.negative_paths)
    if UNKNOWN not in names:  # a label file's "unknown" rows are read, then kept aside (a class named so stays one)
        names.append(UNKNOWN)
    for source in label_files:
        added = scan_label_file(source, class_names=names, min_classes=1)
        for path, label in zip(added.paths, added.labels):
            digest = added.digests[path]
            if path in known or digest in seen:
                continue
            known.add(path)
            seen.add(digest)
            digests[path] = digest
            if int(label) >= len(data.class_names):
                negatives.append(path)
                continue
            paths.append(path)
            labels.append(int(label))
    n_negative = len(negatives) - len(data.negative_paths)
    if n_negative:
        logger.info(f"{', '.join(map(str, label_files))}: {n_negative} photo(s) labelled {UNKNOWN}: not a class; "
                    f"used as 'none of these' examples for the unknown score")
    if len(paths) == len(data.train_paths) and not n_negative:
        raise TransferkitError(f"{label_files[0]}: --add gave no photo that is not already in the training data")
    logger.info(f"--add: {len(paths) - len(data.train_paths)} photo(s) joined the training split")
    found = _fingerprint(data.fingerprint, digests, paths[len(data.train_paths):], negatives)
    return dataclasses.replace(data, train_paths=paths, y_train=np.asarray(labels, dtype=data.y_train.dtype),
                               digests=digests, negative_paths=negatives, fingerprint=found)


def _fingerprint(base: str, digests: dict, added: list[str], negatives: list[str]) -> str:
    """``base`` (the data's fingerprint), then that of the added training files, then (only where there are
    some) that of the ``unknown`` photos: a file moved between the two changes it."""
    found = f"{base}+{fingerprint('/', {p: digests[p] for p in added})[:16]}"
    if negatives:
        found += f"+{UNKNOWN}:{fingerprint('/', {p: digests[p] for p in negatives})[:16]}"
    return found
