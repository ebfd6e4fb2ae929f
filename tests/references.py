"""Independent references for the statistics transferkit computes itself, written from their textbook definitions
(a few lines each, loops where that is clearer), never by calling the product: what tests/test_statistics.py and
the tests that check a command's figures compare the product's numbers with."""

import math

import numpy as np


def ece(probs, labels, bins: int = 15) -> float:
    """Expected calibration error: equal-width confidence bins [0, 1/15), ..., [14/15, 1]; per bin
    |accuracy - mean confidence|, weighted by the bin's share of the rows."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    total, n = 0.0, len(labels)
    for b in range(bins):
        rows = [i for i in range(n) if min(int(probs[i].max() * bins), bins - 1) == b]
        if rows:
            accuracy = np.mean([probs[i].argmax() == labels[i] for i in rows])
            confidence = np.mean([probs[i].max() for i in rows])
            total += abs(accuracy - confidence) * len(rows)
    return total / n


def kolmogorov_sf(lam: float, terms: int = 100) -> float:
    """P(K > lam) of the Kolmogorov distribution: 2 sum_k (-1)^(k-1) exp(-2 k^2 lam^2)."""
    if lam < 0.2:  # the series converges slowly there; the value is 1 to 1e-10
        return 1.0
    return 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, terms + 1))


def psi(actual, expected, eps: float = 1e-4) -> float:
    """Population stability index of two share vectors: sum (a - e) ln(a / e), shares floored at ``eps``."""
    return sum((max(a, eps) - max(e, eps)) * math.log(max(a, eps) / max(e, eps)) for a, e in zip(actual, expected))


def bin_shares(values, edges) -> list[float]:
    """The share of ``values`` in (-inf, e1], (e1, e2], ..., (e_last, inf)."""
    values = list(values)
    bounds = [-math.inf, *edges, math.inf]
    return [sum(lo < v <= hi for v in values) / len(values) for lo, hi in zip(bounds[:-1], bounds[1:])]


def auroc(negatives, positives) -> float:
    """The chance a positive scores above a negative (ties count a half): the Mann-Whitney form of the AUROC."""
    neg, pos = np.asarray(negatives, np.float64), np.asarray(positives, np.float64)
    return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))


def average_precision(y, scores) -> float:
    """Sum over the distinct score thresholds (highest first) of (recall gained) x (precision at the threshold)."""
    y, scores = np.asarray(y, bool), np.asarray(scores, np.float64)
    found, recall_before = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        answered = scores >= t
        recall = (answered & y).sum() / y.sum()
        found += (recall - recall_before) * (answered & y).sum() / answered.sum()
        recall_before = recall
    return float(found)


def aps_score(p, label: int, penalty: float, k_reg: int) -> float:
    """The (R)APS score of ``label`` for the probabilities ``p``: the mass of the classes ranked at or above it
    (ties in index order) + ``penalty`` per rank beyond ``k_reg``."""
    order = sorted(range(len(p)), key=lambda j: (-p[j], j))
    rank = order.index(label) + 1
    return float(sum(p[j] for j in order[:rank]) + penalty * max(0, rank - k_reg))


def conformal_sets(cal_probs, cal_labels, test_probs, coverage: float, penalty: float, k_reg: int) -> list[set]:
    """Split conformal sets: the ceil((n + 1) coverage)-th smallest calibration score is the quantile; a test
    photo's set holds each label whose score is at or under it (every label where that rank is over n)."""
    cal = sorted(aps_score(p, y, penalty, k_reg) for p, y in zip(cal_probs, cal_labels))
    rank = math.ceil((len(cal) + 1) * coverage)
    q = cal[rank - 1] if rank <= len(cal) else math.inf
    return [{j for j in range(len(p)) if aps_score(p, j, penalty, k_reg) <= q + 1e-6} for p in test_probs]


