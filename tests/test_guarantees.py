"""The guarantees of issue 38 (models.conformal): the Learn-then-Test abstention cut-off and its floor, conformal
risk control, Mondrian per-class sets, abstaining rows; each figure against an independent computation (SciPy,
a few lines of NumPy). The trained run's predictors, command line, server and page: the end of the file."""

import csv
import io
import json
import math
import os
import types

import numpy as np
import pytest

import transferkit
from transferkit.models import conformal as cp

from children import run_cli
from conftest import CLASSES


def _fixed_sequence(confidence, correct, eps, delta=0.1):
    """An independent Learn-then-Test: the 20 cut-offs answering ceil(n k / 20) photos (ties: all of them), from
    the most confident, tested with SciPy's binomial on the photos above the cut-off's own, skipping those too
    small for (1 - eps)^m <= delta, stopping at the first failure."""
    from scipy.stats import binom

    confidence, correct = np.asarray(confidence), np.asarray(correct)
    n, best, seen = len(confidence), math.inf, -1
    for k in range(1, 21):
        i = math.ceil(n * k / 20) - 1
        while i + 1 < n and confidence[i + 1] == confidence[i]:
            i += 1
        if i <= seen:
            continue
        seen = i
        if (1 - eps) ** i > delta:  # no binomial test on i photos can pass
            continue
        if binom.cdf(int((1 - correct[:i]).sum()), i, eps) > delta:
            break
        best = float(confidence[i])
    return best


def test_the_cut_off_is_fixed_sequence_testing_at_the_full_delta():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(50, 600))
        confidence = np.sort(rng.uniform(0.3, 1.0, n))[::-1].round(3)  # rounded: ties
        correct = (rng.random(n) > 0.3 * (1 - confidence) ** 2 * rng.uniform(0, 3)).astype(int)
        for eps in (0.02, 0.05, 0.1):
            expected = _fixed_sequence(confidence, correct, eps)
            assert cp.answer_threshold({"confidence": list(confidence), "correct": list(correct)}, eps) == expected
    # the case: 200 photos, the most confident 100 all right, then one error in 20: 0.05 is certified on
    # more than half of them, where the Bonferroni grid (each cut-off at delta / 20 = 0.005) certified nothing:
    # the top 100 right give P = 0.95^100 = 0.0059 > 0.005
    confidence, correct = np.linspace(1, 0.3, 200), np.array([1] * 100 + ([0] + [1] * 19) * 5)
    cut = cp.answer_threshold({"confidence": list(confidence), "correct": list(correct)}, 0.05)
    assert cut == _fixed_sequence(confidence, correct, 0.05) and cut <= confidence[99]
    assert 0.95 ** 100 > 0.1 / 20


def test_the_floor_is_the_smallest_bound_n_photos_certify():
    from scipy.stats import binom

    for n in (40, 200, 1000):
        floor = cp.smallest_certifiable(n)
        assert binom.cdf(0, n - 1, floor) == pytest.approx(0.1)  # all n - 1 tested photos right: P = delta
        perfect = {"confidence": list(np.linspace(1, 0.5, n)), "correct": [1] * n}
        assert cp.answer_threshold(perfect, floor * 1.01) == 0.5  # just above: everything answered
        assert cp.answer_threshold(perfect, floor * 0.99) == math.inf  # just under: nothing
        assert f"{floor:.4f}" in cp.uncertified_note(perfect, floor * 0.99)
    assert cp.smallest_certifiable(200) == pytest.approx(1 - 0.1 ** (1 / 199))


