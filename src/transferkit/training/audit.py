"""Label audit: which training photos are probably in the wrong folder, which look like no other photo, and
moving the ones a person confirms.

The frozen backbone's features are cached, so a head trains on them in well under a second: k-fold over the
training folder gives every photo a predicted probability from a head that never saw it (scikit-learn's logistic
regression on standardised features, stratified folds). cleanlab (``cleanlab.filter.find_label_issues``, a
well-kept implementation of confident learning, Northcutt et al. 2021) flags the photos whose given class
disagrees with those out-of-fold probabilities beyond the per-class noise it estimates, ranked by their label
quality (the out-of-fold probability of the given class: lowest first); the suggested class is the out-of-fold
argmax. Outliers are cleanlab's ``OutOfDistribution`` scores (mean distance to the nearest training features),
flagged beyond Tukey's fence of their distribution, so a clean folder flags few.

Measured in ``benchmarks/label_audit.py`` (1,000 real-photo crops of 10 classes, 50 labels flipped, frozen Lite0
features): see its docstring and the README for the share of flipped labels in the audit's top 50 and top 100.
Nothing is ever deleted: :func:`move_marked` moves the files a person marked in the CSV to a quarantine folder.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.files import atomic_path
from transferkit.log import logger

FOLDS = 5
C = 0.1  # the logistic regression's inverse regularisation (0.1 and 0.01 ranked alike in benchmarks/label_audit.py)
CSV_NAME = "label_issues.csv"
CSV_FIELDS = ("rank", "issue", "path", "given", "suggested", "score", "move")
MARKS = ("yes", "y", "true", "1", "x", "move")  # what a person writes in the ``move`` column to move a file


@dataclass
class LabelAudit:
    """The audit of one folder: out-of-fold probabilities, the full ranking, what is flagged."""

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    pred_probs: np.ndarray
    order: np.ndarray  # every image, most suspect label first (lowest out-of-fold probability of its label)
    flagged: np.ndarray  # bool per image: cleanlab's label issues
    outlier_scores: np.ndarray  # 0-1, lower = further from the other photos
    outlier_flagged: np.ndarray  # bool per image
    folds: int = FOLDS
    extra: dict = field(default_factory=dict)

    def label_issues(self) -> list[dict]:
        """The flagged images, most suspect first: path, given and suggested class, score (1 - the out-of-fold
        probability of the given class: 1 is surely wrong)."""
        return [self._row(i) for i in self.order if self.flagged[i]]

    def outliers(self) -> list[dict]:
        """The flagged outliers, furthest first; score = 1 - cleanlab's out-of-distribution score."""
        index = np.flatnonzero(self.outlier_flagged)
        index = index[np.argsort(self.outlier_scores[index], kind="stable")]
        return [self._row(i) | {"score": round(float(1 - self.outlier_scores[i]), 4)} for i in index]

    def _row(self, i: int) -> dict:
        p = self.pred_probs[i]
        return {"path": self.paths[i], "given": self.class_names[self.labels[i]],
                "suggested": self.class_names[int(np.argmax(p))], "score": round(float(1 - p[self.labels[i]]), 4)}

    def to_json(self) -> dict:
        return {"label_issues": self.label_issues(), "outliers": self.outliers(),
                "label_audit": {"images": len(self.paths), "folds": self.folds, "head": "logistic regression on "
                                "standardised features", "flagged": int(self.flagged.sum()),
                                "outliers": int(self.outlier_flagged.sum())} | self.extra}


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = FOLDS,
                              seed: int = 0) -> tuple[np.ndarray, int]:
    """(probabilities (n, classes) of each image from a head fitted on the other folds, folds used). A class
    with fewer images than ``folds`` lowers the fold count (at least 2)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    counts = np.bincount(labels, minlength=n_classes)
    k = int(min(folds, counts[counts > 0].min()))
    if k < 2 or (counts > 0).sum() < 2:
        raise TransferkitError("the label audit needs at least 2 classes with 2 or more images each")
    x = np.asarray(features, np.float32).reshape(len(features), -1)
    probs = np.zeros((len(x), n_classes))
    with threadpool_limits(1):  # small matrices: one BLAS thread (2 contending threads made a fit 0.3 s -> 11 s)
        for fit_rows, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, labels):
            head = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=300))
            head.fit(x[fit_rows], labels[fit_rows])
            probs[np.ix_(held, head.classes_)] = head.predict_proba(x[held])
    return probs, k


def _outliers(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cleanlab's out-of-distribution score per image, flagged beyond Tukey's upper fence of -log score)."""
    from cleanlab.outlier import OutOfDistribution

    x = np.asarray(features, np.float32).reshape(len(features), -1)
    k = int(min(10, len(x) - 1))
    scores = OutOfDistribution({"k": k}).fit_score(features=x, verbose=False)
    distance = -np.log(np.clip(scores, 1e-12, 1.0))
    q1, q3 = np.percentile(distance, [25, 75])
    return scores, distance > q3 + 1.5 * (q3 - q1)


