"""The public methods of ``ImageClassifier`` that no other test calls with the argument that matters:
``audit_labels``, ``predict(coverage=...)``, ``evaluate(unknown_dir=...)``, ``save(warm=False)`` and
``fine_tune`` on a fitted classifier. One classifier, prepared and fitted here stage by stage on 12 photo crops
of each class (two of them filed in the wrong class), checked against figures computed here from its rows."""

import math
import os
import shutil

import numpy as np
import pytest

from conftest import CLASSES, IMAGE_SIZE, write_dataset


def _files(folder) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(classifier after prepare, features and head; its features; the two misfiled photos' paths)."""
    from transferkit.classifier import ImageClassifier

    root = tmp_path_factory.mktemp("api")
    data = write_dataset(root / "data", 12, seed=81)
    moved = []
    for k in (1, 2):  # a crop of the second and of the third photograph, filed one class too low
        path = _files(os.path.join(data, CLASSES[k]))[0]
        moved.append(os.path.join(data, CLASSES[k - 1], "moved_" + os.path.basename(path)))
        shutil.move(path, moved[-1])
    clf = ImageClassifier(image_size=IMAGE_SIZE, head="logistic")
    clf.prepare(data, out=str(root / "run"))
    features = clf.extract_features()
    clf.fit_head(features)
    return clf, features, moved


def test_audit_labels_flags_the_misfiled_photos(fitted):
    clf, features, moved = fitted
    assert clf.label_audit_ is None  # fit_head alone audits nothing
    assert clf.audit_labels(features) is clf
    audit = clf.label_audit_
    flagged = {r["path"]: r for r in audit.label_issues()}
    print(f"\nlabel audit: {len(flagged)} flagged of {len(audit.paths)}; the misfiled ones: "
          f"{[flagged.get(p, {}).get('score') for p in moved]}")
    assert set(moved) <= set(flagged)
    for path, k in zip(moved, (1, 2)):  # suggested: the class of the photograph it is a crop of
        assert flagged[path]["given"] == CLASSES[k - 1] and flagged[path]["suggested"] == CLASSES[k]
    assert len(audit.paths) == len(features.train_paths) + len(features.val_paths)


def _aps_sets(probabilities: np.ndarray, conformal: dict, coverage: float) -> list[set[int]]:
    """The RAPS sets written out by hand (Romano et al. 2020, Angelopoulos et al. 2021): a label's score is the
    probability mass ranked at or above it plus ``penalty`` per rank past ``k_reg``; the quantile is the
    ceil((n + 1) coverage)-th smallest calibration score (read from the stored order statistics)."""
    n, stored = conformal["n"], conformal["scores"]
    rank = math.ceil((n + 1) * coverage - 1e-9)
    ranks = list(range(1, n + 1)) if len(stored) >= n else [round(x) for x in np.linspace(1, n, len(stored))]
    q = math.inf if rank > n else next(s for r, s in zip(ranks, stored) if r >= rank)
    sets = []
    for p in probabilities:
        order = sorted(range(len(p)), key=lambda j: (-p[j], j))
        mass, inside = 0.0, set()
        for position, j in enumerate(order, start=1):
            mass += p[j]
            if mass + conformal["penalty"] * max(0, position - conformal["k_reg"]) <= q + 1e-6:
                inside.add(j)
        sets.append(inside)
    return sets


def test_predict_coverage_gives_each_photo_its_conformal_set(fitted, dataset):
    clf = fitted[0]
    photos = _files(dataset[1])
    assert all("set" not in r for r in clf.predict(photos))
    conformal = clf.metadata["conformal"]
    sizes = {}
    for coverage in (0.5, 0.9, 0.99):
        rows = clf.predict(photos, top_k=3, coverage=coverage)
        probabilities = np.array([[next(t["probability"] for t in r["top_k"] if t["label"] == name)
                                   for name in clf.classes_] for r in rows])
        expected = _aps_sets(probabilities, conformal, coverage)
        assert [{clf.classes_.index(label) for label in r["set"]} for r in rows] == expected
        sizes[coverage] = float(np.mean([len(s) for s in expected]))
    print(f"\nmean set size at coverage 0.5 / 0.9 / 0.99: {sizes[0.5]:.2f} / {sizes[0.9]:.2f} / {sizes[0.99]:.2f} "
          f"({conformal['n']} calibration photos)")
    assert sizes[0.5] <= sizes[0.9] <= sizes[0.99] and sizes[0.5] < sizes[0.99]


def test_evaluate_unknown_dir_measures_the_rejections(fitted, dataset, tmp_path):
    from sklearn.metrics import roc_auc_score

    clf = fitted[0]
    write_dataset(tmp_path / "w", 8, seed=82, classes=CLASSES + ["autre"])  # "autre": crops of a 4th photograph
    unknown = str(tmp_path / "w" / "autre")
    metrics = clf.evaluate(dataset[1], unknown_dir=unknown)
    found = metrics["unknown"]
    known_rows, unknown_rows = clf.predict(dataset[1]), clf.predict(unknown)
    y = [0] * len(known_rows) + [1] * len(unknown_rows)
    auroc = roc_auc_score(y, [r["novelty"] for r in known_rows + unknown_rows])
    rejected = float(np.mean([r["unknown"] for r in unknown_rows]))
    print(f"\nunknown photos rejected: {rejected:.3f}; AUROC of the novelty score: {auroc:.3f}")
    assert found["n_images"] == len(unknown_rows) == 8
    assert found["rejected"] == pytest.approx(rejected) and found["auroc"] == pytest.approx(auroc, abs=0.01)
    assert found["known_kept"] == pytest.approx(float(np.mean([not r["unknown"] for r in known_rows])))
    cm = np.array(found["confusion_matrix"])
    assert found["class_names"][-1] == "unknown" and cm[-1].sum() == 8 and cm[-1, -1] == round(rejected * 8)
    assert "unknown" not in clf.evaluate(dataset[1])


def test_save_without_warm_leaves_no_converted_engine(fitted, trained, tmp_path):
    from transferkit.engines.cached import missing

    clf = fitted[0]
    path = str(tmp_path / "cold.keras")
    assert clf.save(path, warm=False) == path
    assert missing(path)  # its first use would convert it
    assert not missing(trained[0]["model_path"])  # fit saved that one warm
    assert clf.path == path


def test_fine_tune_a_fitted_classifier_moves_only_the_unfrozen_blocks(fitted):
    from transferkit.models.backbones import REGISTRY, backbone_blocks, find_backbone

    clf = fitted[0]
    backbone = find_backbone(clf.model_)
    blocks = {layer.name: block for block, layers in backbone_blocks(backbone, REGISTRY["efficientnet_lite0"])
              for layer in layers}
    before = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in backbone.layers if layer.weights}
    assert clf.fine_tune_ is None
    assert clf.fine_tune(1, unfreeze_top=1, learning_rate=1e-3) is clf
    assert clf.fine_tune_["epochs"] == 1 and clf.fine_tune_["unfreeze_top"] == 1
    after = {layer.name: layer.get_weights() for layer in backbone.layers if layer.weights}
    changed = {name for name in before if any(not np.array_equal(a, b) for a, b in zip(before[name], after[name]))}
    print(f"\nfine-tuning one epoch changed {len(changed)} layers: {sorted({blocks[n] for n in changed})}")
    assert changed and {blocks[name] for name in changed} == {"top"}
