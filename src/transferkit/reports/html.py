"""The evaluation report a person opens: one self-contained ``report.html`` (pictures embedded, no network)
with accuracy, F1, the per-class table, both confusion matrices, the most-confused class pairs, the most
confidently wrong images and the training curves when a history exists."""

from __future__ import annotations

import base64
import html
import io
import os

import numpy as np

from transferkit.files import write_text_atomic
from transferkit.data.images import UnreadableImage, open_rgb
from transferkit.reports.plots import plot_confusion_matrix

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} .muted{color:#666} table{border-collapse:collapse;margin:1rem 0}
th,td{padding:.3rem .8rem;border-bottom:1px solid #ddd;text-align:right} th:first-child,td:first-child{text-align:left}
.cards{display:flex;gap:1rem;flex-wrap:wrap} .card{background:#f4f6fa;border-radius:8px;padding:.8rem 1.2rem}
.card b{display:block;font-size:1.6rem} .figs img{max-width:100%;margin:.5rem 0}
.gallery{display:flex;flex-wrap:wrap;gap:1rem} .gallery figure{margin:0;font-size:.85rem;max-width:300px}
.gallery img{width:140px;height:140px;object-fit:cover;border-radius:6px;border:3px solid #c33;margin-right:4px}
#least-sure img{border-color:#c90} .gallery img.heatmap{border-color:#557}
"""


def _gallery(entries: list[dict], overlays: dict[str, str], limit: int) -> list[str]:
    """One figure per entry: the photo, its heat map where ``overlays`` has one, predicted / true classes."""
    e = html.escape
    figures = []
    for w in entries[:limit]:
        uri = _thumbnail_uri(w["path"])
        if not uri:
            continue
        name = e(os.path.basename(w["path"]))
        heat = overlays.get(w["path"])
        heat_img = f"<img class='heatmap' src='{heat}' alt='heat map of {name}'>" if heat else ""
        truth = f"true: {e(w['true'])}<br>" if w["true"] != w["predicted"] else ""
        figures.append(f"<figure><img class='photo' src='{uri}' alt='{name}'>{heat_img}"
                       f"<figcaption><b>{e(w['predicted'])}</b> ({w['probability']:.3f})<br>{truth}"
                       f"<span class='muted'>{name}</span></figcaption></figure>")
    return figures


def most_confused(cm, class_names: list[str], limit: int = 10) -> list[dict]:
    """Off-diagonal cells of the confusion matrix, largest first: (true, predicted, count)."""
    cm = np.asarray(cm)
    cells = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [{"true": class_names[i], "predicted": class_names[j], "count": n} for n, i, j in cells[:limit]]


def _png_data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _thumbnail_uri(path: str, size: int = 180) -> str | None:
    try:
        img = open_rgb(path, draft_size=size * 2)
    except (UnreadableImage, OSError):
        return None
    img.thumbnail((size * 2, size * 2))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def model_summary(metadata: dict) -> dict:
    """The few facts about a model that head its report."""
    training, fit = metadata.get("training", {}), metadata.get("fit", {})
    return {k: v for k, v in (("backbone", metadata.get("backbone")), ("image size", metadata.get("image_size")),
                              ("kept epoch", fit.get("best_epoch")), ("head", training.get("head")),
                              ("transferkit", metadata.get("transferkit_version"))) if v is not None}


def _trust_cards(metrics: dict) -> str:
    """Cards for calibration and, where measured, known photos kept and unknowns rejected."""
    cards = []
    calibration = metrics.get("calibration") or {}
    if calibration.get("ece") is not None:
        cards.append(("calibration error (ECE)", f"{calibration['ece']:.3f}"))
    if calibration.get("validation_ece_before") is not None:
        fitted = "a temperature per label" if calibration.get("temperature") is None else \
            f"temperature {calibration['temperature']:g}"
        cards.append((f"validation ECE, {fitted}",
                      f"{calibration['validation_ece_before']:.3f} → {calibration['validation_ece_after']:.3f}"))
    if "novelty" in metrics:
        cards.append(("known photos kept", f"{metrics['novelty']['known_kept']:.1%}"))
    if "unknown" in metrics:
        u = metrics["unknown"]
        cards += [("unknowns rejected", f"{u['rejected']:.1%}"), ("unknown AUROC", f"{u['auroc']:.3f}")]
    return "".join(f"<div class='card'>{html.escape(k)}<b>{v}</b></div>" for k, v in cards)


def _heat_note(overlays: dict | None) -> str:
    if not overlays:
        return ""
    return ("<p class='muted'>Beside each photo, its heat map (Grad-CAM of the predicted class): red where the "
            "model looked. A map on the background rather than the object is a model that learnt the wrong cue."
            "</p>")


def confusion_parts(metrics: dict, out: str) -> dict:
    """The single-label task's part of the report (``tasks.SingleLabel.report_parts``): the accuracy and F1
    cards, the per-class table, the most-confused pairs, and both confusion matrices (written to ``out``)."""
    names, e = metrics["class_names"], html.escape
    cm_png = plot_confusion_matrix(metrics["confusion_matrix"], names, os.path.join(out, "confusion_matrix.png"))
    cmn_png = plot_confusion_matrix(metrics["confusion_matrix"], names,
                                    os.path.join(out, "confusion_matrix_normalised.png"), normalise=True)
    rows = "".join(
        f"<tr class='per-class'><td>{e(n)}</td><td>{s['precision']:.3f}</td><td>{s['recall']:.3f}</td>"
        f"<td>{s['f1']:.3f}</td><td>{s['support']}</td></tr>"
        for n, s in ((n, metrics["per_class"][n]) for n in names)
    )
    pairs = most_confused(metrics["confusion_matrix"], names)
    pair_rows = "".join(f"<tr><td>{e(p['true'])}</td><td>{e(p['predicted'])}</td><td>{p['count']}</td></tr>"
                        for p in pairs) or "<tr><td colspan=3>no confusion</td></tr>"
    cards = f"""<div class="card">accuracy<b id="accuracy">{metrics['accuracy']:.4f}</b></div>
<div class="card">macro F1<b>{metrics['macro_f1']:.4f}</b></div>
<div class="card">weighted F1<b>{metrics['weighted_f1']:.4f}</b></div>
"""
    tables = f"""<h2>Per class</h2>
<table id="per-class"><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr></thead>
<tbody>{rows}</tbody></table>
<h2>Most confused pairs</h2>
<table id="confused"><thead><tr><th>true</th><th>predicted as</th><th>images</th></tr></thead><tbody>{pair_rows}</tbody></table>
"""
    figures = [("Confusion matrix (counts)", cm_png), ("Confusion matrix (row-normalised: recall)", cmn_png)]
    return {"cards": cards, "tables": tables, "figures": figures}


def write_report(metrics: dict, out: str, title: str = "Evaluation report", history_png: str | None = None,
                 model_info: dict | None = None, extra_figures: list | None = None,
                 overlays: dict[str, str] | None = None, sections: str = "", task=None) -> str:
    """Write report.html in ``out``: the task's part (``Task.report_parts``; single-label: the cards, tables and
    both confusion matrices), the trust cards, ``extra_figures``, the training curves ``history_png`` when given,
    the galleries and the skipped files. ``overlays``: {image path: data URI of its heat map} for the galleries;
    ``sections``: more HTML at the end (the label audit)."""
    from transferkit.tasks import get_task

    os.makedirs(out, exist_ok=True)
    e = html.escape
    parts = (task or get_task()).report_parts(metrics, out)
    figures = list(parts["figures"]) + list(extra_figures or [])
    if history_png and os.path.exists(history_png):
        figures.append(("Training curves", history_png))
    gallery = _gallery(metrics.get("most_confident_errors", []), overlays or {}, 24)
    unsure = _gallery(metrics.get("least_confident_correct", []), overlays or {}, 12)
    skipped = "".join(f"<li>{e(s['path'])}: {e(s['reason'])}</li>" for s in metrics.get("skipped", []))
    info = ""
    if model_info:
        info = "<p class='muted'>" + " · ".join(f"{e(str(k))}: {e(str(v))}" for k, v in model_info.items()) + "</p>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style></head><body>
<h1>{e(title)}</h1>{info}
<div class="cards">
{parts['cards']}<div class="card">images<b>{metrics['n_images']}</b></div>
{_trust_cards(metrics)}
</div>
{parts['tables']}<div class="figs">{''.join(f'<h2>{e(t)}</h2><img src="{_png_data_uri(p)}" alt="{e(t)}">' for t, p in figures)}</div>
<h2>Most confidently wrong</h2>{_heat_note(overlays)}
<div class="gallery" id="wrong">{''.join(gallery) or '<p>No errors.</p>'}</div>
<h2>Least confident right</h2>
<div class="gallery" id="least-sure">{''.join(unsure) or '<p>No right answers.</p>'}</div>
{sections}
{f'<h2>Skipped files</h2><ul>{skipped}</ul>' if skipped else ''}
</body></html>
"""
    path = os.path.join(out, "report.html")
    write_text_atomic(path, page)
    return path


def label_audit_section(audit, csv_path: str | None = None, limit: int = 24) -> str:
    """The label audit as HTML: a gallery and a table of the suspect labels (given -> suggested, score), and the
    outliers; ``audit`` is a ``training.audit.LabelAudit``."""
    e = html.escape
    issues, outliers = audit.label_issues(), audit.outliers()

    def figures(rows, kind):
        shown = []
        for r in rows[:limit]:
            uri = _thumbnail_uri(r["path"])
            if uri:
                name = e(os.path.basename(r["path"]))
                what = (f"<b>{e(r['given'])}</b> → {e(r['suggested'])}" if kind == "label"
                        else f"<b>{e(r['given'])}</b> (outlier)")
                shown.append(f"<figure><img class='photo' src='{uri}' alt='{name}'><figcaption>{what}<br>"
                             f"score {r['score']:.3f}<br><span class='muted'>{name}</span></figcaption></figure>")
        return "".join(shown)

    table = "".join(f"<tr><td>{n}</td><td>{e(r['path'])}</td><td>{e(r['given'])}</td><td>{e(r['suggested'])}</td>"
                    f"<td>{r['score']:.3f}</td></tr>" for n, r in enumerate(issues, start=1))
    where = f" Mark <code>yes</code> in the <code>move</code> column of {e(csv_path)}, then run " \
            f"<code>transferkit inspect DATA --move-to QUARANTINE/</code> (files are moved, never deleted)." \
        if csv_path else ""
    summary = audit.to_json()["label_audit"]
    return f"""<h2 id="label-audit">Label audit</h2>
<p class="muted">{summary['images']} training photos, each predicted by a head that never saw it ({summary['folds']}
folds; out-of-fold accuracy {summary['out_of_fold_accuracy']:.1%}); cleanlab flags {len(issues)} whose folder
disagrees with that prediction, most suspect first (score = 1 - the probability of the given class).{where}</p>
<div class="gallery" id="suspects">{figures(issues, 'label') or '<p>No suspect label.</p>'}</div>
<table id="label-issues"><thead><tr><th>#</th><th>path</th><th>given</th><th>suggested</th><th>score</th></tr>
</thead><tbody>{table or '<tr><td colspan=5>none</td></tr>'}</tbody></table>
<h3>Outliers</h3><p class="muted">Photos far from every other training photo (another kind of picture, or a
broken one).</p>
<div class="gallery" id="outliers">{figures(outliers, 'outlier') or '<p>No outlier.</p>'}</div>"""


def write_label_report(audit, path: str, csv_path: str | None = None) -> str:
    """labels.html: the label audit on a page of its own (``transferkit inspect DATA --labels``)."""
    e = html.escape
    title = f"Label audit of {os.path.basename(os.path.commonpath(audit.paths)) or 'DATA'}" \
        if audit.paths else "Label audit"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style></head><body>
<h1>{e(title)}</h1>
{label_audit_section(audit, csv_path, limit=60)}
</body></html>
"""
    write_text_atomic(path, page)
    return path
