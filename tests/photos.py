"""Real photographs for the tests: random crops of the photos scikit-image ships (bundled with the package, so
offline). Each class is one photograph and each sample a crop of it (position, scale, flip, JPEG quality), as
benchmarks/make_photo_dataset.py does at full size; here the crops are small, for speed.

Unlike colour-coded synthetic shapes, these are only told apart by a backbone that sees what it was trained to see:
broken preprocessing or random weights lose accuracy on them (tests/test_pipeline.py measures it)."""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image
from skimage import data

# Class k of a written dataset is crops of PHOTOS[k]. The first three (the tests' three classes) are grey
# photographs, so no colour tells them apart: of the triples measured, the one where images/255 preprocessing and
# random weights lose the most while the correct pipeline stays at 1.0 (tests/test_pipeline.py).
PHOTOS = ("camera", "coins", "page", "chelsea", "coffee", "rocket", "astronaut", "immunohistochemistry",
          "hubble_deep_field", "brick", "grass", "gravel", "moon", "text", "clock", "cell")
CROP_SIZE = (80, 64)  # (width, height): small files, not square, so the model's own resize is exercised


@functools.lru_cache(maxsize=None)
def photograph(name: str) -> np.ndarray:
    """One scikit-image photograph as an RGB uint8 array (grey ones repeated over three channels)."""
    photo = getattr(data, name)()
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    photo = np.ascontiguousarray(photo[..., :3])
    photo.setflags(write=False)
    return photo


def photo_crop(kind: int, rng: np.random.Generator, size=CROP_SIZE) -> np.ndarray:
    """A random crop of photograph ``kind`` (index into PHOTOS): 35-80 % of its shorter side, anywhere in it,
    resized to ``size`` (width, height) and mirrored half of the time; an RGB uint8 array."""
    if kind >= len(PHOTOS):
        raise ValueError(f"only {len(PHOTOS)} photographs to make classes of, asked for class {kind}")
    img = Image.fromarray(photograph(PHOTOS[kind]))
    w, h = img.size
    out_w, out_h = size
    cw = int(min(w, h * out_w / out_h) * rng.uniform(0.35, 0.8))
    ch = int(round(cw * out_h / out_w))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x, y, x + cw, y + ch)).resize((out_w, out_h), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def levelled_grey_crop(kind: int, rng: np.random.Generator) -> np.ndarray:
    """``photo_crop`` made grey and levelled to one brightness and contrast (mean 128, standard deviation 45): only
    the content (shapes, texture) tells these classes apart, never their colour or exposure."""
    grey = photo_crop(kind, rng).astype(np.float64).mean(axis=-1)
    grey = (grey - grey.mean()) / (grey.std() + 1e-6) * 45 + 128
    return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


# Channel orders of one colour photograph (chelsea, a ginger cat): the same content in each class, so only the
# colours tell them apart, and a pipeline that swaps red and blue when it predicts turns "natural" into "swapped".
CHANNEL_ORDERS = {"natural": (0, 1, 2), "swapped": (2, 1, 0), "rolled": (1, 2, 0)}


def channel_crop(order: str, rng: np.random.Generator) -> np.ndarray:
    """A ``photo_crop`` of chelsea with its channels in CHANNEL_ORDERS[order]."""
    return np.ascontiguousarray(photo_crop(PHOTOS.index("chelsea"), rng)[..., list(CHANNEL_ORDERS[order])])


def write_crops(folder, names, per_photo: int, seed: int, quality: int | None = 90) -> list[str]:
    """``folder/<name>_<i>.jpg``: ``per_photo`` crops of each named photograph (photos that are none of a model's
    classes, say); JPEG ``quality``, or 70-94 drawn from the same generator where None. Returns their paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in names:
        for i in range(per_photo):
            path = os.path.join(folder, f"{name}_{i}.jpg")
            crop = photo_crop(PHOTOS.index(name), rng)
            Image.fromarray(crop).save(path, "JPEG", quality=int(rng.integers(70, 95)) if quality is None else quality)
            paths.append(path)
    return paths


def write_classes(root, make: dict, per_class: int, seed: int) -> str:
    """``root/<class>/photo_NNN.jpg`` for each class name -> ``make[name](rng)`` (an RGB uint8 array); JPEG quality
    70-94, as conftest.write_dataset."""
    rng = np.random.default_rng(seed)
    for name, crop in make.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(crop(rng)).save(os.path.join(root, name, f"photo_{i:03d}.jpg"), "JPEG",
                                            quality=int(rng.integers(70, 95)))
    return str(root)
