"""Answers with a guarantee: prediction sets at a chosen coverage (split conformal prediction, adaptive prediction
sets) and abstention at a chosen error (selective classification with a finite-sample risk bound).

Both are fitted once, at training, on held-out photos' *calibrated* probabilities (the trusted head's, after the
temperature): the validation split. Out-of-fold training photos (a logistic head per fold on the cached features,
as the label audit fits them, through a temperature fitted on their own out-of-fold logits) join only where fewer
than ``SMALL_VALIDATION`` validation photos are held out (or none, after a refit): measured in
``benchmarks/conformal.py`` (digits, 120 validation + 480 out-of-fold photos), those heads' scores are not
exchangeable with the model's, and coverage on 1,149 test photos fell to 0.786 / 0.888 at 0.90 / 0.95 (0.904 /
0.956 calibrating on the model's own held-out scores). What is stored (``ModelRecord.conformal``,
carried by every export's metadata) lets any coverage or error bound be asked at predict time: the sorted held-out
scores (at most ``MAX_SCORES``, rounded up) and the (confidence, correct) pairs. Every predictor's rows go through
``SingleLabel.decide``, which calls :func:`prediction_sets` and :func:`answer_threshold` here, so Keras, ONNX, the
cached engine and the server give the same sets. Measured in ``benchmarks/conformal.py`` (20 random calibration /
test splits of real photos): see its docstring.

Scores (APS, Romano et al. 2020): the probability mass of the classes ranked at or above the label; RAPS
(Angelopoulos et al. 2021, the default) adds ``penalty`` per rank beyond ``k_reg``. Not randomised (a
set is a function of the photo alone; randomised APS only matters for the upper side of the coverage). A set may
be empty: where the model is surer than the coverage asked needs. The risk bound (in the manner of Geifman &
El-Yaniv's SGR, 2017, and Learn-then-Test): ``GRID`` confidence cut-offs, each tested with an exact binomial tail
at ``DELTA / GRID``, so that with probability >= 1 - DELTA over the calibration photos the error rate among
answered photos is <= the bound.
Both assume the new photos are exchangeable with the calibration photos (same source, same class mix). This module
imports NumPy only: it runs on the cached predict path, which imports neither TensorFlow nor SciPy.
"""

from __future__ import annotations

import math

import numpy as np

METHOD = "aps"
MAX_SCORES = 2000  # stored scores / pairs at most (an evenly spaced subset of order statistics above it)
DIGITS = 6  # scores rounded up to 1e-6: smaller than the float32 gaps between engines' probabilities
DELTA = 0.1  # the risk bound holds with probability >= 1 - DELTA over the calibration photos
COVERAGES = (0.8, 0.9, 0.95)  # what evaluate reports
MAX_ERRORS = (0.02, 0.05, 0.1)
GRID = 20  # the abstention cut-offs tested: answer 5 %, 10 %, ... 100 % of the calibration photos
PENALTY, K_REG = 0.01, 1  # RAPS: + 0.01 per rank after the first (plain APS puts every near-zero label in a set
# once the top probability saturates at 1.0: their cumulative mass no longer grows)
SMALL_VALIDATION = 40  # below this many validation photos, out-of-fold training photos join the calibration


def check_record(conformal, path: str) -> dict:
    """``conformal`` (a file's metadata["conformal"]) if it is usable, else one line saying what is wrong (a file
    from elsewhere may carry anything)."""
    from transferkit.errors import TransferkitError

    def numbers(values) -> bool:
        return isinstance(values, list) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)

    risk = conformal.get("risk") if isinstance(conformal, dict) else None
    ok = (isinstance(risk, dict) and isinstance(conformal.get("n"), int) and numbers(conformal.get("scores"))
          and len(conformal["scores"]) <= conformal["n"] and numbers(risk.get("confidence"))
          and numbers(risk.get("correct")) and len(risk["confidence"]) == len(risk["correct"])
          and numbers([conformal.get("penalty", 0.0), conformal.get("k_reg", 0), risk.get("delta", DELTA)]))
    if not ok:
        raise TransferkitError(f"{path}: damaged transferkit metadata (conformal calibration)")
    return conformal


