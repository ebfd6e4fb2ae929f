"""Conformal prediction sets and abstention (models.conformal): the arithmetic, then the shared trained run on real
photos: the calibration stored in the model file, the same sets from Keras, ONNX, the server and the command line,
one-line errors, the evaluation's section and the model card. Coverage over many splits: benchmarks/conformal.py."""

import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import transferkit
from transferkit.errors import TransferkitError
from transferkit.models import conformal as cp

from children import predict_in_child
from conftest import CLASSES


def _photos(dataset):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(dataset[1]) for f in fs)


def test_the_quantile_is_the_conformal_order_statistic_and_sets_follow_it():
    record = cp.fit_conformal(np.array([[0.5, 0.3, 0.2]] * 4), np.array([0, 1, 2, 0]), {}, penalty=0.0)
    assert record["n"] == 4 and record["method"] == "aps" and record["scores"] == [0.5, 0.5, 0.8, 1.0]
    scores = {"n": 9, "scores": [i / 10 for i in range(1, 10)]}
    assert cp.score_quantile(scores, 0.8) == 0.8  # ceil(10 * 0.8) = 8th smallest
    assert cp.score_quantile(scores, 0.95) == math.inf  # ceil(10 * 0.95) = 10 > 9: every label
    probs = np.array([[0.7, 0.2, 0.1], [0.05, 0.15, 0.8]])
    sets = cp.prediction_sets(probs, scores | {"penalty": 0.0}, 0.8)  # labels whose mass at or above <= 0.8
    assert [list(s) for s in sets] == [[0], [2]]
    assert [list(s) for s in cp.prediction_sets(probs, scores | {"penalty": 0.0}, 0.95)] == [[0, 1, 2], [2, 1, 0]]
    many = cp.fit_conformal(np.tile([[0.6, 0.3, 0.1]], (5000, 1)), np.zeros(5000, int), {})
    assert len(many["scores"]) == cp.MAX_SCORES and many["n"] == 5000 and len(many["risk"]["confidence"]) == 2000


def test_the_binomial_bound_and_the_abstention_cut_off():
    from scipy.stats import binom

    for k, n, p in ((0, 10, 0.1), (3, 50, 0.05), (40, 200, 0.2)):
        assert cp.binomial_cdf(k, n, p) == pytest.approx(binom.cdf(k, n, p), rel=1e-9)
    confident = {"confidence": list(np.linspace(1, 0.5, 400)), "correct": [1] * 300 + [0, 1] * 50}
    cut = cp.answer_threshold(confident, 0.05)
    assert 0.6 < cut < 1  # the error-free top three quarters pass, the half-wrong tail does not
    assert cp.answer_threshold({"confidence": [0.9] * 20, "correct": [1] * 20}, 0.02) == math.inf  # 20: too few


