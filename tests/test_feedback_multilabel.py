"""The feedback loop with a multi-label model (mosaics of real photographs, tests/mosaics.py): the store keeps a
multi-label answer whole (every label over its threshold and every score, not only the first label), review's
margin is the per-label distance to each threshold (min over labels), monitor compares per-label answer rates,
and a store written by the first schema (no ``answer`` column) still opens, reads, reviews and takes new rows."""

import hashlib
import json
import os
import sqlite3
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from mosaics import LABELS, mosaic


@pytest.fixture(scope="module")
def ml_model(multilabel_run):
    """The model of conftest's session run (120 mosaics, --image-size 64), shared with test_multilabel."""
    return str(multilabel_run["out"] / "model.keras")


def _mosaics(folder, n: int, seed: int, always: int | None = None) -> list[str]:
    """``n`` mosaic files; ``always``: a label on every one of them (the others drawn as write_mosaics does)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        count = int(rng.choice([0, 1, 1, 2, 2, 3]))
        labels = sorted(rng.choice(len(LABELS), size=count, replace=False).tolist())
        if always is not None and always not in labels:
            labels = sorted(labels[:2] + [always])
        path = os.path.join(folder, f"m_{seed}_{i:03d}.jpg")
        Image.fromarray(mosaic(labels, rng)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def _collect(db, model_path, paths, top_k=2) -> list[dict]:
    """What serve --collect stores for these uploads (the collector and the summary the server registers)."""
    from transferkit.api import load_predictor
    from transferkit.apps.collect import Collector
    from transferkit.engines.predict import predict_rows
    from transferkit.options import PredictOptions

    model = load_predictor(model_path)
    summary = {"class_names": model.class_names} | {k: model.metadata.get(k)
                                                    for k in ("reference", "task", "task_params")}
    collector = Collector(db, "ml-model-hash", model=(model_path, summary))
    rows = predict_rows(model, paths, PredictOptions(top_k=top_k))
    for row in rows:
        row["filename"] = os.path.basename(row.pop("path"))
    collector.submit(rows, [open(p, "rb").read() for p in paths], 0.01)
    assert collector.flush(60)
    collector.close()
    return rows


def _thresholds(model_path) -> dict:
    from transferkit.models.modelfile import read_metadata

    return read_metadata(model_path)["task_params"]["thresholds"]


def test_the_whole_answer_is_stored_and_review_ranks_by_the_per_label_margin(ml_model, tmp_path):
    from transferkit.data.collected import Store
    from transferkit.reports.review import review

    paths = _mosaics(tmp_path / "seen", 40, seed=5)
    answered = _collect(str(tmp_path / "seen.db"), ml_model, paths)
    store = Store(str(tmp_path / "seen.db"), create=False)
    stored, _ = store.read()
    store.close()
    assert len(stored) == 40
    several = 0
    for row, want in zip(stored, answered):  # one writer: the rows in the order submitted
        assert row["answer"]["labels"] == want["labels"] and row["label"] == want["label"]
        assert set(row["answer"]["scores"]) == set(LABELS)
        assert all(abs(row["answer"]["scores"][k] - v) < 1e-5 for k, v in want["scores"].items())
        several += len(want["labels"]) >= 2
    print(f"\n{several} of 40 answers give 2 labels or more (the first schema kept only the first)")
    assert several >= 5

    thresholds = _thresholds(ml_model)
    done = review(str(tmp_path / "seen.db"), model=ml_model, n=10, out_dir=str(tmp_path / "r"))
    by_name = {os.path.basename(p): a for p, a in zip(paths, answered)}
    stored_name = {r["image"]: r["filename"] for r in stored}
    margins = []
    for row in done["queue"]:
        want = by_name[stored_name[row["image"]]]
        margin = min(abs(p - thresholds[k]) for k, p in want["scores"].items())
        assert row["margin"] == f"{margin:.3f}", (row, want)
        assert row["answer"] == ("|".join(want["labels"]) or ("unknown" if want.get("unknown") else "none"))
        margins.append(margin)
    every = sorted(min(abs(p - thresholds[k]) for k, p in a["scores"].items()) for a in answered)
    print(f"queue margins {np.round(margins, 3).tolist()}; median of all 40: {np.median(every):.3f}")
    assert np.median(margins) < np.median(every)  # the unsure answers first


def test_monitor_compares_per_label_answer_rates(ml_model, tmp_path):
    from transferkit.reports.drift import monitor

    calm_db, moved_db = str(tmp_path / "calm.db"), str(tmp_path / "moved.db")
    _collect(calm_db, ml_model, _mosaics(tmp_path / "calm", 60, seed=6))
    _collect(moved_db, ml_model, _mosaics(tmp_path / "moved", 60, seed=7, always=0))  # LABELS[0] everywhere
    calm = monitor(calm_db, out=str(tmp_path / "m1"))
    moved = monitor(moved_db, out=str(tmp_path / "m2"))
    print("\n" + calm["line"] + "\n" + moved["line"])
    for found in (calm, moved):
        assert "class_mix" not in found["checks"] and set(found["checks"]["label_rates"]["per_label"]) == set(LABELS)
    assert calm["checks"]["label_rates"]["labels_moved"] == []
    rates = moved["checks"]["label_rates"]
    assert rates["labels_moved"] == [LABELS[0]] and rates["window"][LABELS[0]] > rates["reference"][LABELS[0]] + 0.3
    assert "label_rates" in moved["moved"] and f"label_rates ({LABELS[0]}" in moved["line"]


OLD_SCHEMA = """
CREATE TABLE predictions (id INTEGER NOT NULL, uid VARCHAR(32) NOT NULL, created FLOAT NOT NULL,
    model VARCHAR(64), image VARCHAR(64) NOT NULL, ext VARCHAR(8), filename VARCHAR(200), label VARCHAR(200),
    probability FLOAT, novelty FLOAT, unknown BOOLEAN, top_k TEXT, latency_ms FLOAT, worker INTEGER,
    PRIMARY KEY (id), UNIQUE (uid));
