"""The label audit on real photographs: planted wrong labels rank at the top, a clean folder yields few
suspects, and the CLI's JSON, CSV, page and --move-to (which never deletes)."""

import csv
import json
import os
import shutil

import pytest

from conftest import IMAGE_SIZE, write_dataset

CLASSES = ["appareil", "pièces", "page", "chat"]  # crops of tests/photos.PHOTOS[0:4]
PLANTED = [("appareil", "pièces", 0), ("pièces", "page", 1), ("page", "chat", 2), ("chat", "appareil", 3),
           ("appareil", "page", 4)]  # (true class, folder it is moved to, photo number)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """4 classes x 20 photo crops, 5 of them moved into a wrong class folder: (folder, {path: true class})."""
    root = tmp_path_factory.mktemp("audit") / "train"
    write_dataset(root, 20, seed=5, classes=CLASSES)
    wrong = {}
    for true, folder, n in PLANTED:
        target = root / folder / f"planted_{n}.jpg"
        shutil.move(root / true / f"photo_{n:03d}.jpg", target)
        wrong[str(target)] = true
    return str(root), wrong


def _audit(folder):
    from transferkit.training.audit import audit_folder

    return audit_folder(folder, image_size=IMAGE_SIZE)


def test_planted_wrong_labels_rank_at_the_top(planted):
    folder, wrong = planted
    audit = _audit(folder)
    issues = audit.label_issues()
    top = {r["path"]: r for r in issues[:len(wrong) + 2]}
    found = [p for p in wrong if p in top]
    assert len(found) >= 4, [(r["path"], r["score"]) for r in issues]  # of 5, within the top 7
    assert all(top[p]["suggested"] == wrong[p] and top[p]["given"] != wrong[p] for p in found)
    assert all(0 <= r["score"] <= 1 for r in issues)
    assert [r["score"] for r in issues] == sorted((r["score"] for r in issues), reverse=True)  # most suspect first
    ranked = [audit.paths[i] for i in audit.order]
    assert sum(p in wrong for p in ranked[:10]) >= 4  # the full ranking too


def test_a_clean_folder_has_few_suspects(dataset):
    audit = _audit(dataset[0])
    assert len(audit.paths) == 48
    assert len(audit.label_issues()) <= 2 and len(audit.outliers()) <= 3


def test_inspect_labels_json_csv_page_and_move_to(planted, tmp_path, capsys):
    from transferkit.apps.cli import main

    folder, wrong = planted
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    out = tmp_path / "inspect"
    assert main(["inspect", str(data), "--labels", "--image-size", str(IMAGE_SIZE), "--json", "--out", str(out),
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)  # the one printed object
    assert report["n_images"] == 80 and isinstance(report["outliers"], list)
    issues = report["label_issues"]
    assert issues and set(issues[0]) == {"path", "given", "suggested", "score"}
    page = (out / "labels.html").read_text(encoding="utf-8")
    assert "Label audit" in page and os.path.basename(issues[0]["path"]) in page
    with open(out / "label_issues.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows if r["issue"] == "label"] == [r["path"] for r in issues]
    marked = [r for r in rows if r["issue"] == "label"][:2]
    for r in marked:  # what a person does: write yes in the move column
        r["move"] = "yes"
    with open(out / "label_issues.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)
    quarantine = tmp_path / "quarantine"
    assert main(["inspect", str(data), "--out", str(out), "--move-to", str(quarantine), "--quiet"]) == 0
    moved_to = sorted(str(p) for p in quarantine.rglob("*.jpg"))
    assert len(moved_to) == 2 and not any(os.path.exists(r["path"]) for r in marked)
    assert sum(1 for _ in data.rglob("*.jpg")) == 78  # moved, nothing deleted
    assert {os.path.relpath(p, quarantine) for p in moved_to} == {os.path.relpath(r["path"], data) for r in marked}
    rows[0]["path"], rows[0]["move"] = str(tmp_path / "elsewhere.jpg"), "yes"
    (tmp_path / "elsewhere.jpg").write_bytes(b"x")
    with open(tmp_path / "edited.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerow(rows[0])
    assert main(["inspect", str(data), "--csv", str(tmp_path / "edited.csv"), "--move-to", str(quarantine)]) == 2
    assert "not inside" in capsys.readouterr().err and (tmp_path / "elsewhere.jpg").exists()


def test_training_run_writes_the_audit_into_its_report(trained):
    result, out = trained
    audit = result["label_audit"]
    assert audit["label_audit"]["images"] == 48 and audit["label_audit"]["folds"] == 5
    assert len(audit["label_issues"]) <= 2  # a clean training folder
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert "id=\"label-audit\"" in page and "label_issues.csv" in page
    with open(os.path.join(out, "label_issues.csv"), newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["rank", "issue", "path", "given", "suggested", "score", "move"]


def test_move_to_checks_every_marked_path_before_moving_any(planted, tmp_path, capsys):
    from transferkit.apps.cli import main

    folder, _ = planted
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    inside = sorted(data.rglob("*.jpg"))[0]
    (tmp_path / "elsewhere.jpg").write_bytes(b"x")
    with open(tmp_path / "marked.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["path", "move"])
        writer.writeheader()
        writer.writerows([{"path": str(inside), "move": "yes"}, {"path": str(tmp_path / "elsewhere.jpg"),
                                                                  "move": "yes"}])
    args = ["inspect", str(data), "--csv", str(tmp_path / "marked.csv"), "--move-to"]
    assert main(args + [str(tmp_path / "quarantine")]) == 2
    assert "not inside" in capsys.readouterr().err and inside.exists()  # the good row did not move either
    assert main(args + [str(data / "_quarantine")]) == 2  # the next scan would read it as a class
    assert "inside" in capsys.readouterr().err and inside.exists() and not (data / "_quarantine").exists()
