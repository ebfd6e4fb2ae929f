"""The review queue and drift on the held-out case: a model trained on two classes, a collected pool where a third
class it never saw makes 30 % of the photos; and train --add with the reviewed labels."""

import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy.stats import hypergeom

import references as ref
from conftest import CLASSES, IMAGE_SIZE, write_dataset

KNOWN, ABSENT = CLASSES[:2], CLASSES[2]


@pytest.fixture(scope="module")
def two_class_model(tmp_path_factory):
    import transferkit

    root = tmp_path_factory.mktemp("two")
    train = write_dataset(root / "train", 20, seed=11, classes=KNOWN)
    out = root / "run"
    result = transferkit.train(train, image_size=IMAGE_SIZE, epochs=10, head="logistic", out=str(out))
    return train, result["model_path"]


def _pool(root) -> list[str]:
    """120 photos: 42 of each known class and 36 (30 %) of the class absent from training."""
    write_dataset(root, 42, seed=12)
    absent = sorted(os.listdir(os.path.join(root, ABSENT)))
    for name in absent[36:]:
        os.remove(os.path.join(root, ABSENT, name))
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def _collect(db, model_path, paths, datas=None):
    """What serve --collect stores for these uploads (the collector in this process, the model's answers)."""
    from transferkit.api import load_predictor
    from transferkit.apps.collect import Collector
    from transferkit.engines.predict import predict_rows

    model = load_predictor(model_path)
    summary = {"class_names": model.class_names, "reference": model.metadata.get("reference")}
    collector = Collector(db, "model-hash", model=(model_path, summary))
    rows = predict_rows(model, paths)
    for row in rows:
        row["filename"] = os.path.basename(row.pop("path"))
    collector.submit(rows, datas or [open(p, "rb").read() for p in paths], 0.01)
    assert collector.flush(60)
    collector.close()
    return rows


def _class_of_stored(store_rows) -> dict:
    return {r["uid"]: r["filename"] for r in store_rows}


def test_queue_top_50_holds_more_of_the_absent_class_than_a_random_50(two_class_model, tmp_path):
    from transferkit.data.collected import Store
    from transferkit.reports.review import review

    _, model_path = two_class_model
    pool = _pool(tmp_path / "pool")
    truth = {}
    for p in pool:  # the stored file is named by content: map it back to the class folder
        import hashlib

        truth[hashlib.sha256(open(p, "rb").read()).hexdigest()] = os.path.basename(os.path.dirname(p))
    db = str(tmp_path / "seen.db")
    _collect(db, model_path, pool)
    done = review(db, model=model_path, n=50, out_dir=str(tmp_path / "review"))
    queue = done["queue"]
    assert len(queue) == 50 and done["candidates"] == 120
    in_queue = sum(truth[r["image"]] == ABSENT for r in queue)
    # a random 50 of the 120 holds Hypergeometric(120, 36, 50) photos of the absent class: 15 on average; the
    # queue must hold more than a random 50 does with probability 1e-3 (the chance of a false pass)
    random_50 = hypergeom(120, 36, 50)
    bound = int(random_50.isf(1e-3))
    print(f"\nabsent class in the queue's top 50: {in_queue}; in a random 50: {random_50.mean():.1f} on average, "
          f"more than {bound} with probability {random_50.sf(bound):.1e}")
    assert in_queue > bound
    assert os.path.isfile(done["written"]["html"]) and os.path.isfile(done["written"]["queue"])

    # 30 near-copies of one photo of the absent class (re-encoded at other qualities, a little brighter or
    # darker): one place in the queue, not 30
    photo = np.asarray(Image.open(queue[0]["path"]).convert("RGB"), dtype=np.int16)  # the queue's first
    copies = []
    for i in range(30):
        buf = io.BytesIO()
        Image.fromarray(np.clip(photo + (i % 5 - 2), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=75 + i % 20)
        copies.append(buf.getvalue())
    paths = []
    for i, data in enumerate(copies):
        path = tmp_path / f"copy_{i}.jpg"
        path.write_bytes(data)
        paths.append(str(path))
    _collect(db, model_path, paths, copies)
    copy_keys = {__import__("hashlib").sha256(d).hexdigest() for d in copies}
    done = review(db, model=model_path, n=50, out_dir=str(tmp_path / "review2"))
    in_queue = sum(r["image"] in copy_keys for r in done["queue"])
    from transferkit.reports.review import store_candidates, uncertainty

    candidates = store_candidates(db)
    scores = uncertainty(candidates, 2)["score"]
    top_by_score = [candidates[i]["image"] for i in np.argsort(-scores)[:50]]
    print(f"near-copies in the queue: {in_queue} of 30; in the top 50 by uncertainty alone: "
          f"{sum(k in copy_keys for k in top_by_score)}")
    assert in_queue <= 3 < sum(k in copy_keys for k in top_by_score)
    Store(db, create=False).close()


def test_corrections_become_a_label_file_that_train_add_reads(two_class_model, tmp_path):
    import transferkit
    from transferkit.data.collected import Store
    from transferkit.models.modelfile import read_metadata
    from transferkit.reports.review import review

    train, model_path = two_class_model
    extra = write_dataset(tmp_path / "extra", 3, seed=13, classes=KNOWN)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(extra) for f in fs)
    db = str(tmp_path / "seen.db")
    rows = _collect(db, model_path, paths)
    store = Store(db)
    stored, _ = store.read()
    truth = [os.path.basename(os.path.dirname(p)) for p in paths]
    for row, label in zip(stored[:2], truth[:2]):
        assert store.add_feedback(row["uid"], "wrong", label)
    store.close()
    first = review(db, model=model_path, n=6, out_dir=str(tmp_path / "r"))
    queue_csv = first["written"]["queue"]
    edited = list(csv.DictReader(open(queue_csv, encoding="utf-8")))
    for r in edited:  # the reviewer accepts two more with their true class
        i = next(j for j, s in enumerate(stored) if s["image"] == r["image"])
        if i in (3, 4):
            r["accept"], r["label"] = "yes", truth[i]
    with open(queue_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(edited[0]))
        writer.writeheader()
        writer.writerows(edited)
    labels = str(tmp_path / "out" / "labels.csv")
    review(db, model=model_path, n=6, out_dir=str(tmp_path / "r"), labels=labels, accept=queue_csv)
    written = list(csv.DictReader(open(labels, encoding="utf-8")))
    assert len(written) == 4 and all(not os.path.isabs(r["path"]) for r in written)
    before = read_metadata(model_path)["data"]
    result = transferkit.train(train, add=[labels], image_size=IMAGE_SIZE, epochs=10, head="logistic",
                               out=str(tmp_path / "run2"))
    after = read_metadata(result["model_path"])["data"]
    assert after["n_train"] == before["n_train"] + 4 and after["n_val"] == before["n_val"]  # training side only
    assert rows


