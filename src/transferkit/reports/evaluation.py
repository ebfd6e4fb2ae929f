"""Evaluate any ``Predictor`` on a labelled test folder: scikit-learn metrics, confusion matrix, report.html.

This is the one evaluation: ``transferkit evaluate``, ``ImageClassifier.evaluate`` and the test metrics that
``train`` prints all come through here. A predictor that can answer from cached features (a classifier whose
backbone is still the frozen one it extracted them with) offers ``predict_files``; it is used when present, so
training's test evaluation costs no second pass through the backbone.
"""

from __future__ import annotations

import os

from transferkit.data.folders import scan_folder
from transferkit.engines.base import Predictor
from transferkit.engines.predict import files_to_probs
from transferkit.errors import TransferkitError
from transferkit.files import write_json_atomic
from transferkit.models.novelty import split_outputs
from transferkit.reports.trust import trust_figures, trust_metrics
from transferkit.reports.explain import report_overlays
from transferkit.reports.guarantees import conformal_metrics, conformal_section
from transferkit.reports.html import model_summary, write_report
from transferkit.options import DEFAULT_PREDICT
from transferkit.tasks import task_of


def evaluate_predictor(predictor: Predictor, test_dir: str, *, out: str | None = None,
                       batch_size: int = DEFAULT_PREDICT.batch_size,
                       title: str | None = None, history_png: str | None = None,
                       unknown_dir: str | None = None, explain: bool = True, max_error: float | None = None) -> dict:
    """Metrics of ``predictor`` on ``test_dir/<class>/``; with ``out``, writes metrics.json and report.html (with
    confusion_matrix.png, confusion_matrix_normalised.png, reliability.png) there. Class folders are matched to
    the model's classes by name, never by order. ``unknown_dir``: photos of none of the classes, to measure how
    many the novelty score rejects (metrics["unknown"], novelty.png, confusion_unknown.png). ``explain``: the
    report's galleries show each photo's heat map (a ``.keras`` model: its Keras model is loaded for them).
    ``test_dir`` may be a label file: its test rows where it has a split column, else every row. A model with a
    conformal calibration gets ``conformal`` (``reports.guarantees``; ``max_error``: that bound too)."""
    from transferkit.data import labelfile

    task = task_of(predictor.metadata)
    if labelfile.is_label_source(test_dir):
        test_dir = labelfile.for_evaluation(_read_as_trained(test_dir, predictor.metadata, task))
    elif task.multi_label:
        raise TransferkitError(f"{test_dir}: a multi-label model is evaluated on a label file (labels.csv whose "
                               f"label column lists each photo's labels), not on class folders")
    data = scan_folder(test_dir, class_names=predictor.class_names)
    outputs, kept, skipped = files_to_probs(predictor, data.paths, batch_size)
    probs, scores = split_outputs(outputs, len(predictor.class_names))
    labels = data.labels[kept]
    metrics = task.metrics(labels, probs, predictor.class_names, [data.paths[i] for i in kept],
                           data.skipped + skipped)
    found, arrays = trust_metrics(predictor, labels, probs, scores, unknown_dir, batch_size, task)
    metrics |= found
    metrics |= conformal_metrics(predictor, labels, probs, max_error)
    if out:
        os.makedirs(out, exist_ok=True)
        write_json_atomic(os.path.join(out, "metrics.json"), metrics)
        if history_png is None and predictor.path:
            history_png = os.path.join(os.path.dirname(os.path.abspath(predictor.path)), "history.png")
        name = os.path.basename(predictor.path or "model")
        write_report(metrics, out, title=title or f"Evaluation of {name} on {test_dir}",
                     history_png=history_png, model_info=model_summary(predictor.metadata),
                     extra_figures=trust_figures(found, arrays, out),
                     overlays=report_overlays(predictor, metrics) if explain and not task.multi_label else None,
                     task=task, sections=conformal_section(metrics))
    return metrics


def _read_as_trained(source, metadata: dict, task):
    """A label file read as the model's training read its labels (multi-label: with its separator)."""
    from dataclasses import replace

    from transferkit.data import labelfile

    source = labelfile.as_label_file(source)
    if not task.multi_label:
        return source
    sep = (metadata.get("training") or {}).get("label_sep") or "|"
    return replace(source, multi_label=True, label_sep=source.label_sep if source.multi_label else sep)
