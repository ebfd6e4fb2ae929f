"""Evaluate a model file on a labelled test folder: scikit-learn report, accuracy, confusion matrix."""

from __future__ import annotations

import os

from transferkit.dataset import scan_folder
from transferkit.files import write_json_atomic
from transferkit.metrics import compute_metrics
from transferkit.report import model_summary, write_report
from transferkit.prediction import load_model, predict_proba


def evaluate(model, test_dir: str, out: str | None = None, batch_size: int = 32, runtime: str = "keras",
             precision: str = "auto") -> dict:
    """Metrics of ``model`` (path or loaded) on ``test_dir/<class>/``; with ``out``, writes metrics.json and
    report.html (with confusion_matrix.png, confusion_matrix_normalised.png) there. Class folders are matched
    to the model's classes by name, never by order."""
    model = load_model(model, runtime, precision) if isinstance(model, (str, os.PathLike)) else model
    data = scan_folder(test_dir, class_names=model.class_names)
    probs, kept, skipped = predict_proba(model, data.paths, batch_size=batch_size)
    metrics = compute_metrics(data.labels[kept], probs, model.class_names, [data.paths[i] for i in kept],
                              data.skipped + skipped)
    if out:
        os.makedirs(out, exist_ok=True)
        write_json_atomic(os.path.join(out, "metrics.json"), metrics)
        history_png = os.path.join(os.path.dirname(os.path.abspath(model.path)), "history.png") if model.path else None
        write_report(metrics, out, title=f"Evaluation of {os.path.basename(model.path or 'model')} on {test_dir}",
                     history_png=history_png, model_info=model_summary(model.metadata))
    return metrics