def test_risk_control_keeps_the_expected_share_answered_wrongly_under_the_bound():
    """Independent: the largest cut-off i with (errors among the top i + 1 + 1) / (n + 1) <= eps; and over 2,000
    random calibration / test draws of a model whose error grows as its confidence falls, the mean share of new
    photos answered wrongly stays under eps (the promise is in expectation) and is near it (it spends eps)."""
    rng = np.random.default_rng(1)
    confidence = np.sort(rng.uniform(0, 1, 300))[::-1]
    correct = (rng.random(300) > 0.4 * (1 - confidence)).astype(int)
    for eps in (0.01, 0.05, 0.2):
        wrong = np.cumsum(1 - correct)
        ok = [i for i in range(300) if (wrong[i] + 1) / 301 <= eps]
        expected = confidence[max(ok)] if ok else math.inf
        assert cp.expected_threshold({"confidence": list(confidence), "correct": list(correct)}, eps) == expected
    assert cp.expected_threshold({"confidence": [0.9] * 10, "correct": [1] * 10}, 0.05) == math.inf  # 11 < 20
    nineteen = {"confidence": list(np.linspace(1, 0.5, 19)), "correct": [1] * 19}  # (0 + 1) / (19 + 1) = 0.05
    assert cp.expected_threshold(nineteen, 0.05) == 0.5 and cp.expected_threshold(nineteen, 0.049) == math.inf
    losses = []
    for _ in range(2000):
        c = rng.uniform(0, 1, 201)
        right = rng.random(201) > 0.4 * (1 - c)
        order = np.argsort(-c[:200])
        cut = cp.expected_threshold({"confidence": list(c[:200][order]), "correct": list(right[:200][order])}, 0.05)
        losses.append(c[200] >= cut and not right[200])
    assert 0.035 <= np.mean(losses) <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 2000)


def test_each_class_gets_its_own_quantile_and_too_small_classes_every_label():
    # class_needed: the ceil((n + 1) level)-th of n scores exists from n = level / (1 - level) on
    for level in (0.5, 0.8, 0.9, 0.95, 0.99):
        need = cp.class_needed(level)
        assert math.ceil((need + 1) * level - 1e-9) <= need and math.ceil(need * level - 1e-9) > need - 1
    assert (cp.class_needed(0.9), cp.class_needed(0.95)) == (9, 19)
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1, 2], [60, 30, 5])
    probs = rng.dirichlet(np.ones(3) * 0.7, len(labels))
    probs[labels == 0] = 0.5 * probs[labels == 0] + 0.5 * np.eye(3)[0]  # class a easier: a smaller quantile
    record = cp.fit_conformal(probs, labels, {})
    assert [c["n"] for c in record["per_class"]] == [60, 30, 5]
    true = cp.label_scores(probs, labels, cp.PENALTY, cp.K_REG)
    quantiles = cp.class_quantiles(record, 0.9)
    exact = [np.sort(true[labels == c])[math.ceil((n + 1) * 0.9) - 1] for c, n in ((0, 60), (1, 30))] + [math.inf]
    for c in (0, 1):  # independent: the ceil((n + 1) 0.9)-th smallest of the class's own scores
        assert exact[c] <= quantiles[c] < exact[c] + 2e-6
    assert math.isinf(quantiles[2]) and exact[0] != exact[1]  # 5 photos < 9
    new = rng.dirichlet(np.ones(3) * 0.7, 50)
    scores = cp.all_scores(new, cp.PENALTY, cp.K_REG)
    sets = cp.class_sets(new, record, 0.9)
    for row, members in zip(scores, sets):
        assert set(members) == {j for j in range(3) if row[j] <= exact[j] + 2e-6} and 2 in members
    assert any(len(s) < 3 for s in sets)


def test_an_abstaining_row_names_no_label_and_options_say_what_they_need(caplog):
    from transferkit.engines.predict import decide
    from transferkit.errors import TransferkitError

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    probs = np.where(np.eye(2)[labels] > 0, 0.9, 0.1)
    probs[:20] = probs[:20, ::-1]  # 20 wrong answers at the same confidence: nothing certified at 0.02
    record = cp.fit_conformal(probs, labels, {})
    model = types.SimpleNamespace(metadata={"class_names": ["a", "b"], "conformal": record}, class_names=["a", "b"],
                                  path="m.keras")
    with caplog.at_level("WARNING", logger="transferkit"):
        rows = decide(model, ["x.jpg", "y.jpg"], np.array([[0.9, 0.1], [0.3, 0.7]]), 2, max_error=0.02)
    assert all(r["abstain"] and r["label"] is None and r["probability"] is None for r in rows)
    assert [t["label"] for t in rows[0]["top_k"]] == ["a", "b"]  # the top-k stays
    assert "max error 0.02: no cut-off certified with 200 calibration photos" in caplog.text
    assert f"{cp.smallest_certifiable(200):.4f}" in caplog.text
    answered = decide(model, ["x.jpg"], np.array([[0.9, 0.1]]), 2, expected_error=0.2)
    assert answered[0]["abstain"] is False and answered[0]["label"] == "a"
    with pytest.raises(TransferkitError, match="max_error and expected_error: choose one"):
        decide(model, ["x.jpg"], np.array([[0.9, 0.1]]), 2, max_error=0.1, expected_error=0.1)
    before = {k: v for k, v in record.items() if k != "per_class"}  # a file from before Mondrian sets
    old = types.SimpleNamespace(metadata={"class_names": ["a", "b"], "conformal": before}, class_names=["a", "b"],
                                path="old.keras")
    with pytest.raises(TransferkitError, match="old.keras: no per-class calibration.*class_coverage needs"):
        decide(old, ["x.jpg"], np.array([[0.9, 0.1]]), 2, class_coverage=0.9)
    with pytest.raises(TransferkitError, match="class_coverage must be"):
        transferkit.predict(old, ["x.jpg"], class_coverage=1.0)


