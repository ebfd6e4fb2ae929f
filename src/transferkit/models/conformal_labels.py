"""Guarantees for the multi-label task: per-label conformal thresholds (a set of labels at a chosen coverage) and
abstention at a chosen error, the multi-label counterpart of ``models.conformal``.

Sets (split conformal, Mondrian by label, on each label's positives): for label j, the n_j held-out photos that
show it give the calibrated sigmoid scores s_(1) <= ... <= s_(n_j); with k = ceil((n_j + 1) * coverage), the
threshold is s_(n_j + 1 - k), so that a new photo showing label j scores at or above it with probability
>= coverage (over the calibration and the photo; exchangeable photos). The promise is per label and
conditional on the label being there: "a label the photo shows is in its set at least the asked share of the
time". It says nothing of labels the photo does not show (a set may hold extras: the mean set size says how many).
Where n_j is under 1 / (1 - coverage) - 1 (19 positives for 0.95, 9 for 0.90) no order statistic is high
enough: that label gets no guarantee at that level, is always in the set (conservative), and a one-line warning
says so. The stored record holds every label's sorted positive scores (at most ``conformal.MAX_SCORES``, rounded
*down* to 1e-6, so a rounded threshold never drops a photo the exact one keeps), so any coverage is answered at
predict time.

Abstention: the error of an answer is "its label set (each label over its F1 threshold) is not exactly the true
set" (subset error: what "the answer was wrong" means to someone who reads the labels). An answer's confidence
is the product over labels of the probability of the side it took, p_j over the threshold, else 1 - p_j (the
chance the whole set is right if the calibrated labels were independent); the cut-off is chosen by
``conformal.answer_threshold``, the single-label code's fixed-sequence binomial tests over 20 cut-offs.
Held-out photos (``training.trainer``): the validation photos as the model answers them, and every training
photo out of fold (the chosen head fitted again on the other folds, ``select.held_out_logits``, through the
model's per-label temperatures). Unlike the single-label case (``models.conformal``: the label audit's heads,
not exchangeable) these join always; measured in ``benchmarks/conformal.py`` (300 training mosaics of real
photos, 60 validation, 800 test): validation alone (20-23 positives per label) gave mean per-label coverage
0.827 / 0.918 / 0.951 at 0.80 / 0.90 / 0.95, labels from 0.74 to 0.97 at 0.80, and certified no error bound;
with the 240 out-of-fold photos (100-117 positives) 0.820 / 0.902 / 0.954, labels 0.78-0.86 at 0.80, and at
max error 0.05 it answers 77 % of the test mosaics with 1.3 % wrong sets (0.10: 90 %, 4.0 %). They also were not
used to fit the F1 thresholds, which the validation photos were (their errors are slightly optimistic). Both
guarantees assume new photos are exchangeable with the calibration photos. NumPy only (the cached predict
path)."""

from __future__ import annotations

import math

import numpy as np

from transferkit.log import logger
from transferkit.models.conformal import (COVERAGES, DELTA, DIGITS, MAX_ERRORS, MAX_SCORES, RISK_METHOD, _ranks,
                                          selective_report)

TOLERANCE = 10.0 ** -DIGITS  # a score this far under its (rounded-down) threshold is still inside
_warned: set = set()


def check_labels_record(conformal, class_names: list, path: str) -> dict:
    """A multi-label ``conformal`` record if usable (a score list per label, the risk pairs), else one line."""
    from transferkit.errors import TransferkitError

    def numbers(values) -> bool:
        return isinstance(values, list) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)

    labels, risk = conformal.get("labels"), conformal.get("risk")
    ok = isinstance(labels, dict) and isinstance(risk, dict) and all(
        isinstance(labels.get(n), dict) and isinstance(labels[n].get("n"), int) and numbers(labels[n].get("scores"))
        and len(labels[n]["scores"]) <= labels[n]["n"] for n in class_names)
    ok = ok and numbers(risk.get("confidence")) and numbers(risk.get("correct")) and \
        len(risk["confidence"]) == len(risk["correct"])
    if not ok:
        raise TransferkitError(f"{path}: damaged transferkit metadata (multi-label conformal calibration)")
    return conformal


# ----- thresholds and sets -----
def label_threshold(stored: dict, coverage: float) -> float | None:
    """The conformal threshold of one label's record ``{"n", "scores"}`` (sorted ascending): the
    (n + 1 - ceil((n + 1) coverage))-th smallest positive score (the next stored one below it where only some are
    stored); None where n is too small for the coverage."""
    n, scores = int(stored["n"]), stored["scores"]
    rank = n + 1 - math.ceil((n + 1) * coverage - 1e-9)  # 1-based, ascending
    if rank < 1 or not scores:
        return None
    return float(scores[int(np.searchsorted(_ranks(n, len(scores)), rank, side="right")) - 1])


