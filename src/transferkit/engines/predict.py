"""Files -> probabilities -> result rows, with any ``Predictor``: a ``.keras`` file on its engine, an ONNX export,
or a classifier in memory. Unreadable files get a row with their reason, in their place, never a crash."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from transferkit.data.folders import expand_paths
from transferkit.data.images import decode_batch
from transferkit.engines.base import Predictor
from transferkit.log import logger
from transferkit.options import DEFAULT_PREDICT, PredictOptions

GUARANTEES = ("coverage", "max_error", "expected_error", "class_coverage")  # decide's keyword options


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


_noted: set = set()


def _calibration(predictor: Predictor, task, name: str) -> dict:
    """The model file's conformal record for ``name`` (an option), checked; one line where it has none."""
    from transferkit.errors import TransferkitError
    from transferkit.models.conformal import check_record
    from transferkit.models.conformal_labels import check_labels_record

    conformal, where = predictor.metadata.get("conformal"), predictor.path or "model"
    if not isinstance(conformal, dict):
        raise TransferkitError(f"{where}: no conformal calibration in this model file (made before "
                               f"transferkit stored one); {name} needs a model trained by this version")
    if task.multi_label:
        return check_labels_record(conformal, predictor.class_names, where)
    check_record(conformal, where)
    if name == "class_coverage" and len(conformal.get("per_class", [])) != len(predictor.class_names):
        raise TransferkitError(f"{where}: no per-class calibration in this model file (made before transferkit "
                               f"stored one); class_coverage needs a model trained by this version")
    return conformal


def _check_asked(task, asked: dict) -> None:
    from transferkit.errors import TransferkitError

    for pair in (("coverage", "class_coverage"), ("max_error", "expected_error")):
        if all(asked.get(k) is not None for k in pair):
            raise TransferkitError(f"{pair[0]} and {pair[1]}: choose one (both would fill the same field)")
    if task.multi_label and asked.get("class_coverage") is not None:
        raise TransferkitError("class_coverage: a multi-label model's sets are already per label; use coverage")


def decide(predictor: Predictor, paths: list[str], outputs: np.ndarray, top_k: int, reject: bool = True, *,
           coverage: float | None = None, max_error: float | None = None, expected_error: float | None = None,
           class_coverage: float | None = None) -> list[dict]:
    """Result rows of ``outputs`` by the predictor's task (``tasks.task_of`` its metadata; single-label:
    ``SingleLabel.decide``) with the guarantees of the calibration the model file carries (one line saying so
    where it has none): ``coverage`` / ``class_coverage`` (per-class, Mondrian) the rows' ``set``;
    ``max_error`` (certified, ``models.conformal.answer_threshold``) / ``expected_error`` (conformal risk
    control) the rows' ``abstain``. An abstaining row keeps its top-k; its ``label`` and ``probability`` are None
    and a multi-label row's ``labels`` empty (no row names a label it does not answer)."""
    from transferkit.tasks import task_of

    task = task_of(predictor.metadata)
    asked = {"coverage": coverage, "max_error": max_error, "expected_error": expected_error,
             "class_coverage": class_coverage}
    _check_asked(task, asked)
    conformal = next((_calibration(predictor, task, k) for k, v in asked.items() if v is not None), None)
    rows = task.decide(paths, outputs, predictor.class_names, top_k, predictor.metadata.get("novelty"), reject,
                       **({"conformal": conformal, "coverage": coverage, "max_error": max_error}
                          if coverage is not None or max_error is not None else {}))
    if conformal is not None:
        _more_guarantees(rows, outputs, predictor, task, conformal, expected_error, class_coverage)
        _say_uncertified(conformal, max_error)
    for row in rows:
        if row.get("abstain"):
            row |= {"label": None, "probability": None} | ({"labels": []} if "labels" in row else {})
    return rows


def _more_guarantees(rows, outputs, predictor, task, conformal, expected_error, class_coverage) -> None:
    """The rows' ``abstain`` under conformal risk control (``expected_error``) and Mondrian ``set``
    (``class_coverage``, with a warning naming each class too small for the level)."""
    from transferkit.models import conformal as cp
    from transferkit.models.conformal_labels import set_confidence
    from transferkit.models.novelty import split_outputs

    names = predictor.class_names
    probs = split_outputs(outputs, len(names))[0]
    if expected_error is not None:
        confidence = (set_confidence(probs, task.decision_thresholds(len(names))) if task.multi_label
                      else np.asarray(probs, np.float64).max(axis=1) if len(probs) else np.zeros(0))
        cut = cp.expected_threshold(conformal["risk"], expected_error)
        for row, c in zip(rows, confidence):  # the stored confidences are rounded to 1e-6
            row["abstain"] = bool(float(c) < cut - 10.0 ** -cp.DIGITS)
    if class_coverage is not None:
        need = cp.class_needed(class_coverage)
        short = [(names[c], s["n"]) for c, s in enumerate(conformal["per_class"]) if s["n"] < need]
        if short and (key := ("class", round(class_coverage, 6), tuple(short))) not in _noted:
            _noted.add(key)
            logger.warning(f"class coverage {class_coverage:g}: " + "; ".join(
                f"class {n} has {k} calibration photos, needs {need}" for n, k in short)
                + ": its label is in every set")
        for row, members in zip(rows, cp.class_sets(probs, conformal, class_coverage)):
            row["set"] = [names[j] for j in members]


def _uncertified(conformal, max_error: float | None) -> str | None:
    """The one line said where no cut-off of ``conformal``'s risk record is certified for ``max_error`` (every
    photo abstains), naming the smallest bound its calibration photos can certify; None where one is."""
    from transferkit.models import conformal as cp

    if max_error is None or not isinstance(conformal, dict) or not isinstance(conformal.get("risk"), dict):
        return None
    risk = conformal["risk"]
    return cp.uncertified_note(risk, max_error) if math.isinf(cp.answer_threshold(risk, max_error)) else None


def guarantee_note(predictor: Predictor, max_error: float | None) -> str | None:
    """:func:`_uncertified` of the model file's calibration (the server's ``note``)."""
    return _uncertified(predictor.metadata.get("conformal"), max_error)


def _say_uncertified(conformal: dict, max_error: float | None) -> None:
    """:func:`_uncertified` as a warning, once per bound and calibration."""
    note = _uncertified(conformal, max_error)
    if note and (key := ("max", max_error, len(conformal["risk"]["confidence"]))) not in _noted:
        _noted.add(key)
        logger.warning(note)


def guarantee_options(options) -> dict:
    """The guarantee options of ``options`` (a PredictOptions), as ``decide`` takes them."""
    return {k: getattr(options, k) for k in GUARANTEES}


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
                                 **guarantee_options(options))))
    errors = {s["path"]: s["reason"] for s in skipped}
    found = [rows.get(i) or {"path": f, "label": None, "probability": None, "top_k": [], "error": errors[f]}
             for i, f in enumerate(files)]
    for row in found:
        if row["path"] in given:
            row["given"] = given[row["path"]]
    return found
