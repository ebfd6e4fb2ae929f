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
be empty: where the model is surer than the coverage asked needs. Mondrian sets (``--class-coverage``) use each
class's own quantile of its calibration photos' scores (``per_class``), so the coverage holds within every class.
The risk bound (Learn-then-Test, Angelopoulos, Bates, Candès, Jordan and Lei 2021): ``GRID`` confidence cut-offs
in fixed sequence from the most confident, each tested with an exact binomial tail at the full ``DELTA``, so
that with probability >= 1 - DELTA over the calibration photos the error among answered photos is <= the bound.
Chosen by ``benchmarks/guarantees.py`` (100 splits, 200 calibration photos, accuracy 0.852): it answers 36 % at
0.05 where the Bonferroni grid (each cut-off at DELTA / 20) answered 5 %, violating in 3 % of the splits (<= DELTA).
Conformal risk control (``expected_threshold``) bounds instead the expected share of photos answered wrongly.
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
RISK_METHOD = "ltt-fixed-sequence"
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
    per_class = conformal.get("per_class", []) if ok else None  # absent in files made before Mondrian sets
    ok = ok and isinstance(per_class, list) and all(
        isinstance(c, dict) and isinstance(c.get("n"), int) and numbers(c.get("scores")) and len(c["scores"]) <= c["n"]
        for c in per_class)
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


def class_needed(level: float) -> int:
    """The fewest calibration photos of a class for its own quantile at ``level``: the ceil((n + 1) level)-th
    smallest of n scores exists iff (n + 1) level <= n, i.e. n >= level / (1 - level)."""
    return math.ceil(level / (1 - level) - 1e-9)


def class_quantiles(conformal: dict, level: float) -> np.ndarray:
    """Each class's own conformal quantile at ``level`` (Mondrian: a set covers the true label with probability
    >= level within each class); inf (every label) for a class with under ``class_needed(level)`` photos."""
    return np.array([score_quantile(stored, level) for stored in conformal["per_class"]])


def class_sets(probs: np.ndarray, conformal: dict, level: float) -> list[np.ndarray]:
    """Mondrian sets: label j is in a photo's set where its score is within class j's own quantile, most probable
    first (the photo's class is unknown, so each candidate label is judged by its class's calibration)."""
    quantiles = class_quantiles(conformal, level)
    scores = all_scores(probs, conformal.get("penalty", 0.0), conformal.get("k_reg", 0))
    order = np.argsort(-np.asarray(probs, np.float64), axis=1, kind="stable")
    inside = np.take_along_axis(scores <= quantiles + 10.0 ** -DIGITS, order, axis=1)
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


def _cuts(confidence: np.ndarray) -> list[int]:
    """The ``GRID`` cut-offs as indices into ``confidence`` (sorted, highest first): answer photos 0..i, the
    1/20, 2/20 ... of them, a cut-off answering every tie of its photo."""
    n, found = len(confidence), []
    for step in range(1, GRID + 1):
        i = math.ceil(n * step / GRID) - 1
        while i + 1 < n and confidence[i + 1] == confidence[i]:
            i += 1
        if i >= 0 and (not found or i > found[-1]):
            found.append(i)
    return found


def least_tested(max_error: float, delta: float = DELTA) -> int:
    """The fewest photos an exact binomial test can certify ``max_error`` on (all of them right):
    (1 - max_error)^m <= delta."""
    return math.ceil(math.log(delta) / math.log1p(-max_error) - 1e-9)


def smallest_certifiable(n: int, delta: float = DELTA) -> float:
    """The smallest error bound ``n`` calibration photos can certify: every one right, the loosest cut-off tests
    the n - 1 photos above its own, 1 - delta^(1 / (n - 1)); 1.0 under two photos."""
    return 1.0 if n < 2 else 1.0 - delta ** (1.0 / (n - 1))


def answer_threshold(risk: dict, max_error: float) -> float:
    """The lowest confidence cut-off (answer where the top probability is >= it) certified to keep the error
    among answered photos <= ``max_error`` with probability >= 1 - delta: Learn-then-Test fixed-sequence testing
    of the 20 cut-offs answering 1/20, 2/20 ... of the calibration photos, from the most confident downward, each
    with an exact binomial tail at the full delta on the photos ranked above the cut-off's own, stopping at the
    first that fails; the cut-offs answering too few photos for any test to pass (``least_tested``: a count
    fixed by n, the bound and delta) are not tested. inf where none passes (answer nothing)."""
    confidence = np.asarray(risk["confidence"], np.float64)  # sorted, highest first
    wrong = np.concatenate([[0], np.cumsum(1 - np.asarray(risk["correct"], np.int64))])  # wrong[i]: among the top i
    delta = float(risk.get("delta", DELTA))
    least, best = least_tested(max_error, delta), math.inf
    for i in _cuts(confidence):
        if i < least:
            continue
        if binomial_cdf(int(wrong[i]), i, max_error) > delta:
            break
        best = float(confidence[i])
    return best