def label_thresholds(conformal: dict, class_names: list, coverage: float, warn: bool = True) -> tuple:
    """(each label's threshold at ``coverage``, 0 where it has too few positives; the names of those labels),
    with a one-line warning (once per label and level) naming them."""
    found = [label_threshold(conformal["labels"][n], coverage) for n in class_names]
    short = [n for n, t in zip(class_names, found) if t is None]
    key = (tuple(short), round(coverage, 6))
    if short and warn and key not in _warned:
        _warned.add(key)
        needed = math.ceil(coverage / (1 - coverage) - 1e-9)
        logger.warning(f"coverage {coverage:g}: no set guarantee for {', '.join(short)} (under {needed} held-out "
                       f"photos show it); the set always includes it")
    return np.array([0.0 if t is None else t for t in found]), short


def label_sets(probs: np.ndarray, thresholds: np.ndarray) -> list[np.ndarray]:
    """Each photo's set: the labels whose score is at or over their conformal threshold, most probable first."""
    probs = np.asarray(probs, np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    inside = np.take_along_axis(probs >= thresholds - TOLERANCE, order, axis=1)
    return [row[keep] for row, keep in zip(order, inside)]


def set_confidence(probs: np.ndarray, decision: np.ndarray) -> np.ndarray:
    """An answer's confidence: the product over labels of the probability of the side it took (``decision``:
    each label's F1 threshold)."""
    probs = np.asarray(probs, np.float64)
    return np.where(probs >= decision, probs, 1.0 - probs).prod(axis=1)


# ----- fitting -----
def _floor_bounded(values: np.ndarray) -> tuple[list, int]:
    values = np.sort(np.asarray(values, np.float64))
    kept = values[_ranks(len(values), MAX_SCORES) - 1] if len(values) else values
    return [math.floor(v * 10 ** DIGITS) / 10 ** DIGITS for v in kept.tolist()], len(values)


def risk_pairs(probs: np.ndarray, y: np.ndarray, decision: np.ndarray) -> dict:
    """The (confidence, correct) pairs of the answers on held-out photos, most confident first (a seeded subset
    of ``MAX_SCORES`` above it)."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y) > 0
    confidence = set_confidence(probs, decision)
    correct = ((probs >= decision) == y).all(axis=1).astype(np.int64)
    if len(y) > MAX_SCORES:
        pick = np.random.default_rng(0).choice(len(y), MAX_SCORES, replace=False)
        confidence, correct = confidence[pick], correct[pick]
    order = np.argsort(-confidence, kind="stable")
    return {"method": RISK_METHOD, "delta": DELTA, "error": "label set not exactly the true set",
            "confidence": [round(float(c), DIGITS) for c in confidence[order]],
            "correct": [int(c) for c in correct[order]]}


def fit_label_conformal(probs: np.ndarray, y: np.ndarray, class_names: list, decision: np.ndarray,
                        fitted_on: dict) -> dict:
    """metadata["conformal"] of a multi-label model from held-out calibrated ``probs`` (photos x labels), their
    indicator labels ``y`` and the labels' F1 thresholds ``decision``; warns of the labels too rare for a level."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y) > 0
    labels = {}
    for j, name in enumerate(class_names):
        scores, n = _floor_bounded(probs[y[:, j], j])
        labels[name] = {"n": n, "scores": scores}
    record = {"task": "multi_label", "method": "mondrian-per-label", "randomised": False, "n": int(len(y)),
              "labels": labels, "risk": risk_pairs(probs, y, np.asarray(decision, np.float64)),
              "assumption": "exchangeable", "fitted_on": fitted_on}
    for coverage in COVERAGES:
        label_thresholds(record, class_names, coverage)  # the warnings, at training
    return record


# ----- evaluation -----
def evaluate_label_sets(probs: np.ndarray, y: np.ndarray, class_names: list, conformal: dict, decision: np.ndarray,
                        coverages=COVERAGES, max_errors=MAX_ERRORS) -> dict:
    """metrics["conformal"] of a multi-label model: at each coverage, each label's empirical coverage (the share
    of photos showing it whose set holds it), their mean, the mean set size, the labels covered less than asked
    beyond their binomial noise and those without a guarantee; at each error bound, the answered share and the
    error (label set not exactly right) among answered photos."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y) > 0
    out = {"method": conformal.get("method"), "calibration_photos": conformal.get("n"), "per_label_positives":
           {n: conformal["labels"][n]["n"] for n in class_names}, "coverage": [], "selective": []}
    for asked in coverages:
        thresholds, short = label_thresholds(conformal, class_names, asked, warn=False)
        inside = probs >= thresholds - TOLERANCE
        per_label = {n: round(float(inside[y[:, j], j].mean()), 4) for j, n in enumerate(class_names) if y[:, j].any()}
        under = [n for j, n in enumerate(class_names) if n in per_label and
                 per_label[n] < asked - 2 * math.sqrt(asked * (1 - asked) / y[:, j].sum())]
        out["coverage"].append({"asked": asked, "empirical": round(float(np.mean(list(per_label.values()))), 4)
                                if per_label else None,
                                "mean_set_size": round(float(inside.sum(axis=1).mean()), 3) if len(y) else None,
                                "per_class": per_label, "under_covered": under, "no_guarantee": short})
    confidence = set_confidence(probs, decision)
    correct = ((probs >= decision) == y).all(axis=1)
    out["selective"] = selective_report(conformal["risk"], confidence, correct, max_errors)
    return out
