"""Drift (``transferkit monitor DB``): has what the served model sees moved away from its validation photos?

The window (the store's predictions, all or ``--last N`` or ``--since HOURS``) is compared with the model's own
reference (``metadata["reference"]``, written at training: quantiles of the validation answers' confidence and
novelty, their class mix and unknown rate; the server copies it into the store). Per figure: a two-sample
Kolmogorov-Smirnov statistic against the reference quantiles (its p-value with the reference's size), the
population stability index over the reference's deciles (0.1: a change, 0.25: a large one), a chi-square test of
the class mix and a one-sided binomial test of the unknown rate. "Moved" needs both a small p-value (< 0.01) and
an effect that matters (PSI >= 0.1, or an unknown rate at least twice the reference's and 5 points above it), so
a big window does not flag a trivial shift. On the held-out case (a class absent from training: 30 % of the
window) it said moved, on photos of the training classes it did not (tests/test_review.py).

A multi-label model gives each photo any number of labels, so its mix is not a top-1 class mix: each label's
answer rate in the window (the stored answers' labels; a row of the first schema: its scores over the
thresholds) is compared with the reference's ``label_rates`` by a two-sided binomial test (Bonferroni over the
labels) and its two-bin PSI; a label moved needs both, as above (tests/test_feedback_multilabel.py: a window
where one label is on every photo moved on that label alone; a window like validation did not move).
"""

from __future__ import annotations

import base64
import html
import io
import os
import time

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.files import write_json_atomic, write_text_atomic

ALPHA = 0.01
PSI_MOVED = 0.1
QUANTILES = np.linspace(0.0, 1.0, 101)


def ks_against_quantiles(sample: np.ndarray, quantiles: list[float], n_ref: int) -> tuple[float, float]:
    """(D, p) of the two-sample KS test of ``sample`` against a reference known by its 101 quantiles."""
    from scipy.stats import kstwobign

    q = np.asarray(quantiles, dtype=float)
    x = np.sort(np.asarray(sample, dtype=float))
    points = np.concatenate([x, q])
    f_win = np.searchsorted(x, points, side="right") / len(x)
    f_ref = _reference_cdf(q, points)
    d = float(np.max(np.abs(f_win - f_ref)))
    n_eff = n_ref * len(x) / (n_ref + len(x))
    return d, float(kstwobign.sf(np.sqrt(n_eff) * d))