def test_per_label_thresholds_are_the_conformal_order_statistic_of_each_labels_positives(caplog):
    from transferkit.models import conformal_labels as cl
    from transferkit.tasks import MultiLabel

    nine = {"n": 9, "scores": [i / 10 for i in range(1, 10)]}
    assert cl.label_threshold(nine, 0.9) == 0.1  # k = ceil(10 * 0.9) = 9: the 10 - 9 = 1st smallest
    assert cl.label_threshold(nine, 0.8) == 0.2  # k = 8: the 2nd smallest
    assert cl.label_threshold(nine, 0.95) is None  # k = 10 > 9: no order statistic is low enough
    many = {"n": 5000, "scores": cl._floor_bounded(np.linspace(0, 1, 5000))[0]}
    exact = np.sort(np.linspace(0, 1, 5000))[5000 - int(np.ceil(5001 * 0.9))]
    assert len(many["scores"]) == cp.MAX_SCORES and exact - 1e-3 < cl.label_threshold(many, 0.9) <= exact
    y = np.array([[1, 0], [1, 1], [1, 0], [0, 1]] * 5, bool)  # a: 15 positives, b: 10
    probs = np.where(y, np.linspace(0.55, 0.99, 20)[:, None], 0.2)
    with caplog.at_level("WARNING", logger="transferkit"):
        record = cl.fit_label_conformal(probs, y, ["a", "b"], np.array([0.5, 0.5]), {"validation": 20})
    assert record["labels"]["a"]["n"] == 15 and record["labels"]["b"]["n"] == 10
    assert record["labels"]["a"]["scores"] == sorted(record["labels"]["a"]["scores"])
    assert "coverage 0.95: no set guarantee for a, b" in caplog.text  # 15 and 10 < 19
    assert "coverage 0.9: no set guarantee" not in caplog.text  # 9 positives suffice at 0.9
    rows = MultiLabel([0.5, 0.5]).decide(["x.jpg", "y.jpg"], np.array([[0.3, 0.9], [0.97, 0.1]]), ["a", "b"], 2,
                                         conformal=record, coverage=0.95, max_error=0.1)
    assert [r["set"] for r in rows] == [["b", "a"], ["a", "b"]]  # no guarantee at 0.95: every label, conservatively
    assert all(r["abstain"] for r in rows)  # 20 calibration photos certify no error bound
    low = MultiLabel([0.5, 0.5]).decide(["x.jpg"], np.array([[0.3, 0.9]]), ["a", "b"], 2, conformal=record,
                                        coverage=0.8)
    t_b = cl.label_threshold(record["labels"]["b"], 0.8)
    assert low[0]["set"] == ["b"] and 0.3 < cl.label_threshold(record["labels"]["a"], 0.8) and t_b <= 0.9


def test_a_model_file_without_the_calibration_says_so_in_one_line():
    from transferkit.engines.predict import decide

    old = types.SimpleNamespace(metadata={"class_names": ["a", "b"]}, class_names=["a", "b"], path="old.keras")
    with pytest.raises(TransferkitError, match=r"old.keras: no conformal calibration.*coverage"):
        decide(old, ["x.jpg"], np.array([[0.9, 0.1]]), 1, coverage=0.9)
    damaged = types.SimpleNamespace(metadata={"class_names": ["a", "b"], "conformal": {"n": "x"}},
                                    class_names=["a", "b"], path="bad.keras")
    with pytest.raises(TransferkitError, match="bad.keras: damaged transferkit metadata"):
        decide(damaged, ["x.jpg"], np.array([[0.9, 0.1]]), 1, max_error=0.1)
    multi = types.SimpleNamespace(metadata={"class_names": ["a", "b"], "task": "multi_label"},
                                  class_names=["a", "b"], path="multi.keras")
    with pytest.raises(TransferkitError, match=r"multi.keras: no conformal calibration.*max_error needs"):
        decide(multi, ["x.jpg"], np.array([[0.9, 0.1]]), 1, max_error=0.1)
    multi.metadata["conformal"] = {"task": "multi_label", "labels": {"a": {"n": 2, "scores": [0.5, 0.7]}},
                                   "risk": {"confidence": [], "correct": []}}  # label b missing
    with pytest.raises(TransferkitError, match="multi.keras: damaged transferkit metadata .multi-label"):
        decide(multi, ["x.jpg"], np.array([[0.9, 0.1]]), 1, coverage=0.9)
    with pytest.raises(TransferkitError, match="coverage must be"):
        transferkit.predict(old, ["x.jpg"], coverage=1.5)