def expected_threshold(risk: dict, expected_error: float) -> float:
    """Conformal risk control (Angelopoulos, Bates, Fisch, Lei and Schuster, 2022) of the loss "answered and
    wrong": the lowest cut-off whose (errors among the answered calibration photos + 1) / (n + 1) is <= the bound,
    so that a new photo is answered wrongly with probability <= it (in expectation over the calibration photos, not
    with probability 1 - delta). inf where even answering nothing is not enough (n + 1 < 1 / bound)."""
    confidence = np.asarray(risk["confidence"], np.float64)
    wrong = np.cumsum(1 - np.asarray(risk["correct"], np.int64))
    n, best = len(confidence), math.inf
    if (n + 1) * expected_error < 1:
        return best
    for i in range(n):
        if i + 1 < n and confidence[i + 1] == confidence[i]:
            continue  # a cut-off answers every tie of its photo
        if (wrong[i] + 1) / (n + 1) > expected_error:
            break
        best = float(confidence[i])
    return best


def uncertified_note(risk: dict, max_error: float) -> str:
    """The one line said where no cut-off is certified for ``max_error``: the smallest bound these calibration
    photos could certify."""
    n, delta = len(risk["confidence"]), float(risk.get("delta", DELTA))
    return (f"max error {max_error:g}: no cut-off certified with {n} calibration photos, so every photo abstains; "
            f"the smallest error {n} photos can certify (all right, {1 - delta:.0%} confidence) is "
            f"{smallest_certifiable(n, delta):.4f}")


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
    risk = {"method": RISK_METHOD, "delta": DELTA,
            "confidence": [round(float(c), DIGITS) for c in confidence[order]],
            "correct": [int(c) for c in correct[order]]}
    true_scores = label_scores(probs, labels, penalty, k_reg) if len(labels) else np.zeros(0)
    per_class = [dict(zip(("scores", "n"), _bounded(true_scores[labels == c])))
                 for c in range(np.asarray(probs).shape[1])]
    return {"task": "single_label", "method": "raps" if penalty else METHOD, "randomised": False,
            "penalty": penalty, "k_reg": k_reg, "n": n, "scores": scores, "risk": risk, "per_class": per_class,
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
    """metrics["conformal"]: at each coverage, for the marginal sets (``coverage``) and, where the file stores the
    per-class scores, the Mondrian ones (``class_coverage``): the empirical coverage, the mean set size, each
    class's coverage and mean set size (the classes under the asked coverage by more than their binomial noise
    named); at each error bound the answered share and the error among answered photos."""
    labels = np.asarray(labels, np.int64)
    out = {"method": conformal.get("method"), "calibration_photos": conformal.get("n"), "coverage": [],
           "selective": []}
    for asked in coverages:
        out["coverage"].append(_set_figures(prediction_sets(probs, conformal, asked), labels, class_names, asked))
    if len(conformal.get("per_class", [])) == len(class_names):
        out["class_coverage"] = []
        for asked in coverages:
            found = _set_figures(class_sets(probs, conformal, asked), labels, class_names, asked)
            found["too_few"] = {class_names[c]: s["n"] for c, s in enumerate(conformal["per_class"])
                                if s["n"] < class_needed(asked)}
            out["class_coverage"].append(found)
    confidence = np.asarray(probs, np.float64).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == labels
    out["selective"] = selective_report(conformal["risk"], confidence, correct, max_errors)
    return out


def _set_figures(sets: list, labels: np.ndarray, class_names: list, asked: float) -> dict:
    hit = np.array([y in s for y, s in zip(labels, sets)], bool)
    size = np.array([len(s) for s in sets], float)
    present = [(c, name) for c, name in enumerate(class_names) if (labels == c).any()]
    per_class = {name: round(float(hit[labels == c].mean()), 4) for c, name in present}
    per_class_size = {name: round(float(size[labels == c].mean()), 3) for c, name in present}
    counts = {name: int((labels == c).sum()) for c, name in present}
    under = [name for name, value in per_class.items()  # 2 standard errors under the asked coverage
             if value < asked - 2 * math.sqrt(asked * (1 - asked) / counts[name])]
    return {"asked": asked, "empirical": round(float(hit.mean()), 4) if len(hit) else None,
            "mean_set_size": round(float(size.mean()), 3) if len(size) else None,
            "per_class": per_class, "per_class_size": per_class_size, "under_covered": under}


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