# ----- the shared trained run (3 classes of photo crops) -----
def _photos(dataset):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(dataset[1]) for f in fs)


def test_class_sets_are_the_same_on_every_predictor_and_evaluate_shows_both(trained, dataset, tmp_path):
    pytest.importorskip("onnxruntime")
    from children import predict_in_child

    from transferkit.apps.serve import create_app
    from transferkit.export import export_model
    from transferkit.models.modelfile import read_metadata
    from transferkit.options import ServeOptions

    path = os.path.join(trained[1], "model.keras")
    stored = read_metadata(path)["conformal"]
    assert [c["n"] for c in stored["per_class"]] and sum(c["n"] for c in stored["per_class"]) == stored["n"]
    files = _photos(dataset)
    rows = transferkit.predict(path, files, runtime="keras", class_coverage=0.9)
    truth = [os.path.basename(os.path.dirname(f)) for f in files]
    assert np.mean([t in r["set"] for t, r in zip(truth, rows)]) >= 0.8
    export_model(path, "onnx", str(tmp_path / "m.onnx"))
    onnx_rows = transferkit.predict(str(tmp_path / "m.onnx"), files, class_coverage=0.9)
    assert [r["set"] for r in onnx_rows] == [r["set"] for r in rows]
    transferkit.predict(path, [files[0]], runtime="openvino")  # leaves the converted engine in the cache
    cached, modules, _ = predict_in_child(path, files[0], "--class-coverage", "0.9", "--expected-error", "0.2",
                                          "--runtime", "openvino")  # named: "auto" may time Keras faster
    assert modules["tensorflow"] is False, modules
    assert cached[0]["set"] == rows[0]["set"]
    client = create_app(path, ServeOptions(runtime="keras")).test_client()
    with open(files[0], "rb") as fh:
        reply = client.post("/api/predict?class_coverage=0.9&expected_error=0.2",
                            data={"image": (fh, "a.jpg")}).get_json()
    assert reply["predictions"][0]["set"] == rows[0]["set"]
    assert reply["predictions"][0]["abstain"] == cached[0]["abstain"]
    proc = run_cli("evaluate", path, dataset[1], "--runtime", "keras", "--json", "--no-explain", "--out",
                   str(tmp_path / "eval"), "--quiet")
    found = json.loads(proc.stdout)["conformal"]
    for marginal, mondrian in zip(found["coverage"], found["class_coverage"]):
        assert set(marginal["per_class"]) == set(mondrian["per_class"]) == set(CLASSES)
        assert set(mondrian["per_class_size"]) == set(CLASSES) and mondrian["asked"] == marginal["asked"]
    sets = transferkit.predict(path, files, runtime="keras", class_coverage=0.9)  # independent: the figure itself
    at_90 = found["class_coverage"][1]
    for name in CLASSES:
        mine = [t in r["set"] for t, r in zip(truth, sets) if t == name]
        assert at_90["per_class"][name] == pytest.approx(np.mean(mine), abs=1e-4)
    report = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    assert report.count('class="conformal-per-class"') == 3 and "--class-coverage" in report
    card = transferkit.model_card(path)
    floor = cp.smallest_certifiable(len(stored["risk"]["confidence"]))
    assert f"{floor:.4f}" in card and "--class-coverage 0.9" in card and "--expected-error" in card


