"""Multi-label photos for the tests: 2 x 2 mosaics whose tiles are crops of scikit-image photographs. Each label
is one photograph; a mosaic carries the labels of the photographs in its tiles (none, one, two or three), the
other tiles are crops of a photograph that is no label. Only a backbone that sees the photographs tells the
labels apart: the tiles are small and anywhere."""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

from photos import photo_crop

LABELS = ("chat", "café", "fusée", "astronaute")  # photos.PHOTOS 3, 4, 5, 6
LABEL_PHOTOS = (3, 4, 5, 6)
FILLER = 10  # grass: in no label
TILE = (48, 40)  # (width, height) of a tile: mosaics of 96 x 80


def mosaic(labels: list[int], rng: np.random.Generator) -> np.ndarray:
    """A 2 x 2 mosaic with a tile of each label in ``labels`` (indices into LABELS), filler elsewhere."""
    kinds = [LABEL_PHOTOS[k] for k in labels] + [FILLER] * (4 - len(labels))
    kinds = [kinds[i] for i in rng.permutation(4)]
    tiles = [photo_crop(k, rng, size=TILE) for k in kinds]
    return np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)


def write_mosaics(root, n: int, seed: int, name: str = "labels.csv", sep: str = "|") -> str:
    """``root/images/m_NNN.jpg`` and ``root/<name>`` (path, label: the labels joined by ``sep``, maybe empty)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        count = int(rng.choice([0, 1, 1, 2, 2, 3]))
        labels = sorted(rng.choice(len(LABELS), size=count, replace=False).tolist())
        path = f"images/m_{seed}_{i:03d}.jpg"
        Image.fromarray(mosaic(labels, rng)).save(os.path.join(root, path), "JPEG", quality=90)
        rows.append((path, sep.join(LABELS[k] for k in labels)))
    table = os.path.join(root, name)
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return table
