"""The command-line review flow as its page and help describe it: queue.csv filled by hand (``label`` and/or
``accept=yes``, ``unknown``), read back by ``transferkit review DB --accept queue.csv --out labels.csv`` in a child
process, and ``train --add`` on the file it wrote. The store is filled with a real model's answers to real photos:
three crops of the trained classes and two photos of other domains (a cat, a rocket), as a served model meets them.
Every expected label is worked out here from the store's own table (sqlite3) and from what the test wrote."""

import csv
import hashlib
import logging
import os
import sqlite3

import numpy as np
import pytest
from PIL import Image

from children import run_cli
from conftest import CLASSES, IMAGE_SIZE, write_dataset
from photos import PHOTOS, photo_crop

OTHER = ("chelsea", "rocket")  # photos of none of the classes


def _collect(db, model_path, paths, multi_label=False):
    """What serve --collect stores for these uploads (the collector in this process, the model's answers; a
    multi-label model's summary as the server registers it)."""
    from transferkit.api import load_predictor
    from transferkit.apps.collect import Collector
    from transferkit.engines.predict import predict_rows
    from transferkit.options import PredictOptions

    model = load_predictor(model_path)
    keys = ("reference", "task", "task_params") if multi_label else ("reference",)
    summary = {"class_names": model.class_names} | {k: model.metadata.get(k) for k in keys}
    collector = Collector(db, "model-hash", model=(model_path, summary))
    rows = predict_rows(model, paths, PredictOptions(top_k=2)) if multi_label else predict_rows(model, paths)
    for row in rows:
        row["filename"] = os.path.basename(row.pop("path"))
    collector.submit(rows, [open(p, "rb").read() for p in paths], 0.01)
    assert collector.flush(60)
    collector.close()


@pytest.fixture(scope="module")
def store(trained, tmp_path_factory):
    """(model path, the store, {content hash: the photo's true class or its other domain}, train folder)."""
    result, _ = trained
    root = tmp_path_factory.mktemp("seen")
    folder = write_dataset(root / "photos", 1, seed=21)  # one new crop of each class
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    rng = np.random.default_rng(22)
    for name in OTHER:
        path = root / f"{name}.jpg"
        Image.fromarray(photo_crop(PHOTOS.index(name), rng)).save(path, "JPEG", quality=90)
        paths.append(str(path))
    truth = {hashlib.sha256(open(p, "rb").read()).hexdigest(): os.path.basename(os.path.dirname(p))
             if p.startswith(folder) else os.path.basename(p)[:-4] for p in paths}
    db = str(root / "seen.db")
    _collect(db, result["model_path"], paths)
    return result["model_path"], db, truth