# ----- scores and sets -----
def all_scores(probs: np.ndarray, penalty: float = 0.0, k_reg: int = 0) -> np.ndarray:
    """(n, classes): the score each label would have (the mass of the labels ranked at or above it, ties in
    index order, + RAPS's penalty per rank beyond ``k_reg``)."""
    probs = np.asarray(probs, np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    cumulative = np.cumsum(ranked, axis=1)
    if penalty:
        cumulative = cumulative + penalty * np.maximum(0, np.arange(1, probs.shape[1] + 1) - k_reg)
    scores = np.empty_like(cumulative)
    np.put_along_axis(scores, order, cumulative, axis=1)
    return scores


def label_scores(probs: np.ndarray, labels: np.ndarray, penalty: float = 0.0, k_reg: int = 0) -> np.ndarray:
    """The score of each photo's true label (the calibration scores)."""
    return all_scores(probs, penalty, k_reg)[np.arange(len(labels)), np.asarray(labels)]


def _ranks(n: int, m: int) -> np.ndarray:
    """The (1-based) order statistics kept when ``m`` of ``n`` scores are stored."""
    return np.arange(1, n + 1) if m >= n else np.round(np.linspace(1, n, m)).astype(np.int64)


def score_quantile(conformal: dict, coverage: float) -> float:
    """The conformal quantile: the ceil((n + 1) coverage)-th smallest held-out score (the next stored one above
    it where only some are stored); inf (every label) where n is too small for the coverage."""
    n, scores = int(conformal["n"]), conformal["scores"]
    rank = math.ceil((n + 1) * coverage - 1e-9)
    if rank > n or not scores:
        return math.inf
    return float(scores[int(np.searchsorted(_ranks(n, len(scores)), rank))])


def prediction_sets(probs: np.ndarray, conformal: dict, coverage: float) -> list[np.ndarray]:
    """Each photo's set: the labels whose score is within the quantile, most probable first."""
    quantile = score_quantile(conformal, coverage)
    scores = all_scores(probs, conformal.get("penalty", 0.0), conformal.get("k_reg", 0))
    order = np.argsort(-np.asarray(probs, np.float64), axis=1, kind="stable")
    inside = np.take_along_axis(scores, order, axis=1) <= quantile + 10.0 ** -DIGITS
    return [row[keep] for row, keep in zip(order, inside)]


# ----- the risk bound -----
def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k), X ~ Binomial(n, p), exactly (log-gamma terms; no SciPy)."""
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1)
    logs = (math.lgamma(n + 1) - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])
            + i * math.log(p) + (n - i) * math.log1p(-p))
    return float(min(1.0, np.exp(logs).sum()))


def answer_threshold(risk: dict, max_error: float) -> float:
    """The lowest confidence cut-off (answer where the top probability is >= it) whose error rate among answered
    calibration photos is certified <= ``max_error``: the cut-offs that answer 1/20, 2/20 ... all of the
    calibration photos, each tested with an exact binomial tail at level delta / 20 (Bonferroni), the loosest
    that passes kept. inf where none passes (answer nothing: too few calibration photos for the bound)."""
    confidence = np.asarray(risk["confidence"], np.float64)  # sorted, highest first
    wrong = np.cumsum(1 - np.asarray(risk["correct"], np.int64))
    n = len(confidence)
    level = float(risk.get("delta", DELTA)) / GRID
    best = math.inf
    for step in range(1, GRID + 1):
        i = math.ceil(n * step / GRID) - 1  # answer the i + 1 most confident photos
        if i < 0:
            continue
        while i + 1 < n and confidence[i + 1] == confidence[i]:  # a cut-off answers every tie
            i += 1
        if binomial_cdf(int(wrong[i]), i + 1, max_error) <= level:
            best = min(best, float(confidence[i]))
    return best


# ----- fitting -----
def _bounded(values: np.ndarray) -> tuple[list, int]:
    values = np.sort(np.asarray(values, np.float64))
    kept = values[_ranks(len(values), MAX_SCORES) - 1] if len(values) else values
    return [math.ceil(v * 10 ** DIGITS) / 10 ** DIGITS for v in kept.tolist()], len(values)


def fit_conformal(probs: np.ndarray, labels: np.ndarray, fitted_on: dict, penalty: float = PENALTY,
                  k_reg: int = K_REG) -> dict:
    """metadata["conformal"] from held-out calibrated ``probs`` (n, classes) and their true labels. ``task``
    names the record's kind: a per-label variant (multi-label) would store one such record per label."""
    labels = np.asarray(labels, np.int64)
    scores, n = _bounded(label_scores(probs, labels, penalty, k_reg))
    confidence = np.asarray(probs, np.float64).max(axis=1)
    correct = (np.asarray(probs).argmax(axis=1) == labels).astype(np.int64)
    if len(labels) > MAX_SCORES:  # a seeded subset keeps the pairs exchangeable with new photos
        pick = np.random.default_rng(0).choice(len(labels), MAX_SCORES, replace=False)
        confidence, correct = confidence[pick], correct[pick]
    order = np.argsort(-confidence, kind="stable")
    risk = {"method": "sgr-binomial", "delta": DELTA,
            "confidence": [round(float(c), DIGITS) for c in confidence[order]],
            "correct": [int(c) for c in correct[order]]}
    return {"task": "single_label", "method": "raps" if penalty else METHOD, "randomised": False,
            "penalty": penalty, "k_reg": k_reg, "n": n, "scores": scores, "risk": risk,
            "assumption": "exchangeable", "fitted_on": fitted_on}


