"""What a notebook shows for a classifier and its metrics (``_repr_html_``): the class table, accuracy and macro
F1, and the confusion matrix as an inline PNG, so ``clf`` or ``clf.evaluate("test/")`` as a cell's last line is
readable without opening report.html. Plain HTML and one base64 image: no JavaScript, nothing to install."""

from __future__ import annotations

import base64
import html
import os
import tempfile

STYLE = ("<style>.tk table{border-collapse:collapse;margin:4px 0}.tk td,.tk th{border:1px solid #ccc;"
         "padding:2px 8px;text-align:right}.tk th:first-child,.tk td:first-child{text-align:left}</style>")


def confusion_png(cm, class_names: list[str]) -> bytes:
    """The report's confusion-matrix picture, as PNG bytes."""
    from transferkit.reports.plots import plot_confusion_matrix

    with tempfile.TemporaryDirectory(prefix="tk-notebook-") as tmp:
        path = plot_confusion_matrix(cm, class_names, os.path.join(tmp, "confusion.png"))
        with open(path, "rb") as f:
            return f.read()


def _img(png: bytes, alt: str) -> str:
    return (f"<img class='confusion' alt='{html.escape(alt)}' style='max-width:420px' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'/>")


def _rows(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figures(m: dict, name: str, table: bool = True, picture: bool = True) -> str:
    """One metrics dict (compute_metrics's, or a model file's summary of it): the figures, the per-class table,
    the confusion matrix."""
    parts = [f"<p><b>{html.escape(name)}</b>: accuracy <b class='accuracy'>{m['accuracy']:.4f}</b>, macro F1 "
             f"<b class='macro_f1'>{m['macro_f1']:.4f}</b>"
             + (f" on {m['n_images']} images" if m.get("n_images") is not None else "") + "</p>"]
    if table and m.get("per_class"):
        parts.append(_rows(["class", "precision", "recall", "F1", "images"],
                           [[n, s["precision"], s["recall"], s["f1"], s["support"]]
                            for n, s in m["per_class"].items()]))
    names = m.get("class_names") or list(m.get("per_class") or {})
    if picture and m.get("confusion_matrix") and names:
        parts.append(_img(confusion_png(m["confusion_matrix"], names), f"{name} confusion matrix"))
    return "".join(parts)


def metrics_html(metrics: dict) -> str:
    """A metrics dict (``evaluate``) or a run's summary (``fit().summary()``, ``transferkit.train``) as HTML."""
    if "accuracy" in metrics:
        return f"<div class='tk'>{STYLE}{_figures(metrics, 'metrics')}</div>"
    parts = [_figures(metrics[k], k) for k in ("validation", "test") if isinstance(metrics.get(k), dict)]
    if metrics.get("model_path"):
        parts.insert(0, f"<p>model <code>{html.escape(str(metrics['model_path']))}</code></p>")
    return f"<div class='tk'>{STYLE}{''.join(parts)}</div>"


def classifier_html(clf) -> str:
    """An ``ImageClassifier``: its options when not fitted; else backbone, classes with their image counts, the
    validation (and test) figures and a confusion matrix."""
    if clf.model_ is None:
        given = _rows(["option", "value"], [[k, str(v)] for k, v in clf.get_params().items()])
        return f"<div class='tk'>{STYLE}<p><b>ImageClassifier</b> (not fitted)</p>{given}</div>"
    meta = clf.metadata
    counts = (meta.get("data") or {}).get("counts") or {}
    per_class = (clf.validation_ or {}).get("per_class") or {}
    rows = [[n, counts.get(n, {}).get("train", ""), counts.get(n, {}).get("validation", ""),
             per_class.get(n, {}).get("f1", "")] for n in clf.classes_]
    head = (f"<p><b>ImageClassifier</b>: {html.escape(str(meta.get('backbone')))} at {clf.image_size} px, "
            f"{len(clf.classes_)} classes" + (f", <code>{html.escape(clf.path)}</code>" if clf.path else "") + "</p>")
    parts = [head, _rows(["class", "train", "validation", "validation F1"], rows)]
    for name in ("validation", "test"):  # the classes' table is above; one confusion matrix (validation's)
        m = getattr(clf, name + "_")
        if m:
            parts.append(_figures(dict(m) | {"class_names": clf.classes_}, name, table=False,
                                  picture=name == "validation"))
    return f"<div class='tk'>{STYLE}{''.join(parts)}</div>"
