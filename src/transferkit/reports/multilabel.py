"""Multi-label metrics and the report's multi-label part, all computed by scikit-learn: micro and macro F1,
per-label precision / recall / F1 / average precision, mAP (the mean of the labels' AP), subset accuracy (every
label of a photo right), Hamming loss (the share of wrong label cells), and the labels' co-occurrence picture
(how often two labels are on one photo, in the truth)."""

from __future__ import annotations

import html
import os

import numpy as np


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], thresholds: np.ndarray,
                       paths: list[str] | None = None, skipped: list[dict] | None = None,
                       n_wrong: int = 20) -> dict:
    """The metrics of ``probs`` (n, labels) against the indicator matrix ``y_true`` at ``thresholds``; also
    ``accuracy`` (= subset accuracy) so that summaries read as a single-label model's."""
    from sklearn.metrics import (average_precision_score, f1_score, hamming_loss, precision_recall_fscore_support)

    from transferkit.reports.metrics import Metrics

    y = np.asarray(y_true, dtype=int).reshape(len(probs), len(class_names))
    predicted = (probs >= thresholds).astype(int) if len(probs) else np.zeros_like(y)
    p, r, f, support = precision_recall_fscore_support(y, predicted, average=None, zero_division=0) if len(y) \
        else (np.zeros(len(class_names)),) * 4
    ap = [float(average_precision_score(y[:, j], probs[:, j])) if y[:, j].any() else None
          for j in range(len(class_names))]
    per_label = {n: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]), "ap": ap[j],
                     "support": int(support[j]), "threshold": round(float(thresholds[j]), 4)}
                 for j, n in enumerate(class_names)}
    scored = [a for a in ap if a is not None]
    subset = float((predicted == y).all(axis=1).mean()) if len(y) else 0.0
    result = Metrics({
        "task": "multi_label", "class_names": list(class_names), "n_images": int(len(y)),
        "micro_f1": float(f1_score(y, predicted, average="micro", zero_division=0)) if len(y) else 0.0,
        "macro_f1": float(f1_score(y, predicted, average="macro", zero_division=0)) if len(y) else 0.0,
        "mAP": float(np.mean(scored)) if scored else None,
        "subset_accuracy": subset, "accuracy": subset,
        "hamming_loss": float(hamming_loss(y, predicted)) if len(y) else 0.0,
        "per_label": per_label, "co_occurrence": (y.T @ y).astype(int).tolist(),
        "skipped": list(skipped or [])})
    if paths is not None:
        result["most_confident_errors"] = _gallery(y, predicted, probs, thresholds, class_names, paths,
                                                     n_wrong, wrong=True)
        result["least_confident_correct"] = _gallery(y, predicted, probs, thresholds, class_names, paths,
                                                       12, wrong=False)
    return result


def _gallery(y, predicted, probs, thresholds, class_names, paths, limit: int, wrong: bool) -> list[dict]:
    """Photos whose label set is wrong, the most confident first (the label cell furthest from its threshold
    among the wrong ones); or right, the least confident first (the cell nearest its threshold)."""
    index = np.flatnonzero((predicted != y).any(axis=1) == wrong)
    distance = np.abs(probs - thresholds)
    key = [float(distance[i][predicted[i] != y[i]].max()) if wrong else float(distance[i].min()) for i in index]
    order = index[np.argsort(-np.asarray(key) if wrong else np.asarray(key), kind="stable")][:limit]

    def names(row):
        return "|".join(class_names[j] for j in np.flatnonzero(row)) or "(none)"

    return [{"path": paths[i], "true": names(y[i]), "predicted": names(predicted[i]),
             "probability": float(probs[i].max())} for i in order]


def text_report(metrics: dict) -> str:
    names = metrics["class_names"]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'label':<{width}} {'precision':>9} {'recall':>7} {'f1':>6} {'AP':>6} {'support':>8} {'thr':>5}"]
    for n in names:
        s = metrics["per_label"][n]
        ap = f"{s['ap']:.3f}" if s["ap"] is not None else "  -  "
        lines.append(f"{n:<{width}} {s['precision']:>9.3f} {s['recall']:>7.3f} {s['f1']:>6.3f} {ap:>6} "
                     f"{s['support']:>8} {s['threshold']:>5.2f}")
    m_ap = f"{metrics['mAP']:.4f}" if metrics["mAP"] is not None else "-"
    lines.append(f"micro F1 {metrics['micro_f1']:.4f}  macro F1 {metrics['macro_f1']:.4f}  mAP {m_ap}  subset "
                 f"accuracy {metrics['subset_accuracy']:.4f}  Hamming loss {metrics['hamming_loss']:.4f}  "
                 f"({metrics['n_images']} images)")
    return "\n".join(lines)


def report_parts(metrics: dict, out: str) -> dict:
    """The report's multi-label part: the cards, the per-label table and the co-occurrence picture."""
    from transferkit.reports.plots import plot_cooccurrence

    e, names = html.escape, metrics["class_names"]
    m_ap = f"{metrics['mAP']:.4f}" if metrics["mAP"] is not None else "-"
    cards = "".join(f'<div class="card">{label}<b{attr}>{value}</b></div>\n' for label, value, attr in (
        ("subset accuracy", f"{metrics['subset_accuracy']:.4f}", ' id="accuracy"'),
        ("micro F1", f"{metrics['micro_f1']:.4f}", ""), ("macro F1", f"{metrics['macro_f1']:.4f}", ""),
        ("mAP", m_ap, ' id="map"'), ("Hamming loss", f"{metrics['hamming_loss']:.4f}", "")))
    rows = "".join(
        f"<tr class='per-label'><td>{e(n)}</td><td>{s['precision']:.3f}</td><td>{s['recall']:.3f}</td>"
        f"<td>{s['f1']:.3f}</td><td>{'-' if s['ap'] is None else format(s['ap'], '.3f')}</td>"
        f"<td>{s['support']}</td><td>{s['threshold']:.2f}</td></tr>"
        for n, s in ((n, metrics["per_label"][n]) for n in names))
    tables = ("<h2>Per label</h2>\n<table id=\"per-label\"><thead><tr><th>label</th><th>precision</th>"
              "<th>recall</th><th>F1</th><th>AP</th><th>support</th><th>threshold</th></tr></thead>"
              f"<tbody>{rows}</tbody></table>\n")
    png = plot_cooccurrence(metrics["co_occurrence"], names, os.path.join(out, "label_cooccurrence.png"))
    return {"cards": cards, "tables": tables, "figures": [("Labels on the same photo (truth)", png)]}