def _answers(db) -> dict:
    """{content hash: the stored answer ("unknown" where the model answered unknown)}, read with sqlite3."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select image, label, unknown from predictions").fetchall()
    return {image: "unknown" if unknown and label is None else label for image, label, unknown in rows}


def _queue(model, db, out_dir) -> list[dict]:
    from transferkit.reports.review import review

    done = review(db, model=model, n=10, out_dir=str(out_dir))
    with open(done["written"]["queue"], newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_queue(rows, path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_accept_with_an_empty_label_and_a_label_without_accept_combine(store, tmp_path, caplog):
    import transferkit
    from transferkit.models.modelfile import read_metadata

    model, db, truth = store
    rows = _queue(model, db, tmp_path / "r")
    answers = _answers(db)
    by_what = {truth[r["image"]]: r for r in rows}
    assert len(rows) == 5 and set(by_what) == {*CLASSES, *OTHER}
    assert all(r["answer"] == answers[r["image"]] for r in rows)  # the queue shows the stored answer
    assert all(answers[by_what[c]["image"]] == c for c in CLASSES)  # the model is right on its own classes
    # the reviewer: the right answer accepted (label left empty), the cat labelled unknown (no accept), a label
    # given with accept=yes on another (the label wins), a label given without accept; the rocket left as it was
    by_what[CLASSES[0]]["accept"] = "yes"
    by_what["chelsea"]["label"] = "unknown"
    by_what[CLASSES[1]].update(accept="Yes", label=CLASSES[1])
    by_what[CLASSES[2]]["label"] = CLASSES[2]
    _write_queue(rows, tmp_path / "r" / "queue.csv")
    expected = {by_what[CLASSES[0]]["image"]: answers[by_what[CLASSES[0]]["image"]],
                by_what["chelsea"]["image"]: "unknown", by_what[CLASSES[1]]["image"]: CLASSES[1],
                by_what[CLASSES[2]]["image"]: CLASSES[2]}
    labels = tmp_path / "new" / "labels.csv"
    proc = run_cli("review", db, "--model", model, "-n", 10, "--dir", tmp_path / "r",
                   "--accept", tmp_path / "r" / "queue.csv", "--out", labels)
    with open(labels, newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    found = {}
    for r in written:  # each copied file byte for byte the stored photo: its content hash names it
        assert not os.path.isabs(r["path"])
        found[hashlib.sha256((labels.parent / r["path"]).read_bytes()).hexdigest()] = r["label"]
    assert found == expected
    assert "4 photo(s) written" in proc.stderr and "1 labelled unknown" in proc.stderr
    assert "1 queue row(s) left out: 1 has neither a label nor accept=yes" in proc.stderr
    assert "1 accepted the model's answer" in proc.stderr and "2 given a label" in proc.stderr

    # train --add: the three labelled photos join the training split, the unknown one is the unknown score's
    # "none of these" example (not a class), and said so
    from transferkit.data.folders import split_training_folder
    from transferkit.options import TrainOptions

    train, options = write_dataset(tmp_path / "photos", 6, seed=23), TrainOptions()
    plain = split_training_folder(train, options.val_split, options.seed)  # the split without --add
    with caplog.at_level(logging.INFO, logger="transferkit"):
        after = transferkit.train(train, add=[str(labels)], image_size=IMAGE_SIZE, epochs=3, head="logistic",
                                  out=str(tmp_path / "b"))
    meta = read_metadata(after["model_path"])
    assert meta["data"]["n_train"] == len(plain.train_paths) + 3 and meta["data"]["n_val"] == len(plain.val_paths)
    assert sorted(meta["class_names"]) == sorted(CLASSES)  # no "unknown" class
    assert "1 photo(s) labelled unknown: not a class; used as 'none of these' examples" in caplog.text
    assert meta["novelty"]["background"]["photos"] == meta["data"]["n_unknown"] == 1


def test_nothing_to_write_names_the_rows_read_and_why_each_group_was_left_out(store, tmp_path):
    model, db, truth = store
    rows = _queue(model, db, tmp_path / "r")
    rows[0]["accept"] = "no"  # 1 refused, label empty
    rows[1]["label"] = "robe"  # 1 not a class of the model
    rows[2].update(accept="yes", path=str(tmp_path / "gone.jpg"))  # 1 photo not there
    _write_queue(rows, tmp_path / "q.csv")  # and 2 rows untouched
    labels = tmp_path / "labels.csv"
    proc = run_cli("review", db, "--model", model, "--dir", tmp_path / "r", "--accept", tmp_path / "q.csv",
                   "--out", labels, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(f"transferkit: error: {labels}: no photo to write: 5 row(s) read from")
    assert ("2 have neither a label nor accept=yes" in line and "1 has accept='no' and no label" in line
            and "1 has a label that is not a class of the model" in line
            and "1 names a photo that is not there any more" in line), line
    assert "write yes in 'accept' and leave 'label' empty" in line and not labels.exists()

    # the README's old line: --out without a filled queue says what to do, on one line
    proc = run_cli("review", db, "--dir", tmp_path / "r2", "--out", labels, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "no --accept QUEUE.csv given" in proc.stderr and "--accept" in proc.stderr.split("then pass it")[1]
    proc = run_cli("review", db, "--accept", tmp_path / "q.csv", check=False)  # --accept alone: says --out
    assert proc.returncode == 2 and "--out LABELS.csv" in proc.stderr


def test_accept_takes_a_multi_label_answer_set(tmp_path):
    """A multi-label model's rows accepted with an empty label: each takes its stored label set (read here from the
    store's ``answer`` column with sqlite3), an unknown answer is ``unknown``, an answer with no label is left out
    and said so."""
    import json

    import transferkit
    from mosaics import write_mosaics
    from transferkit.reports.review import review

    train = write_mosaics(tmp_path / "train", 120, seed=1)
    model = transferkit.train(train, multi_label=True, image_size=IMAGE_SIZE, out=str(tmp_path / "run"))["model_path"]
    write_mosaics(tmp_path / "seen", 10, seed=7)
    paths = sorted(str(p) for p in (tmp_path / "seen" / "images").glob("*.jpg"))
    assert len(paths) == 10
    db = str(tmp_path / "seen.db")
    _collect(db, model, paths, multi_label=True)
    rows = _queue(model, db, tmp_path / "r")
    for r in rows:
        r["accept"] = "yes"
    _write_queue(rows, tmp_path / "r" / "queue.csv")
    with sqlite3.connect(db) as conn:
        stored = conn.execute("select image, label, unknown, answer from predictions").fetchall()
    expected, empty = {}, 0
    for image, label, unknown, answer in stored:
        labels = json.loads(answer)["labels"]
        if unknown and label is None:
            expected[image] = "unknown"
        elif labels:
            expected[image] = "|".join(labels)
        else:
            empty += 1
    assert sum("|" in v for v in expected.values()) >= 2  # label sets of two labels or more among them
    out = tmp_path / "labels.csv"
    review(db, model=model, n=10, out_dir=str(tmp_path / "r"), labels=str(out),
           accept=str(tmp_path / "r" / "queue.csv"))
    with open(out, newline="", encoding="utf-8") as f:
        written = {hashlib.sha256((out.parent / r["path"]).read_bytes()).hexdigest(): r["label"]
                   for r in csv.DictReader(f)}
    assert written == expected and len(written) + empty == 10


def test_the_page_and_the_help_say_how_to_fill_the_queue(store, tmp_path):
    from transferkit.reports.review import write_html

    model, db, _ = store
    rows = _queue(model, db, tmp_path / "r")
    page = (tmp_path / "r" / "review.html").read_text(encoding="utf-8")
    for said in ("<code>label</code>", "<code>unknown</code>", "<code>yes</code> in <code>accept</code>",
                 f"transferkit review {db} --accept {tmp_path / 'r' / 'queue.csv'} --out labels.csv",
                 "train DATA --add labels.csv"):
        assert said in page, said
    assert len(rows) == page.count("<figure>")
    assert write_html(rows, str(tmp_path / "p.html"), "t")  # the page of a queue without its source still writes
    help_text = " ".join(run_cli("review", "--help").stdout.split())
    assert "accept=yes with an empty label takes the model's answer" in help_text
    assert "'unknown' for a photo of none of the classes" in help_text