def _reference_cdf(q: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The reference's right-continuous CDF at ``points`` (the highest quantile level at or below each)."""
    idx = np.searchsorted(q, points, side="right") - 1
    return np.where(idx < 0, 0.0, QUANTILES[np.clip(idx, 0, len(q) - 1)])


def psi(sample: np.ndarray, quantiles: list[float]) -> float:
    """Population stability index of ``sample`` over the reference's decile bins."""
    q = np.asarray(quantiles, dtype=float)
    edges = np.unique(q[10:100:10])
    expected = np.diff(np.concatenate([[0.0], _reference_cdf(q, edges), [1.0]]))
    actual = np.diff(np.concatenate([[0.0], np.searchsorted(np.sort(sample), edges, side="right") / len(sample),
                                     [1.0]]))
    return _psi(actual, expected)


def _psi(actual: np.ndarray, expected: np.ndarray, eps: float = 1e-4) -> float:
    a, e = np.maximum(actual, eps), np.maximum(expected, eps)
    return float(np.sum((a - e) * np.log(a / e)))


def compare(rows: list[dict], reference: dict, keep_known: float = 0.95, thresholds: dict | None = None) -> dict:
    """The figures and tests of the window ``rows`` (stored predictions) against ``reference``
    (``thresholds``: a multi-label model's, for rows stored without their whole answer)."""
    from scipy.stats import binomtest, chisquare

    confidence = np.array([r["top_k"][0]["probability"] for r in rows if r["top_k"]], dtype=float)
    found = {"window": len(rows), "reference": int(reference["n"]), "checks": {}}
    n_ref = int(reference["n"])
    d, p = ks_against_quantiles(confidence, reference["confidence"], n_ref)
    found["checks"]["confidence"] = {"ks": d, "p": p, "psi": psi(confidence, reference["confidence"]),
                                     "window_median": float(np.median(confidence)),
                                     "reference_median": reference["confidence"][50]}
    novelty = np.array([r["novelty"] for r in rows if r.get("novelty") is not None], dtype=float)
    if reference.get("novelty") and len(novelty):
        d, p = ks_against_quantiles(novelty, reference["novelty"], n_ref)
        found["checks"]["novelty"] = {"ks": d, "p": p, "psi": psi(novelty, reference["novelty"]),
                                      "window_median": float(np.median(novelty)),
                                      "reference_median": reference["novelty"][50]}
        unknown = int((novelty > 1.0).sum())
        expected = max(float(reference.get("unknown_rate", 0.0)), 1.0 - keep_known)
        found["checks"]["unknown_rate"] = {
            "window": unknown / len(novelty), "reference": expected,
            "p": float(binomtest(unknown, len(novelty), expected, alternative="greater").pvalue)}
    if reference.get("label_rates"):  # multi-label: per-label answer rates, not a top-1 mix
        found["checks"]["label_rates"] = _label_rates(rows, reference["label_rates"], thresholds or {})
    else:
        found["checks"]["class_mix"] = _class_mix(rows, reference["class_mix"], chisquare)
    found["moved"] = sorted(name for name, c in found["checks"].items() if _moved(name, c))
    return found


def _class_mix(rows: list[dict], mix: dict, chisquare) -> dict:
    names = list(mix)
    counts = np.array([sum(1 for r in rows if r["top_k"] and r["top_k"][0]["label"] == n) for n in names], float)
    expected = np.maximum(np.array([mix[n] for n in names], dtype=float), 1e-3)
    expected = expected / expected.sum()
    p = float(chisquare(counts, expected * counts.sum()).pvalue) if counts.sum() else 1.0
    return {"p": p, "psi": _psi(counts / max(counts.sum(), 1), expected),
            "window": dict(zip(names, (counts / max(counts.sum(), 1)).round(4).tolist())), "reference": mix}


def window_label_rates(rows: list[dict], names: list[str], thresholds: dict) -> dict[str, float]:
    """The share of ``rows`` (multi-label answers) each label of ``names`` was given to."""
    from transferkit.reports.review import answer_labels

    counts = dict.fromkeys(names, 0)
    for row in rows:
        for label in answer_labels(row, thresholds):
            if label in counts:
                counts[label] += 1
    return {name: c / max(len(rows), 1) for name, c in counts.items()}


def _label_rates(rows: list[dict], rates: dict, thresholds: dict) -> dict:
    """Each label's window answer rate against the reference's: a two-sided binomial test (its p x the number
    of labels: Bonferroni) and the PSI of (given, not given); ``labels_moved``: those with both."""
    from scipy.stats import binomtest

    window, n, per = window_label_rates(rows, list(rates), thresholds), len(rows), {}
    for name, ref in rates.items():
        expected = min(max(float(ref), 1e-3), 1 - 1e-3)
        k = int(round(window[name] * n))
        p = min(1.0, float(binomtest(k, n, expected).pvalue) * len(rates))
        per[name] = {"window": round(window[name], 4), "reference": ref, "p": p,
                     "psi": _psi(np.array([k / n, 1 - k / n]), np.array([expected, 1 - expected]))}
    moved = [name for name, c in per.items() if c["p"] < ALPHA and c["psi"] >= PSI_MOVED]
    return {"p": min(c["p"] for c in per.values()), "psi": max(c["psi"] for c in per.values()),
            "labels_moved": moved, "per_label": per, "window": {k: c["window"] for k, c in per.items()},
            "reference": rates}


def _moved(name: str, check: dict) -> bool:
    if name == "label_rates":
        return bool(check["labels_moved"])
    if check["p"] >= ALPHA:
        return False
    if name == "unknown_rate":
        return check["window"] >= 2 * check["reference"] and check["window"] >= check["reference"] + 0.05
    return check["psi"] >= PSI_MOVED


def verdict_line(found: dict) -> str:
    if not found["moved"]:
        return (f"inputs have not moved: {found['window']} predictions against the validation reference "
                f"({found['reference']} photos), no check below p {ALPHA}")
    parts = []
    for name in found["moved"]:
        c = found["checks"][name]
        if name == "label_rates":
            per = c["per_label"]
            parts.append("label_rates (" + ", ".join(f"{k} {per[k]['window']:.0%} vs {per[k]['reference']:.0%}, "
                                                     f"p {per[k]['p']:.1e}" for k in c["labels_moved"]) + ")")
            continue
        parts.append(f"{name} (window {c['window']:.1%} vs {c['reference']:.1%}, p {c['p']:.1e})"
                     if name == "unknown_rate" else f"{name} (PSI {c['psi']:.2f}, p {c['p']:.1e})")
    return f"inputs have moved: {', '.join(parts)} over {found['window']} predictions"


def _plot(rows: list[dict], reference: dict, checks: dict) -> str:
    """A PNG data URI: confidence and novelty CDFs (window vs reference), class mix bars (multi-label: each
    label's answer rate), the window's figures as ``compare``'s ``checks`` tested them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    series = [("confidence", [r["top_k"][0]["probability"] for r in rows if r["top_k"]]),
              ("novelty", [r["novelty"] for r in rows if r.get("novelty") is not None])]
    for ax, (name, values) in zip(axes, series):
        if reference.get(name) and values:
            ax.plot(reference[name], QUANTILES, label="validation reference")
            x = np.sort(values)
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label="window")
            ax.set_title(f"{name} (CDF)")
            ax.legend()
    check = checks["label_rates"] if reference.get("label_rates") else checks["class_mix"]
    mix, names = check["reference"], list(check["reference"])
    window = [check["window"][n] for n in names]
    pos = np.arange(len(names))
    axes[2].bar(pos - 0.2, [mix[n] for n in names], 0.4, label="reference")
    axes[2].bar(pos + 0.2, window, 0.4, label="window")
    axes[2].set_xticks(pos, names, rotation=30, ha="right")
    axes[2].set_title("share of photos given each label" if reference.get("label_rates") else
                      "class mix of the answers")
    axes[2].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def monitor(target: str, *, model: str | None = None, out: str = "monitor", last: int | None = None,
            since_hours: float | None = None, files: str | None = None) -> dict:
    """Compare the store's window with the model's reference; writes OUT/drift.html and OUT/drift.json."""
    from transferkit.data.collected import Store

    store = Store(target, files, create=False)
    try:
        rows, _ = store.read(since=time.time() - since_hours * 3600 if since_hours else None)
        infos = store.model_infos()
    finally:
        store.close()
    rows = rows[-last:] if last else rows
    if not rows:
        raise TransferkitError(f"{target}: no predictions in the window")
    reference, keep_known, thresholds = _reference(model, infos, rows[-1]["model"], target)
    found = compare(rows, reference, keep_known, thresholds)
    found["line"] = verdict_line(found)
    os.makedirs(out, exist_ok=True)
    found["json"] = os.path.join(out, "drift.json")
    found["html"] = os.path.join(out, "drift.html")
    write_json_atomic(found["json"], {k: v for k, v in found.items() if k not in ("json", "html")})
    write_text_atomic(found["html"], _page(found, _plot(rows, reference, found["checks"]), target))
    return found


def _reference(model: str | None, infos: dict, latest: str, target: str) -> tuple[dict, float, dict]:
    """(the reference, keep_known, a multi-label model's thresholds) of ``--model`` or of the serving model."""
    from transferkit.reports.review import model_thresholds

    if model:
        from transferkit.models.modelfile import read_metadata

        meta = read_metadata(model)
    else:
        meta = infos.get(latest) or {}
    reference = meta.get("reference")
    if not reference:
        where = model or f"{target} (model {latest})"
        raise TransferkitError(f"{where}: no validation reference (trained before transferkit stored one: "
                               f"retrain, or give --model a model file that has it)")
    return reference, float((meta.get("training") or {}).get("keep_known", 0.95)), model_thresholds(meta)


def _page(found: dict, plot: str, target: str) -> str:
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{c.get('ks', float('nan')):.3f}</td><td>{c['p']:.2e}</td>"
                   f"<td>{c.get('psi', float('nan')):.3f}</td><td>{'moved' if name in found['moved'] else ''}</td>"
                   f"</tr>" for name, c in found["checks"].items())
    per = (found["checks"].get("label_rates") or {}).get("per_label") or {}
    rows += "".join(f"<tr><td>&nbsp; {html.escape(k)}: {c['window']:.1%} of the window, {c['reference']:.1%} of "
                    f"validation</td><td></td><td>{c['p']:.2e}</td><td>{c['psi']:.3f}</td><td>"
                    f"{'moved' if k in found['checks']['label_rates']['labels_moved'] else ''}</td></tr>"
                    for k, c in per.items())
    return (f"<!doctype html><html lang=en><meta charset=utf-8><title>drift</title><style>body{{font-family:"
            f"system-ui,sans-serif;margin:2rem}}td,th{{padding:.2rem .8rem;text-align:left}}</style>"
            f"<h1>Drift of {html.escape(target)}</h1><p><b>{html.escape(found['line'])}</b></p>"
            f"<table><tr><th>check</th><th>KS D</th><th>p</th><th>PSI</th><th></th></tr>{rows}</table>"
            f"<img src=\"{plot}\" alt=\"confidence, novelty and class mix: window vs reference\"></html>")
