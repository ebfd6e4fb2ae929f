"""Find the labelled images in a folder (one sub-folder per class, any Unicode name) and split them.

Like Keras's ``image_dataset_from_directory``: labels are the sorted sub-folder names. Unlike it, files are
recognised by content, and a file that is not a usable image is skipped and reported with its reason instead of
crashing training mid-epoch.
"""

from __future__ import annotations

import glob
import hashlib
import os
import unicodedata
from dataclasses import dataclass, field, replace

import numpy as np

from transferkit.errors import OptionError, TransferkitError
from transferkit.files import file_digest
from transferkit.data.images import UnreadableImage, sniff_format


@dataclass
class ImageFolder:
    """The usable images of a folder: parallel lists of paths and integer labels, plus what was skipped."""

    root: str
    class_names: list[str]
    paths: list[str]
    labels: np.ndarray
    skipped: list[dict] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Images per class, in class order."""
        return {name: label_count(self.labels, i) for i, name in enumerate(self.class_names)}

    def subset(self, index) -> "ImageFolder":
        index = np.asarray(index, dtype=int)
        return ImageFolder(self.root, self.class_names, [self.paths[i] for i in index], self.labels[index], [])


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in ("__MACOSX", "Thumbs.db", "desktop.ini")


def list_class_folders(root: str) -> dict[str, str]:
    """``{class name: folder name}`` of the class sub-folders, sorted by class name. Class names are Unicode NFC,
    so 'pêche' typed on macOS (decomposed accents) and on Linux is one class."""
    if not os.path.isdir(root):
        raise TransferkitError(f"{root}: not a folder")
    folders = [d for d in os.listdir(root) if _visible(d) and os.path.isdir(os.path.join(root, d))]
    found: dict[str, str] = {}
    for d in sorted(folders):
        other = found.setdefault(nfc(d), d)
        if other != d:  # the same name twice, composed and decomposed: merging or dropping one would be silent
            raise TransferkitError(f"{root}: class folders {other!r} ({_form(other)}) and {d!r} ({_form(d)}) have "
                                   f"the same name in different Unicode forms; merge or rename one of them")
    return dict(sorted(found.items()))


def _form(name: str) -> str:
    return "composed, NFC" if unicodedata.is_normalized("NFC", name) else "decomposed, NFD"


def walk_files(folder: str, skipped: list[dict]):
    """Every visible file below ``folder`` in sorted order, following links to folders but never into a folder
    already walked (a link loop is reported in ``skipped`` once, not walked forever)."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            skipped.append({"path": dirpath, "reason": "folder link loop (already walked); not followed"})
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        for fname in sorted(filenames):
            if _visible(fname):
                yield os.path.join(dirpath, fname)


def scan_folder(root: str, class_names: list[str] | None = None, min_classes: int = 2) -> ImageFolder:
    """Every usable image below ``root/<class>/`` (sub-folders included). ``class_names`` fixes the class order
    (a test folder must use the training classes); a class folder it does not know is an error. A label file
    (``labels.csv``, a Hugging Face imagefolder: ``transferkit.data.labelfile``) gives the images it lists."""
    from transferkit.data import labelfile

    if labelfile.is_label_source(root):
        return labelfile.scan_label_file(root, class_names, min_classes)
    root = str(root)
    found = list_class_folders(root)
    if class_names is None:
        class_names = list(found)
        if not found:
            raise TransferkitError(f"{root}: no class sub-folders (expected {root}/<class name>/<images>)")
        if len(found) < min_classes:
            raise TransferkitError(f"{root}: only one class folder ('{class_names[0]}'); a classifier needs at least 2")
    else:
        unknown = [d for d in found if d not in class_names]
        if unknown:
            raise TransferkitError(f"{root}: class folder '{unknown[0]}' is not one of the model's classes {class_names}")
    paths, labels, skipped = [], [], []
    for label, name in enumerate(class_names):
        if name not in found:
            continue
        for path in walk_files(os.path.join(root, found[name]), skipped):
            try:
                sniff_format(path)
            except UnreadableImage as exc:
                skipped.append({"path": path, "reason": exc.reason})
                continue
            paths.append(path)
            labels.append(label)
    data = ImageFolder(root, list(class_names), paths, np.asarray(labels, dtype=np.int64), skipped)
    if not paths:
        raise TransferkitError(f"{root}: no readable images found ({len(skipped)} files skipped)")
    return data


