"""Trust: calibrated probabilities and "none of these", on real photos. The shared trained run knows three grey
photographs (camera, coins, page); unknowns are other photographs: far ones (colour photos of other subjects,
scikit-learn's sample photos) and near ones (other grey photographs: moon, text, clock, cell)."""

import csv
import io
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

import transferkit
from transferkit.models.novelty import split_outputs

import references as ref
from children import run_cli
from conftest import IMAGE_SIZE, write_dataset
from photos import write_crops

FAR = ["chelsea", "coffee", "rocket", "astronaut", "immunohistochemistry"]
NEAR = ["moon", "text", "clock", "cell"]


@pytest.fixture(scope="module")
def unknowns(tmp_path_factory):
    root = tmp_path_factory.mktemp("unknown")
    far = write_crops(root / "far", FAR, 6, seed=21)
    from sklearn.datasets import load_sample_images

    for i, photo in enumerate(load_sample_images().images):  # china, flower
        for j in range(3):
            path = str(root / "far" / f"sample_{i}_{j}.jpg")
            Image.fromarray(photo[j * 100 : j * 100 + 200, j * 150 : j * 150 + 250]).save(path)
            far.append(path)
    return far, write_crops(root / "near", NEAR, 6, seed=22)


def _known(dataset):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(dataset[1]) for f in fs)


def test_known_photos_are_kept_and_other_photos_are_unknown(trained, dataset, unknowns):
    model = transferkit.load_model(os.path.join(trained[1], "model.keras"), runtime="keras")
    trust = model.metadata["novelty"]
    assert trust["method"] == "mahalanobis" and trust["keep_known"] == 0.95 and trust["threshold"] > 0
    known = transferkit.predict(model, _known(dataset))
    far, near = (transferkit.predict(model, paths) for paths in unknowns)
    kept = np.mean([not r["unknown"] for r in known])
    print(f"known kept {kept:.3f}; far rejected {np.mean([r['unknown'] for r in far]):.3f}; "
          f"near rejected {np.mean([r['unknown'] for r in near]):.3f}")
    assert kept >= 0.85  # 18 test photos: the promised 95 %, within one or two photos
    assert np.mean([r["unknown"] for r in far]) >= 0.9
    for row in far + near:
        if row["unknown"]:
            assert row["label"] is None and row["probability"] is None and len(row["top_k"]) == 3
            assert row["novelty"] > 1


def test_the_novelty_score_beats_the_top_probability_on_held_out_photos(trained, dataset, unknowns):
    model = transferkit.load_model(os.path.join(trained[1], "model.keras"), runtime="keras")
    from transferkit.engines.predict import predict_files

    scores = {}
    for name, paths in (("known", _known(dataset)), ("near", unknowns[1]), ("far", unknowns[0])):
        outputs, kept, _ = predict_files(model, paths)
        scores[name] = split_outputs(outputs, 3)
    results = {}
    for kind in ("near", "far"):
        y = np.r_[np.zeros(len(scores["known"][1])), np.ones(len(scores[kind][1]))]
        novelty = roc_auc_score(y, np.r_[scores["known"][1], scores[kind][1]])
        top = roc_auc_score(y, -np.r_[scores["known"][0].max(1), scores[kind][0].max(1)])
        results[kind] = (novelty, top)
        print(f"{kind} unknowns: AUROC novelty {novelty:.3f} vs top probability {top:.3f}")
    assert results["far"][0] >= 0.95 and results["near"][0] >= 0.9
    # never worse than the top probability, and better where that baseline fails (the far photos: 1.0 vs 0.83);
    # on the near ones both can reach 1.0 (a sharper softmax head separates them by its top probability too)
    assert all(novelty >= top for novelty, top in results.values())
    assert any(novelty > top for novelty, top in results.values())


