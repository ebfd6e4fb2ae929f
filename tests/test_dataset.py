import os
import unicodedata

import numpy as np
import pytest
from PIL import Image

from transferkit.data.folders import scan_folder, stratified_split
from transferkit.errors import TransferkitError


def _img(path, color=(10, 20, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (12, 12), color).save(path, "PNG")


def test_accented_classes_sorted_and_bad_files_listed(tmp_path):
    for name in ("pêche pourrie", "fraise fraîche", "Grenade"):
        for i in range(3):
            _img(str(tmp_path / name / f"{i}.png"))
    (tmp_path / "pêche pourrie" / "notes.txt").write_text("hello")
    (tmp_path / "pêche pourrie" / ".DS_Store").write_bytes(b"\0\0")
    _img(str(tmp_path / "fraise fraîche" / "nested" / "deep.png"))
    data = scan_folder(str(tmp_path))
    assert data.class_names == sorted(["pêche pourrie", "fraise fraîche", "Grenade"])
    assert data.counts() == {"Grenade": 3, "fraise fraîche": 4, "pêche pourrie": 3}
    assert [s["reason"] for s in data.skipped] == ["not an image (unrecognised content)"]
    assert data.skipped[0]["path"].endswith("notes.txt")


def test_decomposed_accents_are_the_same_class(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    _img(str(train / "pêche" / "a.png"))
    _img(str(train / "fraise" / "a.png"))
    _img(str(test / unicodedata.normalize("NFD", "pêche") / "a.png"))
    classes = scan_folder(str(train)).class_names
    test_data = scan_folder(str(test), class_names=classes)
    assert test_data.labels.tolist() == [classes.index("pêche")]


def test_clear_errors_for_bad_folders(tmp_path):
    with pytest.raises(TransferkitError, match="not a folder"):
        scan_folder(str(tmp_path / "missing"))
    with pytest.raises(TransferkitError, match="no class sub-folders"):
        scan_folder(str(tmp_path))
    _img(str(tmp_path / "only" / "a.png"))
    with pytest.raises(TransferkitError, match="only one class folder"):
        scan_folder(str(tmp_path))
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "x.txt").write_text("x")
    os.remove(tmp_path / "only" / "a.png")
    with pytest.raises(TransferkitError, match="no readable images"):
        scan_folder(str(tmp_path))


def test_unknown_test_class_is_an_error(tmp_path):
    _img(str(tmp_path / "kiwi" / "a.png"))
    with pytest.raises(TransferkitError, match="'kiwi' is not one of the model's classes"):
        scan_folder(str(tmp_path), class_names=["fraise", "pêche"])


def test_split_is_stratified_and_reproducible():
    labels = np.repeat([0, 1, 2], [50, 30, 10])
    a_train, a_val = stratified_split(labels, 0.2, seed=7)
    b_train, b_val = stratified_split(labels, 0.2, seed=7)
    c_train, c_val = stratified_split(labels, 0.2, seed=8)
    np.testing.assert_array_equal(a_val, b_val)
    assert not np.array_equal(a_val, c_val)
    assert sorted(np.concatenate([a_train, a_val]).tolist()) == list(range(90))
    assert np.bincount(labels[a_val]).tolist() == [10, 6, 2]
    with pytest.raises(TransferkitError, match="single image"):
        stratified_split(np.array([0, 0, 0, 1]), 0.2, seed=0)
