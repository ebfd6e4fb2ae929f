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
.gallery{display:flex;flex-wrap:wrap;gap:1rem} .gallery figure{margin:0;width:180px;font-size:.85rem}
.gallery img{width:180px;height:180px;object-fit:cover;border-radius:6px;border:3px solid #c33}
"""


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
        cards.append((f"validation ECE, temperature {calibration['temperature']:g}",
                      f"{calibration['validation_ece_before']:.3f} → {calibration['validation_ece_after']:.3f}"))
    if "novelty" in metrics:
        cards.append(("known photos kept", f"{metrics['novelty']['known_kept']:.1%}"))
    if "unknown" in metrics:
        u = metrics["unknown"]
        cards += [("unknowns rejected", f"{u['rejected']:.1%}"), ("unknown AUROC", f"{u['auroc']:.3f}")]
    return "".join(f"<div class='card'>{html.escape(k)}<b>{v}</b></div>" for k, v in cards)


def write_report(metrics: dict, out: str, title: str = "Evaluation report", history_png: str | None = None,
                 model_info: dict | None = None, extra_figures: list | None = None) -> str:
    """Write confusion_matrix.png, confusion_matrix_normalised.png and report.html (embedding those and, when
    given, the training curves ``history_png``) in ``out``."""
    os.makedirs(out, exist_ok=True)
    names = metrics["class_names"]
    e = html.escape
    cm_png = plot_confusion_matrix(metrics["confusion_matrix"], names, os.path.join(out, "confusion_matrix.png"))
    cmn_png = plot_confusion_matrix(metrics["confusion_matrix"], names,
                                    os.path.join(out, "confusion_matrix_normalised.png"), normalise=True)
    figures = [("Confusion matrix (counts)", cm_png), ("Confusion matrix (row-normalised: recall)", cmn_png)]
    figures += list(extra_figures or [])
    if history_png and os.path.exists(history_png):
        figures.append(("Training curves", history_png))

    rows = "".join(
        f"<tr class='per-class'><td>{e(n)}</td><td>{s['precision']:.3f}</td><td>{s['recall']:.3f}</td>"
        f"<td>{s['f1']:.3f}</td><td>{s['support']}</td></tr>"
        for n, s in ((n, metrics["per_class"][n]) for n in names)
    )
    pairs = most_confused(metrics["confusion_matrix"], names)
    pair_rows = "".join(f"<tr><td>{e(p['true'])}</td><td>{e(p['predicted'])}</td><td>{p['count']}</td></tr>"
                        for p in pairs) or "<tr><td colspan=3>no confusion</td></tr>"
    gallery = []
    for w in metrics.get("most_confident_errors", [])[:24]:
        uri = _thumbnail_uri(w["path"])
        if uri:
            gallery.append(f"<figure><img src='{uri}' alt='{e(os.path.basename(w['path']))}'>"
                           f"<figcaption><b>{e(w['predicted'])}</b> ({w['probability']:.3f})<br>"
                           f"true: {e(w['true'])}<br><span class='muted'>{e(os.path.basename(w['path']))}</span>"
                           f"</figcaption></figure>")
    skipped = "".join(f"<li>{e(s['path'])}: {e(s['reason'])}</li>" for s in metrics.get("skipped", []))
    info = ""
    if model_info:
        info = "<p class='muted'>" + " · ".join(f"{e(str(k))}: {e(str(v))}" for k, v in model_info.items()) + "</p>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style></head><body>
<h1>{e(title)}</h1>{info}
<div class="cards">
<div class="card">accuracy<b id="accuracy">{metrics['accuracy']:.4f}</b></div>
<div class="card">macro F1<b>{metrics['macro_f1']:.4f}</b></div>
<div class="card">weighted F1<b>{metrics['weighted_f1']:.4f}</b></div>
<div class="card">images<b>{metrics['n_images']}</b></div>
{_trust_cards(metrics)}
</div>
<h2>Per class</h2>
<table id="per-class"><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr></thead>
<tbody>{rows}</tbody></table>
<h2>Most confused pairs</h2>
<table id="confused"><thead><tr><th>true</th><th>predicted as</th><th>images</th></tr></thead><tbody>{pair_rows}</tbody></table>
<div class="figs">{''.join(f'<h2>{e(t)}</h2><img src="{_png_data_uri(p)}" alt="{e(t)}">' for t, p in figures)}</div>
<h2>Most confidently wrong</h2>
<div class="gallery">{''.join(gallery) or '<p>No errors.</p>'}</div>
{f'<h2>Skipped files</h2><ul>{skipped}</ul>' if skipped else ''}
</body></html>
"""
    path = os.path.join(out, "report.html")
    write_text_atomic(path, page)
    return path