def label_threshold(positive_scores, coverage: float) -> float:
    """One label's conformal threshold: s_(n + 1 - ceil((n + 1) coverage)) of its n sorted positive scores; 0
    (always in the set) where that rank is under 1."""
    s = sorted(positive_scores)
    rank = len(s) + 1 - math.ceil((len(s) + 1) * coverage)
    return s[rank - 1] if rank >= 1 else 0.0


def answer_threshold(confidence, correct, max_error: float, delta: float = 0.1, grid: int = 20) -> float:
    """The error bound's cut-off as models/conformal.py's docstring states it (Learn-then-Test fixed-sequence
    testing), with SciPy's binomial CDF: the cut-offs answering ceil(n step / grid) of the calibration photos (ties
    answered together), from the most confident down; those with fewer photos above them than any test could pass
    on ((1 - max_error)^m > delta) are skipped; each is tested on the m photos ranked above its own at the full
    delta (P(Binomial(m, max_error) <= wrong among them) <= delta), and the sequence stops at the first that
    fails; the last that passed is the cut-off, inf where none."""
    from scipy.stats import binom

    pairs = sorted(zip(confidence, correct), key=lambda c: -c[0])
    best, last = math.inf, -1
    for step in range(1, grid + 1):
        i = math.ceil(len(pairs) * step / grid) - 1  # the cut-off's own photo, 0-based
        while i + 1 < len(pairs) and pairs[i + 1][0] == pairs[i][0]:
            i += 1
        if i <= last:
            continue
        last = i
        if (1 - max_error) ** i > delta:  # i photos above it: too few for any test to pass
            continue
        wrong = sum(1 - c for _, c in pairs[:i])
        if binom.cdf(wrong, i, max_error) > delta:
            break
        best = pairs[i][0]
    return best


def drift(rows, reference, keep_known: float = 0.95) -> dict:
    """monitor's figures for a single-label window of stored ``rows`` against a model's ``reference``, from their
    definitions: per series (top probability, novelty) the two-sample KS D against the reference's CDF (the step
    function of its quantiles q_1..q_100, 1 % each: scipy's ks_2samp against those 100 points), its asymptotic
    p-value at the effective size n m / (n + m), the PSI over the reference's distinct deciles (each bin's
    reference share: that of q_1..q_100 in it, 10 % each where no two deciles tie); the unknown rate's
    one-sided binomial p (P(X >= unknowns), at the reference's rate or 1 - keep_known, the larger); the class
    mix's Pearson chi-square p (classes - 1 degrees of freedom) and PSI."""
    from scipy import stats

    found, n_ref = {}, int(reference["n"])
    series = {"confidence": [r["top_k"][0]["probability"] for r in rows if r["top_k"]],
              "novelty": [r["novelty"] for r in rows if r.get("novelty") is not None]}
    for name, values in series.items():
        q = reference[name]
        d = float(stats.ks_2samp(values, q[1:]).statistic)
        edges = sorted(set(q[10:100:10]))  # the deciles (fewer bins where they tie: a saturated top probability)
        found[name] = {"ks": d, "p": kolmogorov_sf(math.sqrt(n_ref * len(values) / (n_ref + len(values))) * d),
                       "psi": psi(bin_shares(values, edges), bin_shares(q[1:], edges))}
    novelty = series["novelty"]
    unknown = sum(v > 1.0 for v in novelty)
    rate = max(reference.get("unknown_rate", 0.0), 1 - keep_known)
    found["unknown_rate"] = {"window": unknown / len(novelty), "p": float(stats.binom.sf(unknown - 1, len(novelty),
                                                                                          rate))}
    names = list(reference["class_mix"])
    counts = np.array([sum(1 for r in rows if r["top_k"] and r["top_k"][0]["label"] == n) for n in names], float)
    shares = np.maximum([reference["class_mix"][n] for n in names], 1e-3)
    shares = shares / shares.sum()
    chi2 = float(((counts - shares * counts.sum()) ** 2 / (shares * counts.sum())).sum())
    found["class_mix"] = {"p": float(stats.chi2.sf(chi2, len(names) - 1)), "psi": psi(counts / counts.sum(), shares)}
    return found
