"""Every statistic transferkit computes itself, against an independent reference (scipy.stats, scikit-learn, or
the textbook definition in tests/references.py), on data where its value is far from trivial, within a stated
tolerance: drift's Kolmogorov-Smirnov D and p, population stability, the class mix's chi-square, the unknown
rate's binomial test and the multi-label rates' two-sided one, ECE, AUROC, average precision, conformal coverage
and mean set size (single- and multi-label), and the error bound's binomial tail and cut-off. Then the figures
evaluate reports (coverage, set size, ECE, the unknowns' AUROC) against a recomputation from the rows (monitor's:
tests/test_review.py)."""

import math
import os

import numpy as np
import pytest
from scipy import stats

import references as ref
from photos import write_crops

NAMES = ["a", "b", "c"]


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _model_outputs(n: int, rng, n_classes: int = 3, sharp: float = 2.0, mix=None, signal: float = 1.3):
    """(probabilities, true labels) of an over-confident classifier (right about 70 % of the time at the default
    ``signal``)."""
    labels = rng.choice(n_classes, n, p=mix)
    logits = rng.normal(0, 1, (n, n_classes)) + signal * np.eye(n_classes)[labels]
    return _softmax(sharp * logits), labels


# ----- drift: Kolmogorov-Smirnov and population stability -----
@pytest.mark.parametrize("a", [2.6, 1.7])  # the window above the reference (D = max F_ref - F_win), and below
def test_ks_against_quantiles_is_scipys_two_sample_ks(a):
    from transferkit.reports.drift import ks_against_quantiles

    rng = np.random.default_rng(0)
    validation = rng.beta(2, 2, 400)
    quantiles = [float(q) for q in np.quantile(validation, np.linspace(0, 1, 101))]  # what training stores
    window = rng.beta(a, 2, 250)
    d, p = ks_against_quantiles(window, quantiles, 400)
    # the reference is known by its quantiles: its CDF is the step function of q_1..q_100 (1 % each), so D is
    # exactly scipy's two-sample D against those 100 points ...
    assert d == pytest.approx(stats.ks_2samp(window, quantiles[1:]).statistic, abs=1e-12)
    # ... and within the quantiles' resolution (0.01) of D against the raw validation values
    raw = stats.ks_2samp(window, validation).statistic
    assert abs(d - raw) <= 0.01 + 1e-12
    # p: the asymptotic Kolmogorov tail at sqrt(n m / (n + m)) D, summed by hand
    assert p == pytest.approx(ref.kolmogorov_sf(math.sqrt(400 * 250 / 650) * d), rel=1e-9)
    print(f"\nKS: D {d:.4f} (raw validation {raw:.4f}), p {p:.4g}")
    assert 0.05 < d < 0.5 and 1e-6 < p < 0.5  # far from trivial


def test_psi_over_the_reference_deciles_by_hand():
    from transferkit.reports.drift import psi

    rng = np.random.default_rng(1)
    validation = rng.normal(0, 1, 500)
    quantiles = [float(q) for q in np.quantile(validation, np.linspace(0, 1, 101))]
    window = rng.normal(0.4, 1.3, 300)
    edges = quantiles[10:100:10]  # the nine inner deciles: ten bins of 10 % of the reference each
    expected = ref.psi(ref.bin_shares(window, edges), [0.1] * 10)
    found = psi(window, quantiles)
    print(f"\nPSI {found:.4f} (by hand {expected:.4f})")
    assert found == pytest.approx(expected, abs=1e-12)
    assert 0.1 < found < 1.0


def _rows(confidence, novelty, labels):
    return [{"top_k": [{"label": NAMES[k], "probability": float(c)}], "novelty": float(s)}
            for c, s, k in zip(confidence, novelty, labels)]


