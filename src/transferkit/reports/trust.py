"""What an evaluation says about trust: calibration (expected calibration error and a reliability diagram) and,
for a model with a novelty score, how many known test photos it keeps and, given a folder of photos of none of
the classes (``--unknown-dir``), how many of those it rejects, the AUROC of the score, a histogram of the scores
and the confusion matrix with an "unknown" row and column."""

from __future__ import annotations

import os

import numpy as np

from transferkit.data.folders import expand_paths
from transferkit.engines.predict import files_to_probs
from transferkit.errors import TransferkitError
from transferkit.models.novelty import expected_calibration_error, split_outputs

UNKNOWN = "unknown"


def trust_metrics(predictor, labels: np.ndarray, probs: np.ndarray, scores, unknown_dir: str | None,
                  batch_size: int = 32, task=None) -> tuple[dict, dict]:
    """(metrics entries {"calibration", "novelty"?, "unknown"?}, arrays for the figures). The calibration is
    measured on ``task.calibration_cells`` (multi-label: every photo-label cell)."""
    from transferkit.tasks import get_task

    task = task or get_task()
    stored = predictor.metadata.get("novelty") or {}
    cell_probs, cell_labels = task.calibration_cells(probs, labels)
    found = {"calibration": {"ece": round(expected_calibration_error(cell_probs, cell_labels), 4) if len(labels)
                             else None, "temperature": stored.get("temperature"),
                             "validation_ece_before": stored.get("ece_before"),
                             "validation_ece_after": stored.get("ece_after")}}
    arrays = {"labels": cell_labels, "probs": cell_probs, "scores": scores}
    threshold = 1.0  # the model outputs its novelty score over its own threshold
    if scores is None or not predictor.metadata.get("novelty"):
        if unknown_dir:
            raise TransferkitError(f"{predictor.path or 'this model'} has no novelty score (trained before "
                                   f"transferkit could say 'unknown'); retrain it to evaluate with --unknown-dir")
        return found, arrays
    found["novelty"] = {"threshold": predictor.metadata["novelty"]["threshold"],
                        "known_kept": float((scores <= threshold).mean()),
                        "known_rejected": int((scores > threshold).sum())}
    if unknown_dir:
        paths = expand_paths([unknown_dir])
        outputs, kept, _ = files_to_probs(predictor, paths, batch_size)
        if not kept:
            raise TransferkitError(f"{unknown_dir}: no readable image of unknowns")
        u_probs, u_scores = split_outputs(outputs, len(predictor.class_names))
        arrays |= {"unknown_scores": u_scores, "unknown_probs": u_probs, "threshold": threshold}
        found["unknown"] = _unknown_summary(labels, probs, scores, u_probs, u_scores, threshold,
                                            predictor.class_names, unknown_dir, confusion=not task.multi_label)
    return found, arrays


def _unknown_summary(labels, probs, scores, u_probs, u_scores, threshold, names, unknown_dir,
                     confusion: bool = True) -> dict:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(scores)), np.ones(len(u_scores))]
    top = np.r_[probs.max(axis=1), u_probs.max(axis=1)]
    found = {"dir": os.path.basename(os.path.normpath(unknown_dir)), "n_images": int(len(u_scores)),
             "auroc": float(roc_auc_score(y, np.r_[scores, u_scores])),
             "auroc_top_probability": float(roc_auc_score(y, -top)),
             "rejected": float((u_scores > threshold).mean()), "known_kept": float((scores <= threshold).mean())}
    if confusion:  # one class per photo: the confusion matrix with an unknown row and column
        found |= {"class_names": list(names) + [UNKNOWN],
                  "confusion_matrix": unknown_confusion(labels, probs, scores, u_probs, u_scores, threshold).tolist()}
    return found


def unknown_confusion(labels, probs, scores, u_probs, u_scores, threshold) -> np.ndarray:
    """Counts (true class or unknown) x (predicted class or unknown); above the threshold is predicted unknown."""
    n = probs.shape[1]
    predicted = lambda p, s: np.where(s > threshold, n, p.argmax(axis=1))  # noqa: E731
    cm = np.zeros((n + 1, n + 1), np.int64)
    np.add.at(cm, (labels, predicted(probs, scores)), 1)
    np.add.at(cm, (np.full(len(u_scores), n), predicted(u_probs, u_scores)), 1)
    return cm


def trust_figures(found: dict, arrays: dict, out: str) -> list[tuple[str, str]]:
    """The pictures of ``trust_metrics`` written in ``out``: (title, png path) for the report."""
    from transferkit.reports.plots import plot_confusion_matrix, plot_novelty, plot_reliability

    figures = []
    if len(arrays["labels"]):
        figures.append(("Reliability (calibration)", plot_reliability(
            arrays["probs"], arrays["labels"], os.path.join(out, "reliability.png"))))
    if "unknown" in found:
        figures.append(("Novelty scores: known test photos vs unknowns", plot_novelty(
            arrays["scores"], arrays["unknown_scores"], arrays["threshold"], os.path.join(out, "novelty.png"))))
        u = found["unknown"]
    if "confusion_matrix" in found.get("unknown", {}):
        figures.append(("Confusion matrix with unknowns", plot_confusion_matrix(
            np.asarray(u["confusion_matrix"]), u["class_names"], os.path.join(out, "confusion_unknown.png"))))
    return figures