def test_abstaining_rows_name_no_label_in_json_csv_and_the_table(trained, dataset):
    path = os.path.join(trained[1], "model.keras")
    files = _photos(dataset)[:3]
    from transferkit.models.modelfile import read_metadata

    n = len(read_metadata(path)["conformal"]["risk"]["confidence"])
    tiny = round(cp.smallest_certifiable(n) / 2, 4)  # under the floor: nothing certified, every photo abstains
    proc = run_cli("predict", path, *files, "--runtime", "keras", "--max-error", str(tiny), "--coverage", "0.9",
                   "--format", "json")
    rows = json.loads(proc.stdout)
    assert all(r["abstain"] is True and r["label"] is None and r["probability"] is None and len(r["top_k"]) == 3
               and r["set"] for r in rows)
    notes = [line for line in proc.stderr.splitlines() if "no cut-off certified" in line]
    assert len(notes) == 1 and f"{cp.smallest_certifiable(n):.4f}" in notes[0] and f"{n} calibration" in notes[0]
    table = list(csv.DictReader(io.StringIO(run_cli("predict", path, *files, "--runtime", "keras", "--max-error",
                                                    str(tiny), "--format", "csv").stdout)))
    assert all(r["label"] == "" and r["probability"] == "" and r["abstain"] == "true" and r["top1_label"]
               for r in table)
    text = run_cli("predict", path, files[0], "--runtime", "keras", "--max-error", str(tiny)).stdout
    fields = text.rstrip("\n").split("\t")  # path, the top-k as a hint, "not sure": no label field
    assert fields[1].startswith("(top: ") and fields[-1] == "not sure" and len(fields) == 3, fields


def test_the_page_says_not_sure_and_shows_the_set(trained, dataset, tmp_path):
    import time

    from browser import chromium
    from children import start_server, stop_server
    from selenium.webdriver.support.ui import Select

    path = os.path.join(trained[1], "model.keras")
    photo = _photos(dataset)[0]
    proc, url, log = start_server([path, "--runtime", "keras"], tmp_path / "serve.log")
    try:
        import requests

        with open(photo, "rb") as fh:  # what the server answers at 0.02: about 50 calibration photos certify none
            expected = requests.post(url + "/api/predict?max_error=0.02&coverage=0.9",
                                     files={"image": ("p.jpg", fh, "image/jpeg")}).json()
        assert expected["predictions"][0]["abstain"] is True and "no cut-off certified" in expected["note"]
        driver = chromium()
        try:
            driver.get(url + "/")
            deadline = time.time() + 60
            while driver.find_element("id", "abstention").get_attribute("hidden") is not None:
                assert time.time() < deadline
                time.sleep(0.2)
            Select(driver.find_element("id", "coverage")).select_by_visible_text("0.90")
            Select(driver.find_element("id", "max-error")).select_by_visible_text("0.02")
            driver.find_element("id", "file").send_keys(os.path.abspath(photo))
            while driver.execute_script("return document.body.dataset.state") != "done":
                assert time.time() < deadline, driver.find_element("id", "error").text
                time.sleep(0.2)
            assert driver.find_element("id", "label").text == "not sure"
            assert driver.find_element("id", "probability").text == expected["note"]
            shown = driver.find_element("id", "set").text
            assert shown == "set at 90 %: " + ", ".join(expected["predictions"][0]["set"])
            assert len(driver.find_elements("css selector", "#bars .bar")) == len(CLASSES)
        finally:
            driver.quit()
    finally:
        stop_server(proc, log)


def test_a_class_too_small_for_the_level_is_named_with_the_photos_it_needs(caplog):
    from transferkit.engines.predict import decide

    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2], [40, 40, 8])  # c: 8 calibration photos, 9 needed at 0.90, 19 at 0.95
    probs = rng.dirichlet(np.ones(3), len(labels))
    model = types.SimpleNamespace(metadata={"class_names": ["a", "b", "c"],
                                            "conformal": cp.fit_conformal(probs, labels, {})},
                                  class_names=["a", "b", "c"], path="m.keras")
    with caplog.at_level("WARNING", logger="transferkit"):
        rows = decide(model, ["x.jpg"], np.array([[0.98, 0.01, 0.01]]), 3, class_coverage=0.95)
    assert "class coverage 0.95: class c has 8 calibration photos, needs 19" in caplog.text
    assert "class b" not in caplog.text and "c" in rows[0]["set"]
