import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

import transferkit
from transferkit.data.health import inspect_dataset
from transferkit.reports.plots import show_predictions

from children import run_cli
from browser import chromium, save_screenshot
from conftest import CLASSES, write_dataset


@pytest.fixture()
def messy(tmp_path):
    train = pathlib.Path(write_dataset(tmp_path / "train", 5, seed=11, classes=["pomme", "pêche"]))
    test = pathlib.Path(write_dataset(tmp_path / "test", 3, seed=12, classes=["pomme", "pêche"]))
    shutil.copy(train / "pomme" / "photo_000.jpg", train / "pomme" / "copy_same_class.jpg")
    shutil.copy(train / "pomme" / "photo_001.jpg", train / "pêche" / "copy_other_class.jpg")
    with Image.open(train / "pêche" / "photo_002.jpg") as img:  # resized, re-encoded copy in the test set
        img.resize((img.width * 2, img.height * 2)).save(test / "pêche" / "leaked_resized.jpg", quality=70)
    (train / "pomme" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return str(train), str(test)


def test_inspect_finds_counts_unreadable_and_every_kind_of_duplicate(messy):
    report = inspect_dataset(*messy, progress=False)
    assert report["class_names"] == ["pomme", "pêche"]
    assert report["counts"]["train"] == {"pomme": 6, "pêche": 6}
    assert report["counts"]["test"] == {"pomme": 3, "pêche": 4}
    assert report["imbalance_ratio"] == 1.0
    assert report["formats"] == {"JPEG": 19} and report["modes"] == {"RGB": 19}
    assert [os.path.basename(u["path"]) for u in report["unreadable"]] == ["broken.jpg"]
    assert report["exact_duplicates"]["counts"] == {"same class": 1, "across classes": 1}
    leaks = [p for p in report["near_duplicates"]["pairs"] if p["kind"] == "train-test leak"]
    assert any({os.path.basename(p["a"]["path"]), os.path.basename(p["b"]["path"])} == {"photo_002.jpg", "leaked_resized.jpg"}
               for p in leaks)


def test_inspect_cli_prints_one_json_object_and_draws_samples(messy, tmp_path):
    out = tmp_path / "inspect"
    proc = run_cli("inspect", messy[0], "--test-dir", messy[1], "--out", out, "--json", timeout=300)
    report = json.loads(proc.stdout)
    assert report["n_images"] == 19
    with Image.open(out / "samples.png") as img:
        assert img.size[0] > 300 and img.size[1] > 300
    human = run_cli("inspect", messy[0], "--test-dir", messy[1], "--out", out, timeout=300)
    assert "train-test" in human.stdout and "pêche" in human.stdout and "broken.jpg" in human.stdout


@pytest.fixture()
def mislabeled_report(trained, dataset, tmp_path):
    """An evaluation where two 'grenade' photos are filed under 'fraise fraîche': the gallery has errors."""
    result, out = trained
    test = pathlib.Path(tmp_path / "test")
    shutil.copytree(dataset[1], test)
    for name in ("photo_000.jpg", "photo_001.jpg"):
        shutil.move(test / "grenade" / name, test / "fraise fraîche" / f"wrong_{name}")
    metrics = transferkit.evaluate(os.path.join(out, "model.keras"), str(test), out=str(tmp_path / "eval"))
    return metrics, str(tmp_path / "eval" / "report.html")


def test_report_numbers_agree_and_page_renders_in_chromium(trained, mislabeled_report):
    result, out = trained
    metrics = json.load(open(os.path.join(out, "metrics.json"), encoding="utf-8"))["test"]
    cm = np.array(metrics["confusion_matrix"])
    assert cm.sum() == metrics["n_images"]
    assert np.trace(cm) / cm.sum() == pytest.approx(metrics["accuracy"])
    page = os.path.join(out, "report.html")
    text = open(page, encoding="utf-8").read()
    assert "http://" not in text and "https://" not in text  # self-contained: no network
    driver = chromium()
    try:
        driver.get(pathlib.Path(page).as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        assert len(images) >= 3  # two confusion matrices and the training curves at least
        assert all(done and width > 0 for done, width, _ in images), images
        rows = driver.execute_script("return Array.from(document.querySelectorAll('#per-class tbody tr'))"
                                     ".map(r => r.cells[0].textContent)")
        assert rows == sorted(CLASSES)  # one row per class, accents intact
        shown = float(driver.find_element("id", "accuracy").text)
        assert shown == pytest.approx(metrics["accuracy"], abs=1e-4)
        save_screenshot(driver, "report.png")

        metrics, page = mislabeled_report
        assert len(metrics["most_confident_errors"]) >= 2
        driver.get(pathlib.Path(page).as_uri())
        gallery = driver.execute_script(
            "return Array.from(document.querySelectorAll('#wrong img')).map(i => [i.complete, i.naturalWidth])")
        assert len(gallery) == 2 * len(metrics["most_confident_errors"])  # each photo and its heat map
        assert all(done and width > 0 for done, width in gallery)
        heat = driver.execute_script("return document.querySelectorAll('#least-sure img.heatmap').length")
        assert heat == len(metrics["least_confident_correct"]) > 0
        pairs = driver.execute_script("return Array.from(document.querySelectorAll('#confused tbody tr'))"
                                      ".map(r => [r.cells[0].textContent, r.cells[1].textContent, r.cells[2].textContent])")
        assert pairs[0] == ["fraise fraîche", "grenade", "2"]
        save_screenshot(driver, "report_with_errors.png")
    finally:
        driver.quit()


def test_evaluate_out_writes_report_with_training_curves(trained, dataset, tmp_path):
    result, out = trained
    metrics = transferkit.evaluate(os.path.join(out, "model.keras"), dataset[1], out=str(tmp_path / "eval"))
    for name in ("report.html", "confusion_matrix.png", "confusion_matrix_normalised.png", "metrics.json"):
        assert (tmp_path / "eval" / name).exists(), name
    page = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    assert "Training curves" in page and f"{metrics['accuracy']:.4f}" in page


def test_prediction_figure(trained, dataset, tmp_path):
    result, out = trained
    image = os.path.join(dataset[1], CLASSES[1], "photo_000.jpg")
    rows = transferkit.predict(os.path.join(out, "model.keras"), [image], top_k=3)
    [written] = show_predictions(rows, str(tmp_path / "pred.png"))
    with Image.open(written) as img:
        assert img.format == "PNG" and img.size[0] > 400
