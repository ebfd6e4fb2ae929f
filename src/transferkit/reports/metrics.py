"""Classification metrics as plain data (scikit-learn), shared by training, evaluation and the reports."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, f1_score


class Metrics(dict):
    """A metrics dict, as JSON as before (``json.dumps``, ``metrics["accuracy"]``), that a notebook shows as the
    per-class table, accuracy and confusion matrix (``_repr_html_``)."""

    def _repr_html_(self) -> str:
        from transferkit.reports.notebook import metrics_html

        return metrics_html(self)


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], paths: list[str] | None = None,
                    skipped: list[dict] | None = None, n_wrong: int = 20, n_unsure: int = 12) -> dict:
    """Accuracy, per-class precision/recall/F1/support, confusion matrix (rows = truth), the most confidently
    wrong images and the least confident right ones, as a JSON-ready dict."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    labels = list(range(len(class_names)))
    report = classification_report(y_true, y_pred, labels=labels, target_names=class_names, output_dict=True,
                                   zero_division=0)
    per_class = {
        name: {k: (int(report[name][k]) if k == "support" else float(report[name][k]))
               for k in ("precision", "recall", "f1-score", "support")}
        for name in class_names
    }
    for stats in per_class.values():
        stats["f1"] = stats.pop("f1-score")
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    result = Metrics({
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "class_names": list(class_names),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "n_images": int(len(y_true)),
        "skipped": list(skipped or []),
    })
    if paths is not None:
        def entries(index):
            return [{"path": paths[i], "true": class_names[y_true[i]], "predicted": class_names[y_pred[i]],
                     "probability": float(probs[i, y_pred[i]])} for i in index]

        wrong = np.flatnonzero(y_true != y_pred)
        right = np.flatnonzero(y_true == y_pred)
        result["most_confident_errors"] = entries(wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:n_wrong])
        result["least_confident_correct"] = entries(right[np.argsort(probs[right, y_pred[right]], kind="stable")][:n_unsure])
    return result


def text_report(metrics: dict) -> str:
    """The scikit-learn style table a person reads, from a metrics dict."""
    names = metrics["class_names"]
    width = max([len(n) for n in names] + [12])
    lines = [f"{'':>{width}}  precision    recall  f1-score   support", ""]
    for name in names:
        s = metrics["per_class"][name]
        lines.append(f"{name:>{width}}  {s['precision']:9.3f} {s['recall']:9.3f} {s['f1']:9.3f} {s['support']:9d}")
    lines.append("")
    lines.append(f"{'accuracy':>{width}}  {'':9} {'':9} {metrics['accuracy']:9.3f} {metrics['n_images']:9d}")
    lines.append(f"{'macro f1':>{width}}  {'':9} {'':9} {metrics['macro_f1']:9.3f}")
    lines.append(f"{'weighted f1':>{width}}  {'':9} {'':9} {metrics['weighted_f1']:9.3f}")
    lines.extend(_trust_lines(metrics))
    if metrics.get("skipped"):
        lines.append(f"\nskipped {len(metrics['skipped'])} unreadable file(s):")
        lines.extend(f"  {s['path']}: {s['reason']}" for s in metrics["skipped"])
    return "\n".join(lines)


def _trust_lines(metrics: dict) -> list[str]:
    lines = []
    ece = (metrics.get("calibration") or {}).get("ece")
    if ece is not None:
        lines.append(f"\ncalibration error (ECE) {ece:.3f}")
    if "novelty" in metrics:
        lines.append(f"known test photos kept {metrics['novelty']['known_kept']:.1%} (the rest answered 'unknown')")
    if "unknown" in metrics:
        u = metrics["unknown"]
        lines.append(f"unknowns ({u['n_images']} photos in {u['dir']}) rejected {u['rejected']:.1%}; AUROC "
                     f"{u['auroc']:.3f} (top probability alone: {u['auroc_top_probability']:.3f})")
    return lines
