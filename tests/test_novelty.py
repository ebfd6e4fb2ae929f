"""The trust building blocks: temperature, the Mahalanobis novelty score as plain Keras layers, and ECE (the
pipeline's use of them is tested on real photos in test_trust.py)."""

import numpy as np
import pytest

from transferkit.models import heads, novelty

import references as ref


def _clusters(per_class: int, dim: int = 1280, n_classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (n_classes, dim)) * 2
    labels = np.repeat(np.arange(n_classes), per_class)
    return (centers[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float32), labels, centers


def test_novelty_layers_compute_the_numpy_score_and_rank_far_points_higher():
    x, y, centers = _clusters(per_class=5)  # 5 per class in 1280 dimensions: only shrinkage makes this usable
    whitening, means = novelty.fit_mahalanobis(x, y, 3)
    assert np.isfinite(whitening).all()
    head = novelty.trusted_head(heads.build_head("gap", (1280,), 3))
    novelty.set_trust(head, 1.0, whitening, means, 1.0)
    rng = np.random.default_rng(1)
    known = (centers[[0, 1, 2]] + rng.normal(0, 1, (3, 1280))).astype(np.float32)
    far = rng.normal(0, 1, (3, 1280)).astype(np.float32) * 2 + 6
    out = np.asarray(head(np.concatenate([known, far])))
    probs, score = novelty.split_outputs(out, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(score, novelty.mahalanobis(np.concatenate([known, far]), whitening, means),
                               rtol=2e-3)
    assert score[3:].min() > score[:3].max()


def test_temperature_undoes_overconfidence_and_lowers_ece():
    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1.5, (4000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(logits)])  # calibrated at T = 1 by construction ...
    sharp = logits * 3  # ... made over-confident
    t = novelty.fit_temperature(sharp, labels)
    assert 2.5 < t < 3.5

    before = novelty.expected_calibration_error(softmax(sharp), labels)
    after = novelty.expected_calibration_error(softmax(sharp / t), labels)
    # each against the binned gap by hand (tests/references.py), not only against each other
    assert before == pytest.approx(ref.ece(softmax(sharp), labels), abs=1e-12)
    assert after == pytest.approx(ref.ece(softmax(sharp / t), labels), abs=1e-12)
    print(f"\nECE {before:.4f} -> {after:.4f} at T = {t:.3f}")
    assert after < before / 2 and before > 0.1


def test_the_score_travels_into_onnx(tmp_path):
    from conftest import require

    ort = require("onnxruntime")
    from transferkit.engines.keras_onnx import save_onnx

    x, y, _ = _clusters(per_class=8, dim=64)
    whitening, means = novelty.fit_mahalanobis(x, y, 3)
    head = novelty.trusted_head(heads.build_head("gap", (64,), 3))
    novelty.set_trust(head, 0.7, whitening, means, 50.0)
    save_onnx(head, tmp_path / "head.onnx")
    session = ort.InferenceSession(str(tmp_path / "head.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(onnx_out, np.asarray(head(x)), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n_per_class, dim", [(5, 1280), (100, 1280), (400, 64)])
def test_the_gram_form_of_the_shared_covariance_is_scikit_learns_ledoit_wolf(n_per_class, dim):
    """Fewer rows than dimensions (a small set), more, and many more: the shrinkage, the covariance, its inverse
    and its inverse square root all equal scikit-learn's d x d computation."""
    from sklearn.covariance import ledoit_wolf

    x, y, _ = _clusters(per_class=n_per_class, dim=dim)
    x = x.astype(np.float64) * np.random.default_rng(3).uniform(0.1, 3, dim)  # unequal variances
    shared = novelty.SharedCovariance(x, y, 3)
    means = np.stack([x[y == c].mean(axis=0) for c in range(3)])
    covariance, shrinkage = ledoit_wolf(x - means[y])
    assert shared.shrinkage == pytest.approx(shrinkage, abs=1e-12)
    np.testing.assert_allclose(shared.covariance(), covariance, atol=1e-12 * np.abs(covariance).max())
    z = np.random.default_rng(4).normal(size=(4, dim))
    expected = np.linalg.solve(covariance, z.T).T
    np.testing.assert_allclose(shared.solve(z), expected, atol=1e-10 * np.abs(expected).max())
    values, vectors = np.linalg.eigh(covariance)
    root = (vectors / np.sqrt(values)) @ vectors.T
    np.testing.assert_allclose(shared.inverse_sqrt(), root, atol=1e-10 * np.abs(root).max())