def test_compare_figures_from_the_raw_rows():
    """monitor's table (compare): each figure recomputed from the window's rows and the reference's quantiles."""
    from transferkit.reports.drift import compare
    from transferkit.training.reference import summary

    rng = np.random.default_rng(2)
    probs, _ = _model_outputs(400, rng)
    val_scores = rng.gamma(4, 0.15, 400)  # about 6 % over 1 (unknown)
    reference = summary(probs, val_scores, NAMES)
    window_probs, _ = _model_outputs(200, rng, sharp=1.6, mix=[0.5, 0.3, 0.2])
    window_scores = rng.gamma(4, 0.17, 200)
    rows = _rows(window_probs.max(1), window_scores, window_probs.argmax(1))
    found = compare(rows, reference)["checks"]

    expected = ref.drift(rows, reference)
    for name in ("confidence", "novelty", "unknown_rate", "class_mix"):
        for figure, value in expected[name].items():
            assert found[name][figure] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, figure)
    assert expected["unknown_rate"]["window"] == np.mean(window_scores > 1)  # the rows hold what was drawn
    print("\n" + ", ".join(f"{name}: p {c['p']:.3g}" for name, c in found.items()))
    assert all(1e-8 < c["p"] < 0.9 for c in found.values())  # none trivial


def test_label_rates_two_sided_binomial_with_bonferroni():
    """A multi-label window: each label's answer rate against the reference's, scipy's two-sided binomial test
    (the outcomes no likelier than the one seen), times the number of labels."""
    from transferkit.reports.drift import compare

    rng = np.random.default_rng(3)
    names, rates = ["cat", "dog", "hat"], {"cat": 0.4, "dog": 0.25, "hat": 0.1}
    given = rng.random((160, 3)) < np.array([0.5, 0.25, 0.16])
    rows = [{"top_k": [{"label": "cat", "probability": 0.9}], "answer": {"labels": [n for n, g in zip(names, r) if g]}}
            for r in given]  # a stored multi-label answer
    q = [float(v) for v in np.linspace(0.5, 1, 101)]
    found = compare(rows, {"n": 300, "confidence": q, "class_mix": {}, "label_rates": rates})["checks"]["label_rates"]
    for j, name in enumerate(names):
        k, n, p0 = int(given[:, j].sum()), len(given), rates[name]
        pmf = stats.binom.pmf(np.arange(n + 1), n, p0)
        two_sided = pmf[pmf <= pmf[k] * (1 + 1e-7)].sum()
        assert found["per_label"][name]["p"] == pytest.approx(min(1.0, 3 * two_sided), rel=1e-6)
        assert found["per_label"][name]["window"] == pytest.approx(k / n, abs=1e-4)
    print("\n" + ", ".join(f"{n}: p {c['p']:.3g}" for n, c in found["per_label"].items()))
    assert 1e-6 < min(c["p"] for c in found["per_label"].values()) < 0.5


# ----- calibration, unknowns, average precision -----
def test_ece_is_the_binned_gap_by_hand():
    from transferkit.models.novelty import expected_calibration_error

    rng = np.random.default_rng(4)
    probs, labels = _model_outputs(3000, rng)
    found = expected_calibration_error(probs, labels)
    expected = ref.ece(probs, labels)
    print(f"\nECE {found:.4f} (by hand {expected:.4f}); accuracy {(probs.argmax(1) == labels).mean():.3f}")
    assert found == pytest.approx(expected, abs=1e-12)
    assert 0.03 < found < 0.5


def test_unknown_auroc_rejection_and_confusion_from_the_scores():
    from transferkit.reports.trust import _unknown_summary

    rng = np.random.default_rng(5)
    probs, labels = _model_outputs(120, rng)
    u_probs, _ = _model_outputs(60, rng, sharp=1.0)
    scores, u_scores = rng.gamma(4, 0.2, 120), rng.gamma(4, 0.35, 60)  # overlapping: AUROC about 0.8
    found = _unknown_summary(labels, probs, scores, u_probs, u_scores, 1.0, NAMES, "/x/unknowns/")
    assert found["auroc"] == pytest.approx(ref.auroc(scores, u_scores), abs=1e-12)
    assert found["auroc_top_probability"] == pytest.approx(ref.auroc(-probs.max(1), -u_probs.max(1)), abs=1e-12)
    assert found["rejected"] == pytest.approx(np.mean(u_scores > 1), abs=1e-12)
    assert found["known_kept"] == pytest.approx(np.mean(scores <= 1), abs=1e-12)
    cm = np.zeros((4, 4), int)
    for y, p, s in zip(labels, probs, scores):
        cm[y, 3 if s > 1 else p.argmax()] += 1
    for p, s in zip(u_probs, u_scores):
        cm[3, 3 if s > 1 else p.argmax()] += 1
    assert found["confusion_matrix"] == cm.tolist()
    print(f"\nAUROC {found['auroc']:.4f}, top probability {found['auroc_top_probability']:.4f}")
    assert 0.6 < found["auroc"] < 0.95 and found["auroc"] != found["auroc_top_probability"]


