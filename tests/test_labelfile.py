"""Datasets described by a file (labels.csv / TSV / Hugging Face imagefolder) on real photo crops; and a real tiny
CLI training run from a label file with ``--log-dir``, its TensorBoard event files read back."""

import csv
import glob
import io
import json
import math
import os
import shutil
import subprocess
import unicodedata

import numpy as np
import pytest

from children import run_cli
from conftest import CLASSES, IMAGE_SIZE, write_dataset
from transferkit import runs
from transferkit.data import labelfile
from transferkit.data.folders import scan_folder, split_training_folder, stratified_split
from transferkit.errors import TransferkitError

SPLIT_CYCLE = ("train", "train", "valid", "train", "test", "train")


def _listed(root: str, per_class: int, seed: int = 1) -> list[tuple[str, str]]:
    """(path relative to ``root``, class) of photo crops written to ``root/images/<class>/``."""
    write_dataset(os.path.join(root, "images"), per_class, seed=seed)
    return [(f"images/{name}/photo_{i:03d}.jpg", name) for name in CLASSES for i in range(per_class)]


def _write(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_rows_columns_delimiters_and_bad_rows(tmp_path):
    files = _listed(tmp_path, 3)
    # labels typed on macOS (decomposed accents) are the same classes; a TSV and a ';' CSV are read alike
    rows = [(p, unicodedata.normalize("NFD", c)) for p, c in files]
    for name, delimiter in (("labels.tsv", "\t"), ("labels.csv", ";")):
        data = scan_folder(_write(tmp_path / name, ["path", "label"], rows, delimiter))
        assert data.class_names == sorted(CLASSES) and len(data.paths) == 9
        assert [data.class_names[y] for y in data.labels] == [c for _, c in files]
    custom = _write(tmp_path / "custom.csv", ["fichier", "espèce"], files)
    with pytest.raises(TransferkitError, match=r"custom.csv: line 1: no path column 'path' or 'file_name' "
                                               r"\(columns: 'fichier', 'espèce'\); choose it with --path-col"):
        scan_folder(custom)
    data = scan_folder(labelfile.LabelFile(custom, path_col="fichier", label_col="espèce"))
    assert data.counts() == {c: 3 for c in sorted(CLASSES)}
    windows = _write(tmp_path / "windows.csv", ["path", "label"], [(p.replace("/", "\\"), c) for p, c in files])
    assert scan_folder(windows).paths == data.paths  # images\grenade\photo_000.jpg, written on Windows

    (tmp_path / "outside.jpg").write_bytes((tmp_path / files[0][0]).read_bytes())
    bad = files[:2] + [("images/nowhere.jpg", "grenade"), (files[2][0], ""), (str(tmp_path / files[3][0]), "grenade"),
                       ("images/../../outside.jpg", "grenade"), (files[0][0], CLASSES[0])]
    bad_csv = _write(tmp_path / "bad.csv", ["path", "label", "split"],
                     [(p, c, "train") for p, c in bad] + [(files[4][0], files[4][1], "holdout")])
    with pytest.raises(TransferkitError) as err:
        scan_folder(bad_csv)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{bad_csv}: 6 bad row(s): ")
    for expected in ("line 4 ('images/nowhere.jpg'): no such file", f"line 5 ('{files[2][0]}'): empty label",
                     "line 6 (", "): absolute path", "line 7 ('images/../../outside.jpg'): '..' leads out",
                     "line 8 (", "listed again (first on line 2)", "line 9 (", "unknown split 'holdout'"):
        assert expected in message
    # an unreadable image is skipped and reported (with its line), as in a folder scan
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg at all")
    data = scan_folder(_write(tmp_path / "skip.csv", ["path", "label"], files + [("images/broken.jpg", "grenade")]))
    assert len(data.paths) == 9 and data.skipped[0]["line"] == 11 and data.skipped[0]["path"].endswith("broken.jpg")
    # a label the model does not know is an error naming the line
    with pytest.raises(TransferkitError, match=r"line 3: label 'banane' is not one of the model's classes"):
        scan_folder(_write(tmp_path / "other.csv", ["path", "label"], [files[0], (files[1][0], "banane")]),
                    class_names=sorted(CLASSES))


def test_split_column_is_honoured_and_the_fingerprint_has_the_labels(tmp_path):
    files = _listed(tmp_path, 6)
    rows = [(p, c, SPLIT_CYCLE[i % 6]) for i, (p, c) in enumerate(files)]
    data = split_training_folder(_write(tmp_path / "labels.csv", ["path", "label", "split"], rows), 0.2, 42)
    expect = {s: sorted(str(tmp_path / p) for p, _, split in rows if split == s) for s in ("train", "valid")}
    assert sorted(data.train_paths) == expect["train"] and sorted(data.val_paths) == expect["valid"]
    assert data.test_source.only == "test"
    test = scan_folder(data.test_source, class_names=data.class_names)
    assert sorted(test.paths) == sorted(str(tmp_path / p) for p, _, s in rows if s == "test")
    # "validation" (Hugging Face's name) is "valid"; a changed label or split changes the fingerprint
    renamed = [(p, c, "validation" if s == "valid" else s) for p, c, s in rows]
    same = split_training_folder(_write(tmp_path / "v.csv", ["path", "label", "split"], renamed), 0.2, 42)
    assert same.fingerprint == data.fingerprint
    relabelled = [(p, CLASSES[1] if i == 0 else c, s) for i, (p, c, s) in enumerate(rows)]
    other = split_training_folder(_write(tmp_path / "r.csv", ["path", "label", "split"], relabelled), 0.2, 42)
    moved = [(p, c, "valid" if i == 0 else s) for i, (p, c, s) in enumerate(rows)]
    third = split_training_folder(_write(tmp_path / "m.csv", ["path", "label", "split"], moved), 0.2, 42)
    assert len({data.fingerprint, other.fingerprint, third.fingerprint}) == 3
    runs.write_split(str(tmp_path), data)  # --resume on the relabelled file: refused, naming why
    with pytest.raises(TransferkitError, match="the training files changed since the run began .a file's content "
                                               "or label changed"):
        runs.check_same_files(str(tmp_path), {"data": {"fingerprint": data.fingerprint}}, other)
    # no split column: the usual seeded stratified split of every row
    plain = split_training_folder(_write(tmp_path / "plain.csv", ["path", "label"], files), 0.2, 42)
    labels = np.asarray([sorted(CLASSES).index(c) for _, c in files])
    train, val = stratified_split(labels, 0.2, 42)
    assert plain.train_paths == [str(tmp_path / files[i][0]) for i in train] and plain.test_source is None
    assert plain.val_paths == [str(tmp_path / files[i][0]) for i in val]


def test_hugging_face_imagefolder_layouts(tmp_path):
    # 1. metadata.csv at the top: file_name + a label column, split from the first folder of file_name
    top = tmp_path / "hf"
    write_dataset(top / "train", 4, seed=1)
    write_dataset(top / "test", 2, seed=2)
    rows = [(f"{split}/{c}/photo_{i:03d}.jpg", c) for split, n in (("train", 4), ("test", 2))
            for c in CLASSES for i in range(n)]
    _write(top / "metadata.csv", ["file_name", "label"], rows)
    data = split_training_folder(str(top), 0.25, 0)
    assert len(data.train_paths) + len(data.val_paths) == 12 and data.test_source.only == "test"
    assert len(scan_folder(data.test_source).paths) == 6
    # 2. split folders with their own metadata.csv, labels from the class folders (no label column)
    split = tmp_path / "hf_splits"
    for name, n, seed in (("train", 4, 1), ("validation", 2, 3), ("test", 2, 2)):
        write_dataset(split / name, n, seed=seed)
        listed = [(f"{c}/photo_{i:03d}.jpg", "a photo") for c in CLASSES for i in range(n)]
        if name == "validation":  # Hugging Face's other metadata format: JSON lines
            (split / name / "metadata.jsonl").write_text("".join(
                json.dumps({"file_name": f, "caption": t, "n": None}, ensure_ascii=False) + "\n" for f, t in listed),
                encoding="utf-8")
        else:
            _write(split / name / "metadata.csv", ["file_name", "caption"], listed)
    data = split_training_folder(str(split), 0.2, 0)
    assert data.class_names == sorted(CLASSES)
    assert len(data.train_paths) == 12 and all("/validation/" in p for p in data.val_paths)
    assert len(data.val_paths) == 6 and os.path.basename(os.path.dirname(data.val_paths[0])) in CLASSES
    assert labelfile.for_evaluation(str(split)).only == "test"
    # a photo folder that holds some other metadata.csv (no file_name) stays a class folder
    other = tmp_path / "photos"
    write_dataset(other, 2, seed=4)
    _write(other / "metadata.csv", ["camera", "date"], [("X100", "2026-01-01")])
    assert not labelfile.is_label_source(str(other)) and scan_folder(str(other)).counts() == {c: 2 for c in
                                                                                              sorted(CLASSES)}
    # a bad row names the metadata file it is in; a path the file lists in the other Unicode form is found
    decomposed = unicodedata.normalize("NFD", f"{CLASSES[1]}/photo_000.jpg")
    _write(split / "test" / "metadata.csv", ["file_name"], [(decomposed,), ("grenade/photo_009.jpg",)])
    with pytest.raises(TransferkitError, match=r"hf_splits: 1 bad row\(s\): test/metadata.csv line 3 "
                                               r"\('grenade/photo_009.jpg'\): no such file$"):
        scan_folder(str(split))


def _events(folder):
    """{tag: [(step, value)]} of the TensorBoard event files in ``folder`` (a number, or a text's bytes)."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()

    def value(event):
        array = tf.make_ndarray(event.tensor_proto)
        return array.item() if array.dtype == object else float(array)

    return {tag: [(e.step, value(e)) for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


def test_cli_trains_from_a_label_file_with_tensorboard_logs(tmp_path, capsys):
    from transferkit.apps import cli

    files = _listed(tmp_path, 8)
    rows = [(p, c, SPLIT_CYCLE[i % 6]) for i, (p, c) in enumerate(files)]
    labels = _write(tmp_path / "labels.csv", ["fichier", "espèce", "partie"], rows)
    cols = ["--path-col", "fichier", "--label-col", "espèce", "--split-col", "partie"]
    out, logs = tmp_path / "run", tmp_path / "logs"
    run_cli("train", labels, *cols, "--image-size", IMAGE_SIZE, "--epochs", 4, "--patience", 10,
            "--fine-tune-epochs", 2, "--runtime", "keras", "--out", out, "--log-dir", logs, "--quiet")
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert sorted(split["validation"]) == sorted(p for p, _, s in rows if s == "valid")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    n_test = sum(s == "test" for _, _, s in rows)
    assert metrics["test"]["n_images"] == n_test and (out / "report.html").exists()

    # TensorBoard: the head's and the fine-tuning's epochs, one step each, as Keras's callback names them
    head_train, head_val = _events(logs / "head" / "train"), _events(logs / "head" / "validation")
    n_head = 4  # --epochs 4, --patience 10: no early stop
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_learning_rate"):
        assert [s for s, _ in head_train[tag]] == list(range(n_head)), tag
    assert all(v == pytest.approx(1e-3) for _, v in head_train["epoch_learning_rate"])
    assert all(0 < v < 10 and math.isfinite(v) for _, v in head_train["epoch_loss"])
    candidate = metrics["head_choice"]["candidates"][0]  # the Keras softmax candidate, whose curves these are
    assert candidate["head"] == "gap" and max(v for _, v in head_val["epoch_accuracy"]) == pytest.approx(
        candidate["val_accuracy"], abs=1e-6)
    tuned_train, tuned_val = _events(logs / "fine_tune" / "train"), _events(logs / "fine_tune" / "validation")
    assert [s for s, _ in tuned_train["epoch_loss"]] == [0, 1]
    assert all(v == pytest.approx(1e-5) for _, v in tuned_train["epoch_learning_rate"])
    assert [v for _, v in tuned_val["epoch_accuracy"]] == pytest.approx(
        metrics["fine_tune"]["history"]["val_accuracy"], abs=1e-6)
    choice = _events(logs / "head_choice")
    assert choice["chosen/val_accuracy"][0][1] == pytest.approx(metrics["head_choice"]["chosen"]["val_accuracy"])
    assert len([t for t in choice if t.startswith("candidates/") and t.endswith("/val_accuracy")]) == len(
        metrics["head_choice"]["candidates"])
    assert b"<- chosen" in choice["head_choice"][0][1]

    # evaluate, predict and inspect take the label file too
    model = out / "model.keras"
    keras_only = ["--runtime", "keras", "--quiet"]
    assert cli.main(["evaluate", str(model), labels, *cols, "--json", "--no-explain", *keras_only]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == n_test  # its test rows
    assert cli.main(["predict", str(model), labels, *cols, "--format", "csv", *keras_only]) == 0
    predicted = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(predicted) == len(rows) and [r["given"] for r in predicted] == [c for _, c, _ in rows]
    assert sum(r["label"] == r["given"] for r in predicted) >= 0.8 * len(rows)
    assert cli.main(["inspect", labels, *cols, "--json", "--out", str(tmp_path / "health"), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["counts"]) == ["train", "valid", "test"] and report["bad_rows"] == []
    assert sum(report["counts"]["test"].values()) == n_test


def test_cli_label_file_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from transferkit.apps import cli

    files = _listed(tmp_path, 2)
    bad = _write(tmp_path / "labels.csv", ["path", "label"], files + [("images/missing.jpg", "grenade")])
    assert cli.main(["train", bad, "--image-size", str(IMAGE_SIZE), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"transferkit: error: {bad}: 1 bad row(s): line 8 ('images/missing.jpg'): no such file")
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    assert cli.main(["evaluate", str(tmp_path / "model.keras"), bad, "--label-col", "espèce"]) == 2
    assert "model file not found" in capsys.readouterr().err  # the model is read first
    assert cli.main(["inspect", bad, "--move-to", str(tmp_path / "q")]) == 2
    assert "--move-to moves photos between class folders" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "images"), "--label-col", "classe"]) == 2  # a folder has no columns
    assert capsys.readouterr().err.strip().endswith("--label-col is for a label file (.csv, .tsv, or a folder with "
                                                    "metadata.csv), not a class folder")
    import importlib.util

    real = importlib.util.find_spec  # an install without the tensorboard package
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert cli.main(["train", str(tmp_path / "images"), "--log-dir", str(tmp_path / "logs")]) == 2
    assert capsys.readouterr().err.strip() == ("transferkit: error: --log-dir needs the tensorboard package: pip "
                                               "install 'transferkit[tensorboard]' (or pip install tensorboard)")
    assert not (tmp_path / "logs").exists()


def test_python_api_label_files_and_log_dir(dataset, tmp_path):
    import transferkit
    from transferkit import LabelFile

    def listing(folder: str, name: str):  # a label file beside a copy of the folder: paths below it
        shutil.copytree(folder, tmp_path / name)
        rows = [(f"{name}/{c}/{os.path.basename(p)}", c) for c in CLASSES
                for p in sorted(glob.glob(os.path.join(folder, c, "*.jpg")))]
        return _write(tmp_path / f"{name}.csv", ["image", "classe"], rows), rows

    train_csv, train_rows = listing(dataset[0], "train")
    test_csv, test_rows = listing(dataset[1], "test")
    result = transferkit.train(LabelFile(train_csv, path_col="image", label_col="classe"),
                               test_dir=LabelFile(test_csv, path_col="image", label_col="classe"),
                               out=str(tmp_path / "run"), log_dir=str(tmp_path / "logs"), image_size=IMAGE_SIZE,
                               epochs=3, head="gap", runtime="keras")
    assert result["test"]["n_images"] == len(test_rows) == 18
    head = _events(tmp_path / "logs" / "head" / "train")
    assert [s for s, _ in head["epoch_accuracy"]] == [0, 1, 2] and "epoch_learning_rate" in head
    assert list(_events(tmp_path / "logs" / "head_choice")) and not (tmp_path / "logs" / "fine_tune").exists()
    rows = transferkit.predict(result["model_path"], [LabelFile(test_csv, path_col="image", label_col="classe")],
                               runtime="keras")
    assert [r["given"] for r in rows] == [c for _, c in test_rows]
    # measured 16 of 18 (the other 2 flagged unknown by the novelty threshold, none wrong); a model answering at
    # random passes 15 of 18 with P(Binomial(18, 1/3) >= 15) = 1.9e-5 (the old bound, 12, with 3.9e-3)
    assert sum(r["label"] == r["given"] for r in rows) >= 15


def test_a_resumed_stage_continues_the_tensorboard_steps(tmp_path):
    import keras

    from transferkit.training.tensorboard import fine_tune_callback

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.random.default_rng(0).normal(size=(16, 4)).astype("float32"), np.arange(16) % 2
    model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0, callbacks=[fine_tune_callback(str(tmp_path), 3)])
    steps = _events(tmp_path / "fine_tune" / "train")
    assert [s for s, _ in steps["epoch_loss"]] == [3, 4]  # epochs 4 and 5 of a stage resumed after 3
    assert [v for _, v in steps["epoch_learning_rate"]] == pytest.approx([0.01, 0.01])


def _refused(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a command refused with a user's error (exit code 2, no traceback)."""
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, proc.stderr[-3000:]
    return err.removeprefix("transferkit: error: ")


def test_cli_label_file_errors_name_the_file_and_the_reason(tmp_path):
    files = _listed(tmp_path, 2)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(f"path,label\n{files[0][0]},café\n".encode("latin-1"))  # a spreadsheet's default
    byte = next(i for i, b in enumerate(latin1.read_bytes()) if b >= 0x80)  # î of fraîche, the first one
    empty, header = tmp_path / "empty.csv", tmp_path / "header.csv"
    empty.write_bytes(b"")
    header.write_text("path,label\n", encoding="utf-8")
    one = _write(tmp_path / "one.csv", ["path", "label"], [(p, "grenade") for p, _ in files])
    hf = tmp_path / "hf"  # a Hugging Face imagefolder whose metadata.jsonl has a broken line
    write_dataset(hf, 2, seed=3)
    (hf / "metadata.jsonl").write_text(json.dumps({"file_name": f"{CLASSES[0]}/photo_000.jpg"}) + "\n"
                                       '{"file_name": "grenade/photo_001.jpg", "label": }\n', encoding="utf-8")
    expected = {latin1: f"{latin1}: not UTF-8 text (byte {byte}); save the label file as UTF-8",
                empty: f"{empty}: empty file (a header row naming the columns is required)",
                header: f"{header}: no rows below its header",
                one: f"{one}: only one label ('grenade'); a classifier needs at least 2",
                hf: f"{hf / 'metadata.jsonl'}: line 2: not JSON (Expecting value)"}
    for source, message in expected.items():
        assert _refused(run_cli("train", source, "--out", tmp_path / "run", check=False)) == message
        assert not (tmp_path / "run").exists()  # refused before the run folder is made
    for source in (latin1, hf):  # inspect lists bad rows in its report; an unreadable file is still refused
        refused = run_cli("inspect", source, "--out", tmp_path / "health", check=False)
        assert _refused(refused) == expected[source]


def _beside(tmp_path, per_class=6) -> tuple[str, str, list]:
    """``data/labels.csv`` listing ``<class>/photo_NNN.jpg`` of ``images/``, a folder beside ``data/``: (the
    label file, the images folder, the rows)."""
    images = tmp_path / "images"
    write_dataset(images, per_class, seed=1)
    (tmp_path / "data").mkdir()
    rows = [(f"{c}/photo_{i:03d}.jpg", c) for c in CLASSES for i in range(per_class)]
    return _write(tmp_path / "data" / "labels.csv", ["path", "label"], rows), str(images), rows


def test_root_takes_the_images_beside_the_label_files_folder(tmp_path):
    labels, images, rows = _beside(tmp_path)
    with pytest.raises(TransferkitError, match=r"18 bad row\(s\): line 2 \('[^']+'\): no such file;"):
        scan_folder(labels)  # relative to data/: nothing there
    # every row bad: the rows named
    err = _refused(run_cli("inspect", labels, "--out", tmp_path / "health", check=False))
    assert err.startswith(f"{labels}: 18 bad row(s): line 2 (") and err.endswith("no such file; and 8 more")
    data = scan_folder(labelfile.LabelFile(labels, root=images))
    assert data.counts() == {c: 6 for c in sorted(CLASSES)}
    assert data.paths == [os.path.join(images, p) for p, _ in rows]
    split = split_training_folder(labelfile.LabelFile(labels, root=images), 0.25, 0)
    assert len(split.train_paths) + len(split.val_paths) == 18 and split.root == images
    proc = run_cli("inspect", labels, "--root", images, "--json", "--out", tmp_path / "health", "--quiet")
    assert json.loads(proc.stdout)["counts"]["train"] == {c: 6 for c in sorted(CLASSES)}
    # the flag is for a label file, and its folder must exist
    assert _refused(run_cli("train", images, "--root", images, check=False)) == (
        f"{images}: --root is for a label file (.csv, .tsv, or a folder with metadata.csv), not a class folder")
    assert _refused(run_cli("train", labels, "--root", tmp_path / "nowhere", check=False)) == (
        f"{labels}: --root {tmp_path / 'nowhere'}: no such folder")


def test_root_refuses_paths_and_links_that_leave_it(tmp_path):
    labels, images, rows = _beside(tmp_path, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(os.path.join(images, rows[0][0]), outside / "x.jpg")  # a real photo, outside the root
    os.symlink(outside / "x.jpg", os.path.join(images, "grenade", "link.jpg"))
    os.symlink(outside, os.path.join(images, "elsewhere"))
    os.makedirs(os.path.join(images, "alias"))
    os.symlink(os.path.join("..", rows[1][0]), os.path.join(images, "alias", "same.jpg"))  # stays inside
    inside_abs = os.path.join(images, rows[2][0])
    escaping = [("../outside/x.jpg", "grenade"), (str(outside / "x.jpg"), "grenade"), ("grenade/link.jpg", "grenade"),
                ("elsewhere/x.jpg", "grenade"), ("grenade/../../outside/x.jpg", "grenade")]
    kept = rows[3:] + [(inside_abs, rows[2][1]), ("alias/same.jpg", rows[1][1])]
    bad = _write(tmp_path / "data" / "bad.csv", ["path", "label"], kept + escaping)
    with pytest.raises(TransferkitError) as err:
        scan_folder(labelfile.LabelFile(bad, root=images))
    message, where = str(err.value), f"--root {images}"
    first = len(kept) + 2
    assert "\n" not in message and message == (
        f"{bad}: 5 bad row(s): line {first} ('../outside/x.jpg'): '..' leads out of {where}; "
        f"line {first + 1} ('{outside / 'x.jpg'}'): absolute path outside {where}; "
        f"line {first + 2} ('grenade/link.jpg'): a symbolic link leads out of {where}; "
        f"line {first + 3} ('elsewhere/x.jpg'): a symbolic link leads out of {where}; "
        f"line {first + 4} ('grenade/../../outside/x.jpg'): '..' leads out of {where}")
    good = scan_folder(labelfile.LabelFile(_write(tmp_path / "data" / "good.csv", ["path", "label"], kept),
                                           root=images))
    assert len(good.paths) == len(kept) and inside_abs in good.paths  # an absolute path inside the root is taken
    # without --root, the label file's own folder is the root, with the same rule for links
    os.symlink(outside / "x.jpg", tmp_path / "data" / "link.jpg")
    own = _write(tmp_path / "data" / "own.csv", ["path", "label"], [("link.jpg", "grenade"), ("../images/" +
                                                                                              rows[0][0], "b")])
    with pytest.raises(TransferkitError, match=r"own.csv: 2 bad row\(s\): line 2 \('link.jpg'\): a symbolic link "
                                               r"leads out of the label file's folder; line 3 .*'\.\.' leads out"):
        scan_folder(own)
    # from the CLI: one line, before the run folder is made
    err = _refused(run_cli("train", bad, "--root", images, "--out", tmp_path / "run", check=False))
    assert err == message and not (tmp_path / "run").exists()


def test_cli_trains_with_root_and_python_evaluates_with_it(tmp_path):
    from transferkit import ImageClassifier, LabelFile

    images = tmp_path / "images"
    write_dataset(images / "train", 10, seed=1)
    write_dataset(images / "test", 4, seed=2)
    (tmp_path / "data").mkdir()
    listed = {split: [(f"{split}/{c}/photo_{i:03d}.jpg", c) for c in CLASSES for i in range(n)]
              for split, n in (("train", 10), ("test", 4))}
    train_csv = _write(tmp_path / "data" / "train.csv", ["path", "label"], listed["train"])
    test_csv = _write(tmp_path / "data" / "test.csv", ["path", "label"], listed["test"])
    out = tmp_path / "run"
    run_cli("train", train_csv, "--test-dir", test_csv, "--root", images, "--image-size", IMAGE_SIZE,
            "--epochs", 5, "--head", "gap", "--runtime", "keras", "--out", out, "--quiet")
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert split["validation"] and all(p.startswith("train/") for p in split["validation"])  # below --root
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["test"]["n_images"] == 12  # --root read --test-dir's paths too
    clf = ImageClassifier.load(str(out / "model.keras"), runtime="keras")
    found = clf.evaluate(LabelFile(test_csv, root=str(images)))
    assert found["n_images"] == 12 and found["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    # of 12 photos of 3 classes, measured 12; a model answering at random gets 11 with P(Binomial(12, 1/3) >= 11)
    # = 4.7e-5 (the old bound, 9, with 3.9e-3); labels one row off their paths score 9
    assert found["accuracy"] >= 11 / 12
    with pytest.raises(TransferkitError, match="no such file"):
        clf.evaluate(test_csv)  # relative to data/: nothing there