def check_trainable(data: ImageFolder) -> None:
    """Every class must have images; one-line error naming the empty class."""
    for name, count in data.counts().items():
        if count == 0:
            raise TransferkitError(f"{os.path.join(data.root, name)}: class '{name}' has no readable images")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified (train index, validation index); each class keeps >= 1 training and >= 1 validation
    image when it has 2 or more. The same labels and seed always give the same split."""
    if not 0 < val_fraction < 1:
        raise OptionError("val_split", "must be > 0 and < 1", val_fraction)
    index = np.arange(len(labels))
    counts = np.bincount(labels)
    n_val = max(int(round(val_fraction * len(labels))), int((counts > 0).sum()))
    if (counts[counts > 0] < 2).any():
        lonely = int(np.flatnonzero((counts > 0) & (counts < 2))[0])
        raise TransferkitError(f"class #{lonely} has a single image: at least 2 per class are needed to validate")
    if n_val >= len(labels) - len(counts):
        raise TransferkitError(f"too few images ({len(labels)}) for a {val_fraction:.0%} validation split")
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(index, test_size=n_val, stratify=labels, random_state=seed, shuffle=True)
    return np.sort(train), np.sort(val)


@dataclass
class TrainingData:
    """The labelled images of a training run, split (what every stage after the scan reads), and a fingerprint
    of the files: their paths below the root and their contents."""

    root: str
    class_names: list[str]
    train_paths: list[str]
    val_paths: list[str]
    y_train: np.ndarray
    y_val: np.ndarray
    skipped: list[dict]
    fingerprint: str
    digests: dict[str, str] = field(default_factory=dict)  # path -> content hash (the feature cache's key too)
    test_source: object = None  # a label file's test rows (a LabelFile), evaluated at the end like --test-dir
    negative_paths: list[str] = field(default_factory=list)  # photos of none of the classes (train --add's
    # "unknown" rows): no class, only the novelty score's "none of these" examples (data/added.py)

    def relative(self, paths: list[str]) -> list[str]:
        return [nfc(os.path.relpath(p, self.root)) for p in paths]


def fingerprint(root: str, digests: dict[str, str]) -> str:
    """BLAKE2b over the sorted (path below ``root``, content hash) of the files: equal iff the same files."""
    h = hashlib.blake2b(digest_size=16)
    for rel, digest in sorted((nfc(os.path.relpath(p, root)), d) for p, d in digests.items()):
        h.update(f"{rel}\0{digest}\n".encode("utf-8", "surrogateescape"))  # a non-UTF-8 name keeps its bytes
    return h.hexdigest()


def split_training_folder(root: str, val_split: float, seed: int, multi_label: bool = False,
                          label_sep: str = "|") -> TrainingData:
    """Scan ``root/<class>/``, check every class has images, and split it (seeded, stratified); a label file:
    its own split where it has a split column (``labelfile.split_label_file``). ``multi_label``: a label file
    whose label cells list labels separated by ``label_sep`` (folders are single-label)."""
    from transferkit.data import labelfile

    if labelfile.is_label_source(root):
        source = labelfile.as_label_file(root)
        if multi_label:
            source = replace(source, multi_label=True, label_sep=label_sep)
        return labelfile.split_label_file(source, val_split, seed)
    if multi_label:
        raise TransferkitError(f"{root}: multi-label training reads a label file (labels.csv with a label column "
                               f"such as 'fraise pourrie{label_sep}grenade'); a class folder holds one label per photo")
    data = scan_folder(root)
    check_trainable(data)
    train_idx, val_idx = stratified_split(data.labels, val_split, seed)
    digests = {p: file_digest(p) for p in data.paths}
    return TrainingData(data.root, data.class_names, [data.paths[i] for i in train_idx],
                        [data.paths[i] for i in val_idx], data.labels[train_idx], data.labels[val_idx],
                        data.skipped, fingerprint(data.root, digests), digests)


def iterative_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train index, validation index) of a multi-label indicator matrix by iterative stratification
    (Sechidis, Tsoumakas and Vlahavas 2011): the rarest label's photos are dealt first, each to the split that
    most lacks that label, so every label keeps about ``val_fraction`` of its photos in validation. Photos
    without a label go where rows are most lacking."""
    if not 0 < val_fraction < 1:
        raise OptionError("val_split", "must be > 0 and < 1", val_fraction)
    y = np.asarray(labels, dtype=bool)
    if len(y) < 2:
        raise TransferkitError(f"too few images ({len(y)}) for a {val_fraction:.0%} validation split")
    rng = np.random.default_rng(seed)
    ratios = np.array([1 - val_fraction, val_fraction])
    rows, wanted = ratios * len(y), ratios[:, None] * y.sum(axis=0)[None, :]  # per split: rows, label counts
    side = np.full(len(y), -1)
    while (side < 0).any():
        todo = side < 0
        counts = y[todo].sum(axis=0)
        if counts.any():
            label = int(np.flatnonzero(counts == counts[counts > 0].min())[0])
            batch = rng.permutation(np.flatnonzero(todo & y[:, label]))
        else:
            label, batch = None, rng.permutation(np.flatnonzero(todo))
        for i in batch:
            need = wanted[:, label] if label is not None else rows
            best = np.flatnonzero(need == need.max())
            best = best[rows[best] == rows[best].max()]
            s = int(rng.choice(best))
            side[i], rows[s] = s, rows[s] - 1
            wanted[s] -= y[i]
    train, val = np.flatnonzero(side == 0), np.flatnonzero(side == 1)
    if not len(val) or not len(train):
        raise TransferkitError(f"too few images ({len(y)}) for a {val_fraction:.0%} validation split")
    return train, val


def label_text(class_names: list[str], label, sep: str = "|") -> str:
    """A photo's label as text: its class, or a multi-label row's labels joined by ``sep`` ("" for none)."""
    label = np.asarray(label)
    if label.ndim == 0:
        return class_names[int(label)]
    return sep.join(class_names[j] for j in np.flatnonzero(label))


def label_count(y: np.ndarray, k: int) -> int:
    """Photos of class (or with label) ``k``."""
    y = np.asarray(y)
    return int(y[:, k].sum()) if y.ndim == 2 else int((y == k).sum())


def nfc(text: str) -> str:
    """Unicode NFC form (macOS writes decomposed accents in file names)."""
    return unicodedata.normalize("NFC", text)


def expand_paths(items: list[str]) -> list[str]:
    """Files, folders (recursively, sorted), glob patterns and label files (the files they list) -> a list of
    file paths, in the order given."""
    from transferkit.data import labelfile

    paths = []
    for item in items:
        if labelfile.is_label_source(item):
            paths.extend(labelfile.listed_files(item)[0])
            continue
        item = str(item)
        if os.path.isdir(item):
            paths.extend(walk_files(item, []))
        elif os.path.exists(item):
            paths.append(item)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise TransferkitError(f"{item}: no such file, folder or matching pattern")
            paths.extend(m for m in matches if os.path.isfile(m))
    return paths
