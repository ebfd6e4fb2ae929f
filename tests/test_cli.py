import csv
import io
import json
import os

import pytest

from children import run_cli
from conftest import CLASSES, IMAGE_SIZE


def test_train_evaluate_predict_end_to_end(dataset, tmp_path):
    out = tmp_path / "run"
    run_cli("train", dataset[0], "--image-size", IMAGE_SIZE, "--epochs", 8, "--augment-views", 1, "--out", out, "--quiet")
    model = out / "model.keras"
    assert model.exists()

    ev = run_cli("evaluate", model, dataset[1], "--json", "--out", tmp_path / "eval")
    report = json.loads(ev.stdout)  # ONE JSON object on stdout
    assert set(report) >= {"accuracy", "class_names", "per_class", "confusion_matrix", "n_images", "skipped"}
    assert report["class_names"] == sorted(CLASSES)
    assert report["n_images"] == 18 and report["accuracy"] >= 0.9
    assert set(report["per_class"]["pêche pourrie"]) == {"precision", "recall", "f1", "support"}
    assert (tmp_path / "eval" / "confusion_matrix.png").exists()

    pred = run_cli("predict", model, os.path.join(dataset[1], "pêche pourrie"), "--format", "json", "--top-k", 2)
    rows = json.loads(pred.stdout)
    assert len(rows) == 6
    for row in rows:
        assert set(row) == {"path", "label", "probability", "top_k", "novelty", "unknown"}
        assert len(row["top_k"]) == 2 and (row["unknown"] or row["top_k"][0]["label"] == row["label"])
        assert row["unknown"] == (row["novelty"] > 1) and (row["label"] is None) == row["unknown"]
        assert row["unknown"] or 0 <= row["probability"] <= 1
    assert sum(r["label"] == "pêche pourrie" for r in rows) >= 5

    table = run_cli("evaluate", model, dataset[1]).stdout
    assert "precision" in table and "pêche pourrie" in table and "accuracy" in table

    csv_out = run_cli("predict", model, os.path.join(dataset[1], "grenade", "*.jpg"), "--format", "csv").stdout
    parsed = list(csv.DictReader(io.StringIO(csv_out)))
    assert len(parsed) == 6
    assert sorted(os.path.basename(r["path"]) for r in parsed) == [f"photo_{i:03d}.jpg" for i in range(6)]
    assert all(r["label"] == r["top1_label"] and r["probability"] == r["top1_probability"] for r in parsed)
    # every grenade photo labelled grenade (measured 6 of 6, each at p >= 0.9999): a model answering at random
    # passes this with P = (1/3)^6 = 1.4e-3, and this and the >= 5 of 6 above together with 2.4e-5
    assert [r["label"] for r in parsed] == ["grenade"] * 6


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = run_cli("train", tmp_path / "nowhere", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"transferkit: error: {tmp_path / 'nowhere'}: not a folder"
    proc = run_cli("predict", tmp_path / "missing.keras", tmp_path, check=False)
    assert proc.returncode == 2 and "model file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_run_cli_fails_a_refused_command_unless_told_not_to(tmp_path):
    """children.run_cli, the one CLI runner of the tests: a non-zero exit fails the test (check=True), and with
    check=False the refused command's output is returned to be examined."""
    with pytest.raises(AssertionError, match="model file not found"):  # card: refused in 0.2 s, no TensorFlow
        run_cli("card", tmp_path / "nowhere.keras")
    assert run_cli("card", tmp_path / "nowhere.keras", check=False).returncode == 2


def test_backbones_lists_the_registry():
    out = run_cli("backbones").stdout
    for name in ("efficientnet_lite0", "resnet50v2", "efficientnet_b3", "mobilenet_v3_small", "convnext_tiny"):
        assert name in out
