"""What an evaluation says about the conformal guarantees (``models.conformal``): on the test photos, the
empirical coverage and mean set size at 0.80 / 0.90 / 0.95, the coverage per class (conditional coverage is not
promised: a class covered less than asked, beyond its binomial noise, is named), and for each error bound the
answered share and the error among answered photos; with the report's section in ``reports.html``'s style. A
multi-label model (``models.conformal_labels``): each label's coverage among the photos showing it (promised per
label, so an under-covered one is named as a failure of exchangeability or of too few held-out photos), the
labels without a guarantee at a level, and the error as "label set not exactly right"."""

from __future__ import annotations

import html

from transferkit.models.conformal import MAX_ERRORS, check_record, evaluate_sets
from transferkit.models.conformal_labels import check_labels_record, evaluate_label_sets
from transferkit.tasks import task_of


def conformal_metrics(predictor, labels, probs, max_error: float | None = None) -> dict:
    """{"conformal": ...} for a model with the calibration, else {} (a file made before it)."""
    stored = predictor.metadata.get("conformal")
    if not isinstance(stored, dict) or len(labels) == 0:
        return {}
    bounds = tuple(sorted(set(MAX_ERRORS) | ({max_error} if max_error is not None else set())))
    confidence = f"with probability >= {1 - stored['risk'].get('delta', 0.1):.0%} over the calibration photos"
    if task_of(predictor.metadata).multi_label:
        check_labels_record(stored, predictor.class_names, predictor.path or "model")
        decision = task_of(predictor.metadata).decision_thresholds(len(predictor.class_names))
        found = evaluate_label_sets(probs, labels, predictor.class_names, stored, decision, max_errors=bounds)
        found["guarantee"] = ("coverage: for each label, a photo that shows it has it in its set at least the asked "
                              "share of the time, over photos exchangeable with the calibration photos (per "
                              "label, among the photos showing it; not per photo; a set may hold extra labels); "
                              f"abstention: {confidence}, the share of answered photos whose label set is not "
                              "exactly right is at most the bound")
        return {"conformal": found}
    check_record(stored, predictor.path or "model")
    found = evaluate_sets(probs, labels, predictor.class_names, stored, max_errors=bounds)
    found["guarantee"] = ("coverage: a set holds the right label at least the asked share of the time, on average "
                          "over photos exchangeable with the calibration photos (not per class, not per photo); "
                          "class coverage: the same within every class; "
                          f"abstention: {confidence}, the error among answered photos is at most the bound")
    return {"conformal": found}


def conformal_section(metrics: dict) -> str:
    """The report's "Guarantees" section (empty without ``metrics["conformal"]``)."""
    found = metrics.get("conformal")
    if not found:
        return ""
    e = html.escape
    multi = "per_label_positives" in found  # the multi-label record: coverage per label, among its photos
    kind = "labels" if multi else "classes"
    rows = "".join(f"<tr><td>{c['asked']:.2f}</td><td>{_pct(c['empirical'])}</td><td>{c['mean_set_size']}</td>"
                   f"<td>{e(', '.join(c['under_covered'])) or '-'}</td>"
                   + (f"<td>{e(', '.join(c['no_guarantee'])) or '-'}</td><td>{e(_per_label(c))}</td>" if multi else "")
                   + "</tr>" for c in found["coverage"])
    answers = "".join(f"<tr><td>{s['max_error']:.2f}</td><td>{_pct(s['answered_share'])}</td>"
                      f"<td>{_pct(s['error_answered'])}</td></tr>" for s in found["selective"])
    under = [c for c in found["coverage"] if c["under_covered"]]
    levels = ", ".join(f"{c['asked']:.2f}" for c in under)
    promise = ("per-label sets promise coverage for each label, so an under-covered label is beyond its "
               "binomial noise on these photos: new photos differ from the calibration ones, or too few held-out "
               "photos showed it" if multi else
               "conformal sets promise coverage on average over photos, not per class; these classes get less")
    note = f"<p><b>Under-covered {kind}</b> (at {levels}): {promise}.</p>" if under else ""
    heads = "<th>under-covered labels</th><th>no guarantee</th><th>per label</th>" if multi else \
        "<th>under-covered classes</th>"
    empirical = "mean per-label coverage" if multi else "empirical"
    return f"""<h2>Guarantees (conformal, {found['calibration_photos']} calibration photos)</h2>
<p class="muted">{e(found['guarantee'])}</p>
<table id="conformal-coverage"><thead><tr><th>coverage asked</th><th>{empirical}</th><th>mean set size</th>
{heads}</tr></thead><tbody>{rows}</tbody></table>{note}
{_per_class_section(found)}
<table id="conformal-abstain"><thead><tr><th>max error</th><th>answered</th><th>error among answered</th></tr>
</thead><tbody>{answers}</tbody></table>"""


def _per_class_section(found: dict) -> str:
    """The per-class coverage and mean set size of the marginal sets (``--coverage``) beside the Mondrian ones
    (``--class-coverage``), at each level; empty for a file without per-class calibration."""
    if not found.get("class_coverage"):
        return ""
    e = html.escape
    tables = []
    for marginal, mondrian in zip(found["coverage"], found["class_coverage"]):
        rows = "".join(f"<tr><td>{e(name)}</td><td>{_pct(value)}</td><td>{marginal['per_class_size'][name]}</td>"
                       f"<td>{_pct(mondrian['per_class'].get(name))}</td>"
                       f"<td>{mondrian['per_class_size'].get(name, '-')}</td></tr>"
                       for name, value in marginal["per_class"].items())
        few = "; ".join(f"{e(n)} ({k} calibration photos, needs {_needed(mondrian['asked'])})"
                        for n, k in mondrian.get("too_few", {}).items())
        tables.append(f"""<table class="conformal-per-class" data-asked="{marginal['asked']:.2f}"><thead><tr>
<th>class, at {marginal['asked']:.2f}</th><th>coverage (--coverage)</th><th>mean set size</th>
<th>coverage (--class-coverage)</th><th>mean set size</th></tr></thead><tbody>{rows}</tbody></table>"""
                      + (f"<p>Too few calibration photos for {marginal['asked']:.2f} (in every set): {few}.</p>"
                         if few else ""))
    return ("<h3>Coverage per class: average (--coverage) and per-class (--class-coverage) sets</h3>"
            "<p class=\"muted\">--coverage promises the asked share on average over photos; --class-coverage "
            "promises it within every class (each class's own quantile), at the price of larger sets for the "
            "hard classes.</p>" + "".join(tables))


def _needed(level: float) -> int:
    from transferkit.models.conformal import class_needed

    return class_needed(level)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _per_label(coverage: dict) -> str:
    return ", ".join(f"{name} {100 * value:.0f} %" for name, value in coverage["per_class"].items())