def _nll(logits, labels, t: float) -> float:
    z = np.asarray(logits, np.float64) / t
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def test_calibration_is_measured_and_stored(trained, dataset):
    from transferkit.data.folders import split_training_folder
    from transferkit.data.images import load_image
    from transferkit.models import modelfile
    from transferkit.models.novelty import feature_view, logit_model

    path = os.path.join(trained[1], "model.keras")
    model = transferkit.load_model(path, runtime="keras")
    trust, options = model.metadata["novelty"], model.metadata["training"]
    t = trust["temperature"]
    assert trust["ece_after"] <= trust["ece_before"] + 1e-9
    # the temperature the file states is the one its head applies, and it lowers the log loss of the validation
    # photos (their logits before it, from the model's own layers) below that of T = 1
    keras_model = modelfile.load(path).keras_model
    head = keras_model.get_layer("head")
    np.testing.assert_allclose(head.get_layer("temperature").get_weights()[0], np.eye(3) / t, rtol=1e-6)
    split = split_training_folder(dataset[0], options["val_split"], options["seed"])
    images = np.stack([load_image(p, IMAGE_SIZE) for p in split.val_paths]).astype(np.float32)
    logits = np.asarray(logit_model(head)(feature_view(keras_model)(images)))
    labels = np.asarray([model.class_names.index(split.class_names[y]) for y in split.y_val])
    print(f"\nT = {t}: validation log loss {_nll(logits, labels, t):.3g} (T = 1: {_nll(logits, labels, 1.0):.3g})")
    assert len(labels) == model.metadata["data"]["n_val"] and _nll(logits, labels, t) <= _nll(logits, labels, 1.0)
    metrics = transferkit.evaluate(model, dataset[1])
    rows = transferkit.predict(model, [dataset[1]], top_k=3, reject=False)
    probs = np.array([[next(x["probability"] for x in r["top_k"] if x["label"] == n) for n in model.class_names]
                      for r in rows])
    truth = np.array([model.class_names.index(os.path.basename(os.path.dirname(r["path"]))) for r in rows])
    # the test photos are easy (ECE 0.0): tests/test_statistics.py checks the same figure on uncertain answers
    assert metrics["calibration"]["ece"] == pytest.approx(ref.ece(probs, truth), abs=5e-5)
    assert metrics["novelty"]["known_kept"] == pytest.approx(np.mean([not r["unknown"] for r in rows]), abs=1e-12)
    assert metrics["novelty"]["known_kept"] >= 0.85
    probs = model.predict_proba(np.zeros((2, 40, 50, 3), np.uint8) + 128)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_keras_onnx_and_server_give_the_same_unknown_verdicts(trained, dataset, unknowns, tmp_path):
    from conftest import require

    require("onnxruntime")
    from transferkit.apps.serve import create_app
    from transferkit.export import export_model
    from transferkit.options import ServeOptions

    path = os.path.join(trained[1], "model.keras")
    export_model(path, "onnx", str(tmp_path / "m.onnx"))
    files = _known(dataset)[:6] + unknowns[0][:6] + unknowns[1][:6]
    keras_rows = transferkit.predict(path, files, runtime="keras")
    onnx_rows = transferkit.predict(str(tmp_path / "m.onnx"), files)
    assert [r["unknown"] for r in keras_rows] == [r["unknown"] for r in onnx_rows]
    np.testing.assert_allclose([r["novelty"] for r in keras_rows], [r["novelty"] for r in onnx_rows], rtol=1e-3)
    client = create_app(path, ServeOptions(runtime="keras")).test_client()
    for f, expected in zip(files, keras_rows):
        with open(f, "rb") as fh:
            reply = client.post("/api/predict", data={"image": (fh, os.path.basename(f))}).get_json()
        row = reply["predictions"][0]
        assert row["unknown"] == expected["unknown"] and row["label"] == expected["label"]


def test_command_line_says_unknown_and_no_reject_turns_it_off(trained, unknowns):
    path = os.path.join(trained[1], "model.keras")
    far = unknowns[0][:2]
    run = lambda *extra: run_cli("predict", path, *far, "--runtime", "keras", "--quiet", *extra, timeout=300)
    table = run()
    assert all("\tunknown\tnovelty " in line for line in table.stdout.splitlines())
    proc = run("--format", "csv")
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["label"] for r in rows] == ["unknown", "unknown"] and float(rows[0]["novelty"]) > 1
    proc = run("--format", "csv", "--no-reject")
    kept = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(kept) == 2 and all(r["label"] in ("fraise fraîche", "pêche pourrie", "grenade") for r in kept)


def test_five_photos_per_class_still_give_a_usable_threshold(tmp_path, unknowns):
    data = write_dataset(tmp_path / "tiny", 6, seed=31)  # 6 per class: 5 train + 1 validation
    clf = transferkit.ImageClassifier(image_size=IMAGE_SIZE, epochs=10, augment_views=1)
    clf.fit(data, out=str(tmp_path / "run"))
    assert np.isfinite(clf.novelty_["threshold"])
    far = clf.predict(unknowns[0])
    assert np.mean([r["unknown"] for r in far]) >= 0.8


def test_evaluate_with_unknowns_reports_rejection_and_pictures(trained, dataset, unknowns, tmp_path):
    folder = os.path.dirname(unknowns[0][0])
    out = tmp_path / "eval"
    proc = run_cli("evaluate", os.path.join(trained[1], "model.keras"), dataset[1], "--unknown-dir", folder,
                   "--out", out, "--runtime", "keras", "--quiet", timeout=300)
    assert "unknowns (" in proc.stdout and "AUROC" in proc.stdout
    import json

    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    u = metrics["unknown"]
    assert u["rejected"] >= 0.9 and u["auroc"] >= 0.95 and u["class_names"][-1] == "unknown"
    # the figures against a recomputation from the rows of the same model on the same photos
    model = transferkit.load_model(os.path.join(trained[1], "model.keras"), runtime="keras")
    known = transferkit.predict(model, _known(dataset), reject=False)
    far = transferkit.predict(model, sorted(os.path.join(folder, f) for f in os.listdir(folder)), reject=False)
    assert u["n_images"] == len(far) and metrics["n_images"] == len(known)
    from transferkit.engines.predict import predict_files

    scores = [split_outputs(predict_files(model, [r["path"] for r in rows])[0], 3)[1] for rows in (known, far)]
    assert u["auroc"] == pytest.approx(ref.auroc(*scores), abs=1e-9)  # (unrounded: rows round novelty to 1e-4)
    assert u["rejected"] == pytest.approx(np.mean([r["unknown"] for r in far]), abs=1e-12)
    assert u["known_kept"] == pytest.approx(np.mean([not r["unknown"] for r in known]), abs=1e-12)
    cm = np.asarray(u["confusion_matrix"])
    assert cm.shape == (4, 4) and cm[3].sum() == u["n_images"] and cm.sum() == u["n_images"] + metrics["n_images"]
    for picture in ("reliability.png", "novelty.png", "confusion_unknown.png"):
        assert (out / picture).stat().st_size > 5000
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "unknowns rejected" in report and "Reliability" in report
