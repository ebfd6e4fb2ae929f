"""Real photographs for the tests: random crops of the photos scikit-image ships (bundled with the package, so
offline). Each class is one photograph and each sample a crop of it (position, scale, flip, JPEG quality), as
benchmarks/make_photo_dataset.py does at full size; here the crops are small, for speed.

Unlike colour-coded synthetic shapes, these are only told apart by a backbone that sees what it was trained to see:
broken preprocessing or random weights lose accuracy on them (tests/test_pipeline.py measures it)."""

from __future__ import annotations

import functools

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
