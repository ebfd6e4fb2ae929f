"""Multi-label guarantees on mosaics of real photos (tests/mosaics.py; models.conformal_labels): per-label sets and
the exact-set error bound over 20 random calibration / test splits; and ``predict --ray`` answering the new
options as local predict does. The mosaic model and its 400 held-out mosaics: test_multilabel's fixtures."""

import os

import numpy as np
import pytest

import transferkit
from transferkit.models import conformal as cp
from transferkit.models import conformal_labels as cl

from test_multilabel import held_out, run  # noqa: F401  (module fixtures: one mosaic model for this module)


def test_per_label_sets_and_the_exact_set_bound_hold_over_20_splits(held_out):  # noqa: F811
    """Halvings of the 400 held-out mosaics: the mean per-label coverage at 0.90 within 2 points of it; at max
    error 0.10 (an answer is wrong unless its label set is exactly right) the error among the answered test
    mosaics over the bound in at most 4 of 20 splits (delta 0.1: P(Bin(20, 0.1) >= 5) = 0.04), and some mosaics
    answered. The error and coverage are counted here from the rows' own sets, independently of the module."""
    _, probs, y, names, decision = held_out
    rng = np.random.default_rng(7)
    coverage, violations, answered = [], 0, []
    for _ in range(20):
        order = rng.permutation(len(y))
        cal, test = order[:200], order[200:]
        record = cl.fit_label_conformal(probs[cal], y[cal], names, decision, {})
        thresholds, _ = cl.label_thresholds(record, names, 0.9, warn=False)
        inside = probs[test] >= thresholds - cl.TOLERANCE
        coverage.append(np.mean([inside[y[test][:, j], j].mean() for j in range(len(names))]))
        cut = cp.answer_threshold(record["risk"], 0.1)
        confidence = np.where(probs[test] >= decision, probs[test], 1 - probs[test]).prod(axis=1)
        keep = confidence >= cut
        wrong = ~((probs[test] >= decision) == y[test]).all(axis=1)
        answered.append(keep.mean())
        violations += bool(keep.any() and wrong[keep].mean() > 0.1)
    print(f"mean per-label coverage {np.mean(coverage):.4f}; violations {violations} / 20; answered "
          f"{np.mean(answered):.3f}")
    assert abs(np.mean(coverage) - 0.9) <= 0.02, coverage
    assert violations <= 4 and np.mean(answered) > 0.3


def test_predict_on_ray_answers_the_new_options_as_local_predict(trained, dataset, ray_local, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    model = os.path.join(trained[1], "model.keras")
    asked = {"class_coverage": 0.9, "expected_error": 0.2}
    local = {r["path"]: r for r in transferkit.predict(model, [dataset[1]], **asked)}
    out = str(tmp_path / "sets.parquet")
    transferkit.predict_on_ray(model, [dataset[1]], out, **asked)
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == set(local)
    for path, want in local.items():
        got = rows[path]
        assert (got["set"], got["abstain"], got["label"]) == ("|".join(want["set"]), want["abstain"], want["label"])
    with pytest.raises(transferkit.TransferkitError, match="its rows were written with"):  # not mixed into rows
        transferkit.predict_on_ray(model, [dataset[1]], out)  # without them