def test_the_model_stores_its_calibration_and_every_predictor_gives_the_same_sets(trained, dataset, tmp_path):
    from conftest import require

    require("onnxruntime")
    from transferkit.apps.serve import create_app
    from transferkit.export import export_model
    from transferkit.models.modelfile import read_metadata
    from transferkit.options import ServeOptions

    path = os.path.join(trained[1], "model.keras")
    stored = read_metadata(path)["conformal"]
    assert stored["n"] == sum(stored["fitted_on"].values()) and stored["fitted_on"]["validation"] > 0
    assert stored["fitted_on"]["out_of_fold"] > 0  # a small validation split: training photos out of fold join
    files = _photos(dataset)
    rows = transferkit.predict(path, files, runtime="keras", coverage=0.95, max_error=0.3)
    truth = [os.path.basename(os.path.dirname(f)) for f in files]
    assert np.mean([t in r["set"] for t, r in zip(truth, rows)]) >= 0.85
    assert all(isinstance(r["abstain"], bool) for r in rows)
    export_model(path, "onnx", str(tmp_path / "m.onnx"))
    onnx_rows = transferkit.predict(str(tmp_path / "m.onnx"), files, coverage=0.95, max_error=0.3)
    assert [r["set"] for r in onnx_rows] == [r["set"] for r in rows]
    assert [r["abstain"] for r in onnx_rows] == [r["abstain"] for r in rows]
    client = create_app(path, ServeOptions(runtime="keras")).test_client()
    for f, expected in zip(files[:6], rows):
        with open(f, "rb") as fh:
            reply = client.post("/api/predict?coverage=0.95&max_error=0.3",
                                data={"image": (fh, os.path.basename(f))}).get_json()
        assert reply["predictions"][0]["set"] == expected["set"]
        assert reply["predictions"][0]["abstain"] == expected["abstain"]
    assert client.get("/api/model").get_json()["conformal"] is True
    for query, message in (("coverage=1.5", "coverage must be > 0.0 and < 1.0, got 1.5"),
                           ("max_error=abc", "max_error must be a number, got 'abc'")):
        with open(files[0], "rb") as fh:
            bad = client.post(f"/api/predict?{query}", data={"image": (fh, "a.jpg")})
        assert bad.status_code == 400 and bad.get_json() == {"error": message}


def test_command_line_sets_evaluation_and_card(trained, dataset, tmp_path):
    path = os.path.join(trained[1], "model.keras")
    files = _photos(dataset)[:3]
    run = lambda *extra: subprocess.run([sys.executable, "-m", "transferkit", *extra], capture_output=True,
                                        text=True, timeout=300)
    proc = run("predict", path, *files, "--runtime", "keras", "--quiet", "--coverage", "0.9", "--max-error", "0.3",
               "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert all("set" in r and "abstain" in r for r in json.loads(proc.stdout))
    table = run("predict", path, files[0], "--runtime", "keras", "--quiet", "--coverage", "0.9")
    assert "\tset {" in table.stdout
    bad = run("predict", path, files[0], "--coverage", "0")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "--coverage must be > 0.0" in bad.stderr
    proc = run("evaluate", path, dataset[1], "--runtime", "keras", "--json", "--max-error", "0.25", "--no-explain",
               "--out", str(tmp_path / "eval"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)["conformal"]
    assert [c["asked"] for c in found["coverage"]] == [0.8, 0.9, 0.95]
    assert all(0 <= c["empirical"] <= 1 and c["mean_set_size"] >= 0 for c in found["coverage"])
    assert set(found["coverage"][0]["per_class"]) == set(CLASSES)
    assert 0.25 in [s["max_error"] for s in found["selective"]]
    report = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    assert "Guarantees (conformal" in report and "conformal-coverage" in report
    card = transferkit.model_card(path)
    assert "## Guarantees" in card and "exchangeable" in card and "on average over photos" in card


def test_sets_on_the_cached_engine_import_neither_tensorflow_nor_scipy(trained, dataset):
    model_path = os.path.join(trained[1], "model.keras")
    photo = _photos(dataset)[0]
    expected = transferkit.predict(model_path, [photo], runtime="keras", coverage=0.9, max_error=0.3)
    transferkit.predict(model_path, [photo])  # a first use leaves the converted engine in the cache
    rows, modules, _ = predict_in_child(model_path, photo, "--coverage", "0.9", "--max-error", "0.3")
    assert modules == {"tensorflow": False, "keras": False, "scipy": False}
    row = rows[0]
    assert row["set"] == expected[0]["set"] and row["abstain"] == expected[0]["abstain"]
