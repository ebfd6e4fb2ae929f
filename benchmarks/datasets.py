"""Real-photo datasets from registry packages, written as class folders (offline, deterministic), for the
benchmarks that choose defaults by measurement (quality.py).

    photos    8 scikit-image photographs (cat, coffee, rocket, astronaut, brick, coins, camera, Hubble), each class
              crops of one photograph: close to ImageNet, 40 train / 20 test per class
    textures  8 scikit-image textures and microscopy images (brick, grass, gravel, immunohistochemistry, retina,
              moon, cell, microaneurysms), small crops (5-12 % of the side): far from ImageNet, 30 train / 20 test
              per class
    digits    scikit-learn's handwritten digits (8 x 8 scans, grey, shown at 64 px): far from ImageNet, 10 classes,
              60 train / 60 test per class
    faces     scikit-image's LFW subset (25 x 25 grey): faces vs not faces, 15 train / 60 test per class

    python benchmarks/datasets.py NAME OUT_DIR     # writes OUT_DIR/train/<class>/ and OUT_DIR/test/<class>/
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

NAMES = ("photos", "textures", "digits", "faces")


def _save(images, labels, names, root: str, split: str) -> str:
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, split, names[label])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{i:04d}.png"))
    return os.path.join(root, split)


def _crops(photos: dict, per_class: int, scale: tuple[float, float], rng) -> tuple[list, list]:
    images, labels = [], []
    for k, photo in enumerate(photos.values()):
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        h, w = photo.shape[:2]
        for _ in range(per_class):
            side = int(min(h, w) * rng.uniform(*scale))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(np.ascontiguousarray(photo[y:y + side, x:x + side])).resize((128, 128))
            images.append(np.asarray(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop))
            labels.append(k)
    return images, labels


def _photo_set(photos: dict, root: str, train: int, test: int, scale) -> tuple[str, str]:
    """Train and test crops from different halves of each photograph (no crop of one is in the other)."""
    top = {k: p[: p.shape[0] // 2] for k, p in photos.items()}
    bottom = {k: p[p.shape[0] // 2:] for k, p in photos.items()}
    rng = np.random.default_rng(0)
    names = list(photos)
    return (_save(*_crops(top, train, scale, rng), names, root, "train"),
            _save(*_crops(bottom, test, scale, rng), names, root, "test"))


def write(name: str, root: str) -> tuple[str, str]:
    """Write dataset ``name`` under ``root``; returns (train folder, test folder)."""
    from skimage import data

    if name == "photos":
        photos = {"chat": data.chelsea(), "café": data.coffee(), "fusée": data.rocket(), "astronaute": data.astronaut(),
                  "brique": data.brick(), "pièces": data.coins(), "caméraman": data.camera(),
                  "hubble": data.hubble_deep_field()}
        return _photo_set(photos, root, 40, 20, (0.3, 0.7))
    if name == "textures":
        photos = {"brick": data.brick(), "grass": data.grass(), "gravel": data.gravel(),
                  "ihc": data.immunohistochemistry(), "retina": data.retina(), "moon": data.moon(),
                  "cell": data.cell(), "microaneurysms": data.microaneurysms()}
        return _photo_set(photos, root, 30, 20, (0.05, 0.12))
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = [np.asarray(Image.fromarray((x * 255 / 16).astype(np.uint8)).resize((64, 64), Image.Resampling.BILINEAR))
                  for x in digits.images]
        return _split(images, digits.target, [str(d) for d in range(10)], root, 60, 60)
    if name == "faces":
        faces = data.lfw_subset()
        images = [(x * 255).astype(np.uint8) for x in faces]
        return _split(images, np.repeat([0, 1], 100), ["visage", "autre"], root, 15, 60)
    raise SystemExit(f"unknown dataset {name!r}; one of {', '.join(NAMES)}")


def _split(images, labels, names, root: str, train: int, test: int) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    labels = np.asarray(labels)
    tr, te = [], []
    for c in range(len(names)):
        index = rng.permutation(np.flatnonzero(labels == c))
        tr += list(index[:train])
        te += list(index[train:train + test])
    return (_save([images[i] for i in tr], labels[tr], names, root, "train"),
            _save([images[i] for i in te], labels[te], names, root, "test"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=NAMES)
    p.add_argument("out")
    args = p.parse_args()
    print(write(args.name, args.out))


if __name__ == "__main__":
    main()
