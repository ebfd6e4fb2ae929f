"""Files -> probabilities -> result rows, with any ``Predictor``: a ``.keras`` file on its engine, an ONNX export,
or a classifier in memory. Unreadable files get a row with their reason, in their place, never a crash."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from transferkit.data.folders import expand_paths
from transferkit.data.images import decode_batch
from transferkit.engines.base import Predictor
from transferkit.log import logger


def predict_files(predictor: Predictor, paths: list[str], batch_size: int = 32) -> tuple[np.ndarray, list[int], list[dict]]:
    """Model outputs for the files that decode: (outputs (n_ok, classes [+ 1 novelty]), indices of ``paths``
    kept, skipped)."""
    probs, kept, skipped = [], [], []
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            arrays, reasons = decode_batch(chunk, predictor.image_size, pool)
            ok = [j for j, a in enumerate(arrays) if a is not None]
            for j, reason in enumerate(reasons):
                if reason is not None:
                    skipped.append({"path": chunk[j], "reason": reason})
                    logger.info(f"skipped {chunk[j]}: {reason}")
            if ok:
                probs.append(predictor.predict_images(np.stack([arrays[j] for j in ok])))
                kept.extend(start + j for j in ok)
    n_classes = len(predictor.class_names)
    return (np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32)), kept, skipped


def files_to_probs(predictor: Predictor, paths: list[str], batch_size: int = 32):
    """``predict_files`` through the predictor's own ``probabilities_for_files`` where it has one (a classifier
    answering from its feature cache; see ``FilePredictor``), else through its ``predict_images``."""
    own = getattr(predictor, "probabilities_for_files", None)
    return own(paths, batch_size) if own else predict_files(predictor, paths, batch_size=batch_size)


def rows_from_probs(paths: list[str], outputs: np.ndarray, class_names: list[str], top_k: int,
                    novelty: dict | None = None, reject: bool = True) -> list[dict]:
    """One result dict per image: path, label, probability and the top-k (label, probability). For a model with
    a novelty score (``novelty`` = metadata["novelty"]) also ``novelty`` (the score over the model's threshold,
    as the model outputs it: above 1 is unknown) and ``unknown``; an unknown row's label and probability are
    None (``reject=False`` keeps the nearest class), and its top-k still lists the nearest classes."""
    from transferkit.models.novelty import split_outputs

    probs, scores = split_outputs(outputs, len(class_names))
    if not novelty:
        scores = None  # a model file without the trust metadata: its extra output is not ours to read
    k = max(1, min(int(top_k), len(class_names)))
    rows = []
    for i, (path, p) in enumerate(zip(paths, probs)):
        order = np.argsort(-p, kind="stable")[:k]
        row = {"path": path, "label": class_names[order[0]], "probability": float(p[order[0]]),
               "top_k": [{"label": class_names[j], "probability": float(p[j])} for j in order]}
        if scores is not None:
            relative = float(scores[i])  # the score over the model's threshold
            row |= {"novelty": round(relative, 4), "unknown": bool(relative > 1.0)}
            if row["unknown"] and reject:
                row |= {"label": None, "probability": None}
        rows.append(row)
    return rows


def predict_rows(predictor: Predictor, items, top_k: int = 3, batch_size: int = 32, reject: bool = True) -> list[dict]:
    """A row for every image in ``items`` (files, folders, globs), in order; an unreadable file's row has
    ``error`` instead of a label; a photo of none of the classes is ``unknown`` (see ``rows_from_probs``). A
    label file's rows also get ``given``: the label it gives the photo, to compare."""
    from transferkit.data import labelfile

    if isinstance(items, (str, os.PathLike)):
        items = [items]
    items = [i if isinstance(i, labelfile.LabelFile) else str(i) for i in items]
    files = expand_paths(items)
    given = {}
    for item in items:
        if labelfile.is_label_source(item):
            given |= labelfile.listed_files(item)[1]
    outputs, kept, skipped = files_to_probs(predictor, files, batch_size)
    rows = dict(zip(kept, rows_from_probs([files[i] for i in kept], outputs, predictor.class_names, top_k,
                                          predictor.metadata.get("novelty"), reject)))
    errors = {s["path"]: s["reason"] for s in skipped}
    found = [rows.get(i) or {"path": f, "label": None, "probability": None, "top_k": [], "error": errors[f]}
             for i, f in enumerate(files)]
    for row in found:
        if row["path"] in given:
            row["given"] = given[row["path"]]
    return found
