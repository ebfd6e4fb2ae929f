"""Find the labelled images in a folder (one sub-folder per class, any Unicode name) and split them.

Like Keras's ``image_dataset_from_directory``: labels are the sorted sub-folder names. Unlike it, files are
recognised by content, and a file that is not a usable image is skipped and reported with its reason instead of
crashing training mid-epoch.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import train_test_split

from transferkit.errors import TransferkitError
from transferkit.images import UnreadableImage, sniff_format


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
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.class_names)}

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
    return {nfc(d): d for d in sorted(folders, key=nfc)}


def scan_folder(root: str, class_names: list[str] | None = None, min_classes: int = 2) -> ImageFolder:
    """Every usable image below ``root/<class>/`` (sub-folders included). ``class_names`` fixes the class order
    (a test folder must use the training classes); a class folder it does not know is an error."""
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
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, found[name]), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            for fname in sorted(filenames):
                if not _visible(fname):
                    continue
                path = os.path.join(dirpath, fname)
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
        raise TransferkitError(f"--val-split must be between 0 and 1, got {val_fraction}")
    index = np.arange(len(labels))
    counts = np.bincount(labels)
    n_val = max(int(round(val_fraction * len(labels))), int((counts > 0).sum()))
    if (counts[counts > 0] < 2).any():
        lonely = int(np.flatnonzero((counts > 0) & (counts < 2))[0])
        raise TransferkitError(f"class #{lonely} has a single image: at least 2 per class are needed to validate")
    if n_val >= len(labels) - len(counts):
        raise TransferkitError(f"too few images ({len(labels)}) for a {val_fraction:.0%} validation split")
    train, val = train_test_split(index, test_size=n_val, stratify=labels, random_state=seed, shuffle=True)
    return np.sort(train), np.sort(val)


def nfc(text: str) -> str:
    """Unicode NFC form (macOS writes decomposed accents in file names)."""
    return unicodedata.normalize("NFC", text)