def audit_labels(features: np.ndarray, labels, paths: list[str], class_names: list[str], folds: int = FOLDS,
                 seed: int = 0) -> LabelAudit:
    """Audit images given their backbone features (n, ...) and folder labels."""
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, np.int64)
    probs, k = out_of_fold_probabilities(features, labels, len(class_names), folds, seed)
    quality = probs[np.arange(len(labels)), labels]
    order = np.argsort(quality, kind="stable")
    # one process: cleanlab's pool cost more than the work at 400, 20,000 and 100,000 rows here (2 cores)
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    scores, far = _outliers(features)
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    logger.info(f"label audit: {int(flagged.sum())} suspect labels and {int(far.sum())} outliers among "
                f"{len(labels)} images (out-of-fold accuracy {accuracy:.1%}, {k} folds)")
    return LabelAudit(list(paths), labels, list(class_names), probs, order, np.asarray(flagged, bool), scores, far,
                      k, {"out_of_fold_accuracy": round(accuracy, 4)})


def audit_folder(data_dir: str, backbone: str = "efficientnet_lite0", image_size: int | None = None,
                 batch_size: int = 32, folds: int = FOLDS) -> LabelAudit:
    """Scan ``data_dir/<class>/``, take the frozen backbone's (cached) features of every readable image, and
    audit their labels."""
    from transferkit.data import labelfile
    from transferkit.data.folders import scan_folder
    from transferkit.training.features import FeatureExtractor

    if labelfile.is_label_source(data_dir):  # as inspect's report: a label file's bad rows listed, not refused
        data = labelfile.scan_label_file(data_dir, strict=False)
    else:
        data = scan_folder(data_dir)
    extractor = FeatureExtractor(backbone, image_size, batch_size=batch_size)
    features, kept, _ = extractor.extract(data.paths, 0, desc="audit features")
    return audit_labels(features[:, 0], data.labels[kept], [data.paths[i] for i in kept], data.class_names, folds)


def write_csv(audit: LabelAudit, path: str) -> str:
    """The suspects and outliers as a CSV a person edits: write ``yes`` in ``move`` for the files to move."""
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            for kind, rows in (("label", audit.label_issues()), ("outlier", audit.outliers())):
                for rank, row in enumerate(rows, start=1):
                    writer.writerow(row | {"rank": rank, "issue": kind, "move": ""})
    return str(path)


