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
from transferkit.options import DEFAULT_PREDICT, PredictOptions


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


def decide(predictor: Predictor, paths: list[str], outputs: np.ndarray, top_k: int, reject: bool = True, *,
           coverage: float | None = None, max_error: float | None = None) -> list[dict]:
    """Result rows of ``outputs`` by the predictor's task (``tasks.task_of`` its metadata; single-label:
    ``SingleLabel.decide``); ``coverage`` / ``max_error``: the rows' conformal ``set`` / ``abstain``, from the
    calibration the model file carries (one line saying so where it has none)."""
    from transferkit.errors import TransferkitError
    from transferkit.models.conformal import check_record
    from transferkit.models.conformal_labels import check_labels_record
    from transferkit.tasks import task_of

    metadata, task = predictor.metadata, task_of(predictor.metadata)
    asked = {k: v for k, v in (("coverage", coverage), ("max_error", max_error)) if v is not None}
    if asked:  # the task's own record: single-label APS scores, multi-label per-label scores
        conformal, name, where = metadata.get("conformal"), next(iter(asked)), predictor.path or "model"
        if not isinstance(conformal, dict):
            raise TransferkitError(f"{where}: no conformal calibration in this model file (made before "
                                   f"transferkit stored one); {name} needs a model trained by this version")
        asked["conformal"] = (check_labels_record(conformal, predictor.class_names, where) if task.multi_label
                              else check_record(conformal, where))
    return task.decide(paths, outputs, predictor.class_names, top_k, metadata.get("novelty"), reject, **asked)


def predict_rows(predictor: Predictor, items, options: PredictOptions = DEFAULT_PREDICT) -> list[dict]:
    """A row for every image in ``items`` (files, folders, globs), in order; an unreadable file's row has
    ``error`` instead of a label; a photo of none of the classes is ``unknown`` (see ``SingleLabel.decide``).
    A label file's rows also get ``given``: the label it gives the photo, to compare."""
    from transferkit.data import labelfile

    if isinstance(items, (str, os.PathLike)):
        items = [items]
    items = [i if isinstance(i, labelfile.LabelFile) else str(i) for i in items]
    files = expand_paths(items)
    given = {}
    for item in items:
        if labelfile.is_label_source(item):
            given |= labelfile.listed_files(item)[1]
    outputs, kept, skipped = files_to_probs(predictor, files, options.batch_size)
    rows = dict(zip(kept, decide(predictor, [files[i] for i in kept], outputs, options.top_k, options.reject,
                                      coverage=options.coverage, max_error=options.max_error)))
    errors = {s["path"]: s["reason"] for s in skipped}
    found = [rows.get(i) or {"path": f, "label": None, "probability": None, "top_k": [], "error": errors[f]}
             for i, f in enumerate(files)]
    for row in found:
        if row["path"] in given:
            row["given"] = given[row["path"]]
    return found
