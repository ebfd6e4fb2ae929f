"""Photos labelled ``unknown`` (none of the classes) given to ``train --add``: never a class, the novelty score's
"none of these" examples (the score minus the squared distance to their mean; data/added.py,
models/novelty.fit_trust). The layers' score is checked against scikit-learn's Ledoit-Wolf covariance and
``numpy.linalg``; on real photos (crops of three scikit-image photographs, the unknowns crops of two others), the
unknown rate on photos of *other* photographs is compared with the same training without them, and the
``.keras`` and its ONNX export give the same unknown verdicts."""

import csv
import os

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from children import run_cli
from conftest import CLASSES, IMAGE_SIZE, require, write_dataset
from photos import write_crops

NEGATIVE = ("chelsea", "rocket")  # the reviewer's unknown photos (a cat and a rocket, as a served model met them)
HELD_OUT = ("coffee", "astronaut", "brick", "grass", "moon", "clock", "text", "cell")  # other photographs


def _clusters(per_class: int, dim: int, seed: int, n_classes: int = 3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (n_classes + 1, dim)) * 2  # the last: the background's
    labels = np.repeat(np.arange(n_classes), per_class)
    x = (centers[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float32)
    negatives = (centers[-1] + rng.normal(0, 1, (6, dim))).astype(np.float32)
    return x, labels, negatives


def _squared_mahalanobis(x, means, covariance):
    """(n, len(means)) by numpy.linalg.solve, in float64."""
    diff = x[:, None, :].astype(np.float64) - means[None]
    return np.einsum("ncd,ncd->nc", diff, np.linalg.solve(covariance, diff.reshape(-1, x.shape[1]).T).T.reshape(
        diff.shape))


def test_the_background_term_is_a_likelihood_ratio_in_the_same_layers(tmp_path):
    """min_c d(x, mean_c) - d(x, mean of the unknowns) + offset, over the threshold, from the layers; the same
    computed here from scikit-learn's ``ledoit_wolf`` on the class-centred training features; the threshold
    stays the class score's (positive), the offset is >= 0, and the ONNX export computes the same."""
    from sklearn.covariance import ledoit_wolf

    from transferkit.engines.keras_step import run_model
    from transferkit.models import heads, novelty

    x, y, negatives = _clusters(12, 64, seed=3)
    x_val, y_val, _ = _clusters(4, 64, seed=3)  # same centres, other noise draws
    x_val = x_val + np.random.default_rng(4).normal(0, 0.1, x_val.shape).astype(np.float32)
    plain = novelty.trusted_head(heads.build_head("gap", (64,), 3))
    head = novelty.trusted_head(heads.build_head("gap", (64,), 3))
    found_plain = novelty.fit_trust(plain, (x, y), (x_val, y_val), 3, 0.95)
    found = novelty.fit_trust(head, (x, y), (x_val, y_val), 3, 0.95, negatives=negatives)
    assert found["threshold"] == found_plain["threshold"] > 0  # the cut moved by the offset onto the same number
    background = found["background"]
    assert background["photos"] == 6 and background["offset"] >= 0
    assert background["offset"] == pytest.approx(found["threshold"] - background["cut"], abs=1e-9)

    means = np.stack([x[y == c].mean(0) for c in range(3)]).astype(np.float64)
    covariance, _ = ledoit_wolf(x - means[y])
    probe = np.concatenate([x_val, negatives, np.random.default_rng(5).normal(0, 2, (8, 64)).astype(np.float32)])
    expected = (_squared_mahalanobis(probe, means, covariance).min(1)
                - _squared_mahalanobis(probe, negatives.mean(0, keepdims=True), covariance)[:, 0])
    _, score = novelty.split_outputs(run_model(head, probe), 3)
    got = score.astype(np.float64) * found["threshold"] - background["offset"]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    _, plain_score = novelty.split_outputs(run_model(plain, probe), 3)
    assert (score[len(x_val):len(x_val) + 6] > 1).all()  # the unknowns themselves: unknown
    # minus a squared distance: never above the class score (before the offset)
    assert (got <= plain_score.astype(np.float64) * found["threshold"] + 1e-3 * np.abs(expected).max()).all()
    kept = ((expected[: len(x_val)] + background["offset"]) <= found["threshold"]).mean()
    assert found["validation_kept"] == pytest.approx(kept)

    ort = require("onnxruntime")
    from transferkit.engines.keras_onnx import save_onnx

    save_onnx(head, tmp_path / "head.onnx")
    session = ort.InferenceSession(str(tmp_path / "head.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: probe})[0]
    np.testing.assert_allclose(onnx_out[:, 3], score, rtol=1e-4, atol=1e-3)


def _novelty(model_path: str, paths: list[str], runtime: str = "keras") -> np.ndarray:
    """The novelty of each photo over the model's threshold (above 1: unknown), on ``runtime``."""
    from transferkit.api import load_model
    from transferkit.engines.predict import files_to_probs
    from transferkit.models.novelty import split_outputs

    predictor = load_model(model_path, runtime=runtime)
    outputs, kept, _ = files_to_probs(predictor, paths, 32)
    assert len(kept) == len(paths)
    return split_outputs(outputs, len(predictor.class_names))[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two CLI trainings on the same photos and split, without and with ``--add`` of a label file of 8 photos
    labelled unknown (4 crops each of a cat and a rocket); held-out photos of 8 other photographs (8 each) and
    of the classes (12 each)."""
    root = tmp_path_factory.mktemp("negatives")
    train = write_dataset(root / "train", 16, seed=41)
    negatives = write_crops(root / "review", NEGATIVE, 4, seed=42, quality=None)
    labels = root / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("path", "label"), *((os.path.relpath(p, root), "unknown") for p in negatives)])
    common = ("--image-size", IMAGE_SIZE, "--head", "logistic", "--seed", 5)
    plain = run_cli("train", train, "--out", root / "plain", *common)
    added = run_cli("train", train, "--add", labels, "--out", root / "added", *common)
    other = write_crops(root / "other", HELD_OUT, 8, seed=43, quality=None)
    known = write_dataset(root / "test", 12, seed=44)
    known = sorted(os.path.join(d, f) for d, _, fs in os.walk(known) for f in fs)
    return root, plain, added, other, known


def _metadata(path: str) -> dict:
    from transferkit.models.modelfile import read_metadata

    return read_metadata(path)


def test_unknown_photos_train_the_unknown_score_not_a_class(runs):
    root, plain, added, other, known = runs
    assert "8 photo(s) labelled unknown: not a class; used as 'none of these' examples for the unknown score" \
        in added.stderr
    before, after = _metadata(str(root / "plain" / "model.keras")), _metadata(str(root / "added" / "model.keras"))
    assert after["class_names"] == before["class_names"] and sorted(after["class_names"]) == sorted(CLASSES)
    assert after["data"]["n_train"] == before["data"]["n_train"] and after["data"]["n_unknown"] == 8
    assert after["novelty"]["background"]["photos"] == 8 and "background" not in before["novelty"]
    assert after["novelty"]["threshold"] == before["novelty"]["threshold"]  # the same cut, moved onto it
    assert after["data"]["fingerprint"] != before["data"]["fingerprint"]

    rates = {}
    for name in ("plain", "added"):
        model = str(root / name / "model.keras")
        scores = {"other": _novelty(model, other), "known": _novelty(model, known)}
        auroc = roc_auc_score([0] * len(known) + [1] * len(other), np.r_[scores["known"], scores["other"]])
        rates[name] = {"other": (scores["other"] > 1).mean(), "known": (scores["known"] > 1).mean(), "auroc": auroc}
    print(rates)
    # measured: other-domain photos answered unknown 63 -> 64 of 64, false unknowns 6 -> 1 of 36, AUROC (known
    # vs other, scikit-learn) 0.990 -> 0.999; a sign-flipped term passed the rate (64 of 64: everything unknown)
    # and failed the AUROC (0.897)
    assert rates["added"]["other"] > rates["plain"]["other"]
    assert rates["added"]["auroc"] >= rates["plain"]["auroc"]
    # in-domain false unknowns: at most 2 photos of 36 more than without (the threshold keeps 95 % of the
    # known held-out scores either way; the benchmark measured 4.4 -> 1.9-3.0 %)
    assert rates["added"]["known"] <= rates["plain"]["known"] + 2 / len(known)


def test_the_keras_model_and_its_onnx_export_give_the_same_unknown_verdicts(runs):
    require("onnxruntime")
    root, _, _, other, known = runs
    model, exported = str(root / "added" / "model.keras"), str(root / "added.onnx")
    run_cli("export", model, "--format", "onnx", "--out", exported)
    photos = other + known
    keras_verdicts = _novelty(model, photos) > 1
    np.testing.assert_array_equal(_novelty(exported, photos, runtime="onnxruntime") > 1, keras_verdicts)
    assert keras_verdicts[: len(other)].mean() > 0.5  # the check compares a score that says unknown somewhere