def move_marked(csv_path: str, data_dir: str, quarantine: str) -> list[dict]:
    """Move every file whose ``move`` cell is marked (yes, y, x, 1, true) from ``data_dir`` to
    ``quarantine/<its class folder>/`` (a name already there gets a numbered suffix); never deletes. A marked
    path outside ``data_dir`` is refused, as is a CSV without the ``path`` and ``move`` columns."""
    if not os.path.isfile(csv_path):
        raise TransferkitError(f"{csv_path}: no label audit CSV (run 'transferkit inspect DATA --labels' first)")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"path", "move"} <= set(reader.fieldnames or ()):
            raise TransferkitError(f"{csv_path}: needs the columns 'path' and 'move'")
        marked = [row["path"] for row in reader if (row.get("move") or "").strip().lower() in MARKS]
    root = os.path.realpath(data_dir)
    if os.path.commonpath([root, os.path.realpath(quarantine)]) == root:
        raise TransferkitError(f"{quarantine}: inside {data_dir}, where the next scan would read it as a class; "
                               f"choose a folder outside it")
    for path in marked:  # every path checked before any file moves
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise TransferkitError(f"{csv_path}: {path} is not inside {data_dir}; nothing moved")
    moved = []
    for path in dict.fromkeys(marked):  # a file listed twice (label issue and outlier) moves once
        source = os.path.realpath(path)
        if not os.path.isfile(source):
            logger.warning(f"{path}: marked in {csv_path} but not there (moved already?)")
            continue
        target = _free_name(os.path.join(quarantine, os.path.relpath(source, root)))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(source, target)
        moved.append({"path": path, "to": target})
    return moved


def _free_name(target: str) -> str:
    stem, ext = os.path.splitext(target)
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{stem}-{n}{ext}"
    return target


@dataclass
class MultiLabelAudit(LabelAudit):
    """The audit of a multi-label set: ``labels`` is the indicator matrix; a row's given and suggested labels are
    joined by ``|`` (suggested: the out-of-fold probabilities over 0.5), its score 1 - cleanlab's label quality."""

    quality: np.ndarray = None

    def _row(self, i: int) -> dict:
        def joined(cells) -> str:
            return "|".join(self.class_names[j] for j in np.flatnonzero(cells)) or "(none)"

        return {"path": self.paths[i], "given": joined(self.labels[i]), "suggested": joined(self.pred_probs[i] >= 0.5),
                "score": round(float(1 - self.quality[i]), 4)}


def multilabel_out_of_fold(features: np.ndarray, y: np.ndarray, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Each image's label probabilities (n, labels) from one-vs-rest logistic regressions fitted on the other
    folds (a label constant in a fold's training rows: its rate there)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, np.float32).reshape(len(features), -1)
    k = int(min(folds, len(x)))
    if k < 2:
        raise TransferkitError("the label audit needs at least 2 images")
    probs = np.zeros(y.shape, np.float64)
    with threadpool_limits(1):
        for fit_rows, held in KFold(k, shuffle=True, random_state=seed).split(x):
            scaler = StandardScaler().fit(x[fit_rows])
            xf, xh = scaler.transform(x[fit_rows]), scaler.transform(x[held])
            for j in range(y.shape[1]):
                column = y[fit_rows, j]
                if column.min() == column.max():
                    probs[held, j] = column.mean()
                    continue
                head = LogisticRegression(C=C, max_iter=300).fit(xf, column)
                probs[held, j] = head.predict_proba(xh)[:, 1]
    return probs


def audit_multilabel(features: np.ndarray, y: np.ndarray, paths: list[str], class_names: list[str],
                     folds: int = FOLDS, seed: int = 0) -> MultiLabelAudit:
    """cleanlab's multi-label ``find_label_issues`` on out-of-fold probabilities, ranked by its label quality
    scores (``multilabel_classification.rank.get_label_quality_scores``), and the outliers as for one label."""
    from cleanlab.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    y = np.asarray(y, np.int64)
    probs = multilabel_out_of_fold(features, y, folds, seed)
    given = [list(np.flatnonzero(row)) for row in y]
    quality = get_label_quality_scores(given, probs)
    flagged = find_label_issues(given, probs, multi_label=True, n_jobs=1)
    scores, far = _outliers(features)
    agreement = float(((probs >= 0.5) == (y > 0)).all(axis=1).mean())
    logger.info(f"label audit (multi-label): {int(flagged.sum())} suspect label sets and {int(far.sum())} "
                f"outliers among {len(y)} images (out-of-fold subset accuracy {agreement:.1%})")
    return MultiLabelAudit(list(paths), y, list(class_names), probs, np.argsort(quality, kind="stable"),
                           np.asarray(flagged, bool), scores, far, min(folds, len(y)),
                           {"out_of_fold_accuracy": round(agreement, 4), "measure": "subset accuracy"},
                           quality=np.asarray(quality))