CREATE INDEX ix_predictions_image ON predictions (image);
CREATE INDEX ix_predictions_created ON predictions (created);
CREATE TABLE feedback (id INTEGER NOT NULL, prediction_uid VARCHAR(32) NOT NULL, created FLOAT NOT NULL,
    kind VARCHAR(16) NOT NULL, label VARCHAR(200), PRIMARY KEY (id));
CREATE INDEX ix_feedback_prediction_uid ON feedback (prediction_uid);
CREATE TABLE models (hash VARCHAR(64) NOT NULL, created FLOAT NOT NULL, path TEXT, info TEXT, PRIMARY KEY (hash));
"""  # what transferkit's first schema made (SQLAlchemy's DDL of it, as sqlite_master keeps it)


def _old_store(db: str, model_path: str, paths: list[str]) -> list[dict]:
    """A SQLite store as the first schema's collector wrote it: a multi-label answer as its first label and
    its top 3, no ``answer`` column, the model registered without its task."""
    from transferkit.api import load_predictor
    from transferkit.engines.predict import predict_rows
    from transferkit.options import PredictOptions

    model = load_predictor(model_path)
    rows = predict_rows(model, paths, PredictOptions(top_k=3))
    con = sqlite3.connect(db)
    con.executescript(OLD_SCHEMA)
    info = {"class_names": model.class_names, "reference": model.metadata.get("reference")}
    con.execute("INSERT INTO models VALUES (?, ?, ?, ?)", ("old-hash", time.time(), model_path, json.dumps(info)))
    for row, path in zip(rows, paths):
        data = open(path, "rb").read()
        digest = hashlib.sha256(data).hexdigest()
        os.makedirs(f"{db}.files/{digest[:2]}", exist_ok=True)
        open(f"{db}.files/{digest[:2]}/{digest}.jpg", "wb").write(data)
        con.execute("INSERT INTO predictions (uid, created, model, image, ext, filename, label, probability, "
                    "novelty, unknown, top_k, latency_ms, worker) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (uuid.uuid4().hex, time.time(), "old-hash", digest, "jpg", os.path.basename(path), row["label"],
                     row["probability"], row.get("novelty"), row.get("unknown"), json.dumps(row["top_k"]), 5.0, 1))
    con.commit()
    con.close()
    return rows


def _columns(db: str) -> set[str]:
    con = sqlite3.connect(db)
    try:
        return {r[1] for r in con.execute("PRAGMA table_info(predictions)")}
    finally:
        con.close()


def test_a_store_of_the_first_schema_still_opens_reviews_and_takes_whole_answers(ml_model, tmp_path):
    from transferkit.data.collected import Store
    from transferkit.reports.drift import monitor
    from transferkit.reports.review import review

    db = str(tmp_path / "old.db")
    old = _old_store(db, ml_model, _mosaics(tmp_path / "old", 24, seed=8))
    assert "answer" not in _columns(db)
    store = Store(db, create=False)  # a reader (review, monitor) never alters it
    rows, _ = store.read()
    store.close()
    assert len(rows) == 24 and all(r["answer"] is None for r in rows) and "answer" not in _columns(db)
    done = review(db, model=ml_model, n=6, out_dir=str(tmp_path / "r"))
    thresholds = _thresholds(ml_model)
    by_digest = {hashlib.sha256(open(r["path"], "rb").read()).hexdigest(): r for r in old}
    assert len(done["queue"]) == 6
    for row in done["queue"]:  # a first-schema row: its top 3 over their thresholds are its labels (<= 3 here)
        want = by_digest[row["image"]]
        assert row["answer"] == ("unknown" if want["label"] is None and want.get("unknown") else
                                 "|".join(want["labels"]) or "none")
        top = {t["label"]: t["probability"] for t in want["top_k"]}
        assert row["margin"] == f"{min(abs(p - thresholds[k]) for k, p in top.items()):.3f}"
    drift = monitor(db, model=ml_model, out=str(tmp_path / "m"))["checks"]["label_rates"]["window"]
    given = [label for r in old for label in r["labels"]]
    assert drift == {k: round(given.count(k) / len(old), 4) for k in LABELS}
    assert "answer" not in _columns(db)

    new = _collect(db, ml_model, _mosaics(tmp_path / "new", 4, seed=9))  # a writer (serve --collect) adds it
    assert "answer" in _columns(db)
    store = Store(db, create=False)
    rows, _ = store.read()
    store.close()
    assert [r["answer"] is None for r in rows] == [True] * 24 + [False] * 4
    assert [r["answer"]["labels"] for r in rows[24:]] == [r["labels"] for r in new]
