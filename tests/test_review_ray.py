"""``transferkit review FOLDER --model M --ray`` (the archive case): the answers computed by ``predict --ray``
and the features by ``train --ray``'s cache filling on a real local Ray instance, then the same ranking as the
local path: the queue's rows (order, answers, scores) equal those of ``review FOLDER --model M`` without Ray."""

import csv
import os

from conftest import CLASSES, require, write_dataset

require("ray", "the [ray] extra, part of [test]")


def test_review_of_a_folder_on_ray_ranks_as_the_local_path(trained, ray_local, tmp_path, capsys):
    from transferkit.apps import cli
    from transferkit.reports.review import review

    model = os.path.join(trained[1], "model.keras")
    # 20 photos no other test has cached: 12 of the model's 3 classes, 8 of 2 photographs it never saw
    folder = write_dataset(tmp_path / "unlabelled", 4, seed=31, classes=(*CLASSES, "other-a", "other-b"))
    (tmp_path / "unlabelled" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    assert cli.main(["review", folder, "--model", model, "-n", "8", "--dir", str(tmp_path / "r"), "--ray"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("review queue: 8 of 20 photo(s)")
    assert "Ray computed 20 of 20 missing feature(s)" in err  # the cluster computed the features
    assert any(f.startswith("ray-") and f.endswith(".parquet") for f in os.listdir(tmp_path / "r"))
    with open(tmp_path / "r" / "queue.csv", newline="", encoding="utf-8") as f:
        on_ray = list(csv.DictReader(f))

    local = review(folder, model=model, n=8, out_dir=str(tmp_path / "local"))["queue"]
    assert [r["path"] for r in on_ray] == [r["path"] for r in local]
    assert {r["answer"] for r in local} >= {"unknown"}  # the photographs it never saw are in the queue
    for got, want in zip(on_ray, local):
        assert got["answer"] == want["answer"] and int(got["rank"]) == want["rank"], got["path"]
        for key in ("probability", "novelty", "margin", "entropy", "score"):
            if want[key] == "":
                assert got[key] == "", (key, got["path"])
            else:
                assert abs(float(got[key]) - float(want[key])) <= 2e-3, (key, got["path"])
    assert cli.main(["review", str(tmp_path / "nothing.db"), "--ray"]) == 2  # --ray reviews a folder
    assert "--ray reviews a folder" in capsys.readouterr().err