def test_monitor_says_moved_for_the_absent_class_and_not_for_the_known_ones(two_class_model, tmp_path):
    from transferkit.reports.drift import monitor

    _, model_path = two_class_model
    pool = _pool(tmp_path / "pool")
    known = [p for p in pool if os.path.basename(os.path.dirname(p)) in KNOWN]
    calm_db, moved_db = str(tmp_path / "calm.db"), str(tmp_path / "moved.db")
    _collect(calm_db, model_path, known)
    _collect(moved_db, model_path, pool)
    calm = monitor(calm_db, out=str(tmp_path / "m1"))
    moved = monitor(moved_db, out=str(tmp_path / "m2"))
    print("\n" + calm["line"] + "\n" + moved["line"])
    _figures_are_those_of_the_stored_rows(calm_db, model_path, calm)
    _figures_are_those_of_the_stored_rows(moved_db, model_path, moved)
    assert calm["moved"] == [] and calm["line"].startswith("inputs have not moved")
    assert "unknown_rate" in moved["moved"] and moved["line"].startswith("inputs have moved")
    assert "<img src=\"data:image/png;base64," in open(moved["html"], encoding="utf-8").read()
    shutil.rmtree(tmp_path / "pool")


def _figures_are_those_of_the_stored_rows(db, model_path, found):
    """monitor's KS, p-values and PSI against a recomputation from the store's rows and the model's reference
    (tests/references.py: scipy's ks_2samp, binomial tail and chi-square, PSI by hand)."""
    from transferkit.data.collected import Store
    from transferkit.models.modelfile import read_metadata

    store = Store(db, create=False)
    rows, _ = store.read()
    store.close()
    meta = read_metadata(model_path)
    expected = ref.drift(rows, meta["reference"], meta["training"]["keep_known"])
    assert set(found["checks"]) == set(expected) and found["window"] == len(rows)
    for name, figures in expected.items():
        for figure, value in figures.items():
            assert found["checks"][name][figure] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, figure)


def test_cli_review_of_an_unlabelled_folder_and_monitor(two_class_model, tmp_path, capsys):
    from transferkit.apps import cli

    _, model_path = two_class_model
    folder = write_dataset(tmp_path / "unlabelled", 4, seed=14)  # 12 photos, a third of a class it never saw
    assert cli.main(["review", folder, "--model", model_path, "-n", "5", "--dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("review queue: 5 of 12 photo(s)") and os.path.isfile(tmp_path / "r" / "review.html")
    assert cli.main(["review", folder, "--dir", str(tmp_path / "r")]) == 2  # a folder needs --model
    assert "--model" in capsys.readouterr().err
    db = str(tmp_path / "seen.db")
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    _collect(db, model_path, paths)
    assert cli.main(["monitor", db, "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    found = json.loads((tmp_path / "m" / "drift.json").read_text(encoding="utf-8"))
    # 4 of the 12 are of the class it never saw: measured 5 of 12 over the novelty threshold, p 1.8e-4 against
    # the reference's 5 %; the printed verdict is the one drift.json holds, and its figures are the rows'
    assert out.startswith("inputs have moved: ") and out.splitlines()[0] == found["line"]
    assert "unknown_rate" in found["moved"] and "unknown_rate (window" in found["line"]
    _figures_are_those_of_the_stored_rows(db, model_path, found)
    assert cli.main(["monitor", str(tmp_path / "nothing.db"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("transferkit: error:") and "no such store" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "nothing.db")