def test_multilabel_average_precision_and_map_by_hand():
    from transferkit.reports.multilabel import multilabel_metrics

    rng = np.random.default_rng(6)
    y = rng.random((150, 4)) < [0.5, 0.3, 0.2, 0.4]
    probs = np.clip(0.35 * y + rng.normal(0.35, 0.2, y.shape), 0, 1).round(2)  # ties, as float32 scores give
    names = ["w", "x", "y", "z"]
    found = multilabel_metrics(y.astype(int), probs, names, np.full(4, 0.5))
    aps = [ref.average_precision(y[:, j], probs[:, j]) for j in range(4)]
    for j, name in enumerate(names):
        assert found["per_label"][name]["ap"] == pytest.approx(aps[j], abs=1e-12)
    assert found["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)
    print("\nAP " + ", ".join(f"{a:.3f}" for a in aps))
    assert all(0.4 < a < 0.97 for a in aps)


# ----- conformal sets and the error bound -----
def test_single_label_coverage_and_set_size_by_hand():
    from transferkit.models.conformal import COVERAGES, PENALTY, K_REG, evaluate_sets, fit_conformal

    rng = np.random.default_rng(7)
    cal_probs, cal_labels = _model_outputs(300, rng, n_classes=5, sharp=1.2)
    probs, labels = _model_outputs(600, rng, n_classes=5, sharp=1.2)
    record = fit_conformal(cal_probs, cal_labels, {"validation": 300})
    found = evaluate_sets(probs, labels, list("abcde"), record)
    for asked, c in zip(COVERAGES, found["coverage"]):
        sets = ref.conformal_sets(cal_probs, cal_labels, probs, asked, PENALTY, K_REG)
        coverage = np.mean([y in s for y, s in zip(labels, sets)])
        size = np.mean([len(s) for s in sets])
        print(f"\nasked {asked}: coverage {c['empirical']} (by hand {coverage:.4f}), mean set size "
              f"{c['mean_set_size']} (by hand {size:.3f})", end="")
        assert c["empirical"] == pytest.approx(coverage, abs=5e-5)  # rounded to 4 decimals
        assert c["mean_set_size"] == pytest.approx(size, abs=5e-4)  # rounded to 3
        for k, name in enumerate("abcde"):
            assert c["per_class"][name] == pytest.approx(
                np.mean([k in s for y, s in zip(labels, sets) if y == k]), abs=5e-5)
        # and what split conformal promises, on these exchangeable rows: the asked coverage within binomial noise
        assert abs(coverage - asked) < 3 * math.sqrt(asked * (1 - asked) / len(labels)) + 1 / 301
        assert 1.2 < size < 4.5


def test_multilabel_coverage_and_set_size_by_hand():
    from transferkit.models.conformal import COVERAGES
    from transferkit.models.conformal_labels import evaluate_label_sets, fit_label_conformal

    rng = np.random.default_rng(8)
    names = ["w", "x", "y"]

    def draw(n):
        y = rng.random((n, 3)) < [0.5, 0.3, 0.15]
        return 1 / (1 + np.exp(-(2.5 * y - 1.2 + rng.normal(0, 1.1, y.shape)))), y

    cal_probs, cal_y = draw(400)
    probs, y = draw(500)
    decision = np.full(3, 0.5)
    record = fit_label_conformal(cal_probs, cal_y, names, decision, {"validation": 400})
    found = evaluate_label_sets(probs, y, names, record, decision)
    for asked, c in zip(COVERAGES, found["coverage"]):
        thresholds = [ref.label_threshold(cal_probs[cal_y[:, j], j], asked) for j in range(3)]
        inside = probs >= np.array(thresholds)
        per_label = [inside[y[:, j], j].mean() for j in range(3)]
        for j, name in enumerate(names):
            assert c["per_class"][name] == pytest.approx(per_label[j], abs=5e-5)
        assert c["empirical"] == pytest.approx(np.mean(per_label), abs=5e-5)
        assert c["mean_set_size"] == pytest.approx(inside.sum(1).mean(), abs=5e-4)
        print(f"\nasked {asked}: per-label coverage {np.round(per_label, 3)}, mean set size "
              f"{inside.sum(1).mean():.3f}", end="")
        assert 0.5 < c["mean_set_size"] < 3 and all(0.6 < v < 1 for v in per_label)


@pytest.mark.parametrize("k, n, p", [(3, 40, 0.1), (10, 120, 0.05), (0, 30, 0.02), (55, 500, 0.1),
                                     (1, 200, 0.02), (115, 1000, 0.1)])
def test_binomial_tail_is_scipys(k, n, p):
    from transferkit.models.conformal import binomial_cdf

    expected = stats.binom.cdf(k, n, p)
    assert 1e-6 < expected < 0.999  # a tail, not a certainty
    assert binomial_cdf(k, n, p) == pytest.approx(expected, rel=1e-9)


def test_error_bound_cut_off_and_what_it_answers_by_hand():
    from transferkit.models.conformal import answer_threshold, fit_conformal, selective_report

    rng = np.random.default_rng(9)
    cal_probs, cal_labels = _model_outputs(1500, rng, sharp=2.5, signal=2.0)  # right 85 % of the time
    probs, labels = _model_outputs(800, rng, sharp=2.5, signal=2.0)
    risk = fit_conformal(cal_probs, cal_labels, {})["risk"]
    confidence = cal_probs.max(1).round(6)
    correct = (cal_probs.argmax(1) == cal_labels).astype(int)
    # 0.05: one error among the 74 most confident photos stops the fixed sequence at its first cut-off (nothing
    # answered, where the old Bonferroni grid certified 0.04); 0.06, 0.08, 0.1 each certify a cut-off
    assert ref.answer_threshold(confidence, correct, 0.05) == answer_threshold(risk, 0.05) == np.inf
    bounds = (0.06, 0.08, 0.1)
    report = selective_report(risk, probs.max(1), probs.argmax(1) == labels, bounds)
    for bound, r in zip(bounds, report):
        cut = ref.answer_threshold(confidence, correct, bound)
        assert answer_threshold(risk, bound) == cut
        answered = probs.max(1) >= cut
        print(f"\nmax error {bound}: cut-off {cut:.4f}, answers {answered.mean():.3f}, error "
              f"{1 - (probs.argmax(1) == labels)[answered].mean():.4f}", end="")
        assert r["answered_share"] == pytest.approx(answered.mean(), abs=5e-5)
        assert r["error_answered"] == pytest.approx(1 - (probs.argmax(1) == labels)[answered].mean(), abs=5e-5)
        assert 0.05 < answered.mean() < 0.95  # a cut-off that answers some, not all


# ----- the figures a command reports, against a recomputation from its rows -----
class Noisy:
    """The trained model, seeing every photo through one fixed pattern of heavy noise: on the easy test photos
    (accuracy 1.0, ECE 0.0, every set a single right label) its answers become uncertain and often wrong, so the
    evaluation's figures are far from trivial (measured: accuracy 0.61, ECE 0.26, coverage 0.67 at 0.9, AUROC of
    the novelty score against 16 unknowns 0.53)."""

    def __init__(self, model, sigma: float = 110.0):
        self.model, self.class_names, self.image_size = model, model.class_names, model.image_size
        self.metadata, self.path = model.metadata, ""
        self.noise = np.random.default_rng(0).normal(0, sigma, (model.image_size, model.image_size, 3))

    def predict_images(self, images):
        return self.model.predict_images(np.clip(np.asarray(images, np.float32) + self.noise, 0, 255))


def test_evaluate_reports_the_coverage_set_size_ece_and_auroc_of_its_rows(trained, dataset, tmp_path):
    import transferkit
    from transferkit.engines.predict import predict_files
    from transferkit.models.novelty import split_outputs
    from transferkit.reports.evaluation import evaluate_predictor

    noisy = Noisy(transferkit.load_predictor(trained[0]["model_path"]))
    far = write_crops(tmp_path / "unknown", ("chelsea", "coffee", "moon", "clock"), 4, seed=21)  # 16 of no class
    unknown_dir = os.path.dirname(far[0])
    metrics = evaluate_predictor(noisy, dataset[1], explain=False, unknown_dir=unknown_dir)
    record, names = noisy.metadata["conformal"], noisy.class_names
    assert record["n"] == len(record["scores"])  # every calibration score stored: the quantile is exact
    for c in metrics["conformal"]["coverage"]:
        rows = transferkit.predict(noisy, [dataset[1]], top_k=len(names), reject=False, coverage=c["asked"])
        probs = np.array([[next(t["probability"] for t in r["top_k"] if t["label"] == n) for n in names]
                          for r in rows])
        labels = np.array([names.index(os.path.basename(os.path.dirname(r["path"]))) for r in rows])
        # the sets by hand from the stored calibration scores: the ceil((n + 1) coverage)-th smallest
        rank = math.ceil((record["n"] + 1) * c["asked"])
        q = record["scores"][rank - 1] if rank <= record["n"] else math.inf
        sets = [{j for j in range(len(names)) if ref.aps_score(p, j, record["penalty"], record["k_reg"]) <= q + 1e-6}
                for p in probs]
        assert [set(r["set"]) for r in rows] == [{names[j] for j in s} for s in sets]  # predict's sets
        coverage, size = np.mean([y in s for y, s in zip(labels, sets)]), np.mean([len(s) for s in sets])
        print(f"\nasked {c['asked']}: evaluate says coverage {c['empirical']}, mean set size {c['mean_set_size']}; "
              f"from the rows {coverage:.4f}, {size:.3f}", end="")
        assert c["empirical"] == pytest.approx(coverage, abs=5e-5) and c["mean_set_size"] == pytest.approx(size,
                                                                                                        abs=5e-4)
    ece = ref.ece(probs, labels)
    print(f"\nECE: evaluate says {metrics['calibration']['ece']}, from the rows {ece:.4f}; accuracy "
          f"{metrics['accuracy']:.3f}")
    assert metrics["calibration"]["ece"] == pytest.approx(ece, abs=5e-5)
    assert 0.1 < ece < 0.5 and 0.4 < metrics["accuracy"] < 0.9  # far from the clean photos' 0.0 and 1.0
    assert any(0.3 < c["empirical"] < 0.95 and c["mean_set_size"] > 1.1 for c in metrics["conformal"]["coverage"])
    # the unknowns' figures: from the same predictor's outputs on the known and the unknown photos
    unknown_paths = sorted(os.path.join(unknown_dir, f) for f in os.listdir(unknown_dir))
    known, unknown = (split_outputs(predict_files(noisy, paths)[0], len(names))
                      for paths in ([r["path"] for r in rows], unknown_paths))
    u = metrics["unknown"]
    assert u["auroc"] == pytest.approx(ref.auroc(known[1], unknown[1]), abs=1e-9)
    assert u["auroc_top_probability"] == pytest.approx(ref.auroc(-known[0].max(1), -unknown[0].max(1)), abs=1e-9)
    assert u["rejected"] == pytest.approx(np.mean(unknown[1] > 1), abs=1e-12)
    assert u["known_kept"] == pytest.approx(np.mean(known[1] <= 1), abs=1e-12)
    print(f"unknowns: AUROC {u['auroc']:.3f} (top probability {u['auroc_top_probability']:.3f}), rejected "
          f"{u['rejected']:.3f}, known kept {u['known_kept']:.3f}")
    assert 0.2 < u["auroc"] < 0.9 and 0 < u["rejected"] < 1
