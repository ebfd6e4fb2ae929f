"""Build a small real-photo dataset offline from the photographs scikit-image ships: each class is one
photograph, each sample a random crop of it (position, scale, flip, JPEG quality), train and test drawn apart.

    python benchmarks/make_photo_dataset.py OUT_DIR [--train 50] [--test 15]
writes OUT_DIR/train/<class>/*.jpg and OUT_DIR/test/<class>/*.jpg.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image
from skimage import data

PHOTOS = {  # class name -> scikit-image photograph (all bundled with the package)
    "chat": data.chelsea,
    "café": data.coffee,
    "fusée": data.rocket,
    "astronaute": data.astronaut,
    "brique": data.brick,
    "pièces": data.coins,
    "caméraman": data.camera,
    "hubble": data.hubble_deep_field,
}


def crop(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    img = Image.fromarray(photo)
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.35, 0.8))
    x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
    out = img.crop((x, y, x + side, y + side)).resize((224, 224), Image.Resampling.BILINEAR)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=50)
    p.add_argument("--test", type=int, default=15)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    for name, load in PHOTOS.items():
        photo = load()
        for split, n in (("train", args.train), ("test", args.test)):
            folder = os.path.join(args.out, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                crop(photo, rng).save(os.path.join(folder, f"{i:03d}.jpg"), quality=int(rng.integers(70, 95)))
    print(f"{len(PHOTOS)} classes x ({args.train} train + {args.test} test) in {args.out}")


if __name__ == "__main__":
    main()