def out_of_fold(features: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray | None:
    """Calibrated out-of-fold probabilities of training photos: the label audit's heads (logistic regression
    per fold on the cached features, pooled where they are maps), put through a temperature fitted on their own
    out-of-fold logits; None where a class has under 2 photos."""
    from transferkit.errors import TransferkitError
    from transferkit.models.novelty import fit_temperature, logits_of
    from transferkit.training.audit import out_of_fold_probabilities

    x = features if features.ndim == 2 else features.mean(axis=(1, 2))
    try:
        probs, _ = out_of_fold_probabilities(x, labels, n_classes)
    except TransferkitError:
        return None
    logits = logits_of(probs)
    z = logits / fit_temperature(logits, labels)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def fit_held_out(val: tuple | None, train: tuple, n_classes: int) -> dict:
    """metadata["conformal"] from (validation probs, labels) of the model itself (None: after a refit, when the
    validation photos trained the head) and (training features, labels), whose out-of-fold probabilities join
    where fewer than ``SMALL_VALIDATION`` validation photos are held out."""
    parts, fitted_on = [], {"validation": 0, "out_of_fold": 0}
    if val is not None:
        parts.append(val)
        fitted_on["validation"] = int(len(val[1]))
    if fitted_on["validation"] < SMALL_VALIDATION:
        probs = out_of_fold(*train, n_classes)
        if probs is not None:
            parts.append((probs, train[1]))
            fitted_on["out_of_fold"] = int(len(train[1]))
    if fitted_on["out_of_fold"]:
        from transferkit.log import logger

        logger.warning(f"conformal calibration: only {fitted_on['validation']} validation photos, so "
                       f"{fitted_on['out_of_fold']} out-of-fold training photos join; their heads are not the model's, "
                       f"so the coverage asked is approximate (see models.conformal)")
    probs = np.concatenate([p for p, _ in parts]) if parts else np.zeros((0, n_classes))
    labels = np.concatenate([y for _, y in parts]) if parts else np.zeros(0, np.int64)
    return fit_conformal(probs, labels, fitted_on)


# ----- evaluation -----
def evaluate_sets(probs: np.ndarray, labels: np.ndarray, class_names: list, conformal: dict,
                  coverages=COVERAGES, max_errors=MAX_ERRORS) -> dict:
    """metrics["conformal"]: empirical coverage and mean set size at each coverage, the coverage per class (the
    classes under the asked coverage by more than their binomial noise named), and at each error bound the
    answered share and the error among answered photos."""
    labels = np.asarray(labels, np.int64)
    out = {"method": conformal.get("method"), "calibration_photos": conformal.get("n"), "coverage": [],
           "selective": []}
    for asked in coverages:
        sets = prediction_sets(probs, conformal, asked)
        hit = np.array([y in s for y, s in zip(labels, sets)], bool)
        per_class = {name: round(float(hit[labels == c].mean()), 4)
                     for c, name in enumerate(class_names) if (labels == c).any()}
        counts = {name: int((labels == c).sum()) for c, name in enumerate(class_names)}
        under = [name for name, value in per_class.items()  # 2 standard errors under the asked coverage
                 if value < asked - 2 * math.sqrt(asked * (1 - asked) / counts[name])]
        out["coverage"].append({"asked": asked, "empirical": round(float(hit.mean()), 4) if len(hit) else None,
                                "mean_set_size": round(float(np.mean([len(s) for s in sets])), 3) if sets else None,
                                "per_class": per_class, "under_covered": under})
    confidence = np.asarray(probs, np.float64).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == labels
    out["selective"] = selective_report(conformal["risk"], confidence, correct, max_errors)
    return out


def selective_report(risk: dict, confidence: np.ndarray, correct: np.ndarray, max_errors=MAX_ERRORS) -> list:
    """At each error bound: the certified cut-off, the share of photos whose ``confidence`` reaches it, and the
    error among those (``correct``: each photo's answer right); both tasks' evaluations."""
    found = []
    for bound in max_errors:
        cut = answer_threshold(risk, bound)
        answered = confidence >= cut
        found.append({"max_error": bound, "threshold": None if math.isinf(cut) else round(cut, 6),
                      "answered_share": round(float(answered.mean()), 4) if len(answered) else None,
                      "error_answered": round(float(1 - correct[answered].mean()), 4) if answered.any() else None})
    return found
