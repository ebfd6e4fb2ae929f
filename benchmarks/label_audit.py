"""How well the label audit finds wrong folders: 1,000 real-photo crops of 10 classes (5 scikit-image photographs,
5 textures and microscopy images: close to and far from ImageNet), 50 of them moved to a wrong class folder at
random, then ``transferkit.training.audit.audit_folder`` (frozen EfficientNet-Lite0 features at 224 px,
5-fold logistic regression, cleanlab). Prints the share of the 50 flipped files inside the audit's top 50 and
top 100, what cleanlab flags (precision, recall), how often the suggested class is the true one, and the time.

    python benchmarks/label_audit.py [--seed 0] [--scale 0.15 0.5] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from datasets import _crops  # noqa: E402  (the crops the other benchmarks use)

PER_CLASS, FLIPPED = 100, 50


def _photos() -> dict:
    from skimage import data

    return {"chat": data.chelsea(), "café": data.coffee(), "fusée": data.rocket(), "astronaute": data.astronaut(),
            "caméraman": data.camera(), "brique": data.brick(), "herbe": data.grass(), "gravier": data.gravel(),
            "lune": data.moon(), "ihc": data.immunohistochemistry()}


def write_flipped(root: str, seed: int, scale: tuple[float, float]) -> dict[str, str]:
    """The 1,000 crops in ``root/<class>/``, FLIPPED of them in a wrong folder; returns {path: true class}."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    names = list(photos)
    images, labels = _crops(photos, PER_CLASS, scale, rng)
    given = np.array(labels)
    wrong = rng.choice(len(given), FLIPPED, replace=False)
    given[wrong] = (given[wrong] + rng.integers(1, len(names), FLIPPED)) % len(names)
    flipped = {}
    for i, (image, label) in enumerate(zip(images, given)):
        folder = os.path.join(root, names[label])
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:04d}.jpg")
        Image.fromarray(image).save(path, quality=90)
        if label != labels[i]:
            flipped[path] = names[labels[i]]
    return flipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, nargs=2, default=(0.15, 0.5), help="crop side as a share of the photo's")
    p.add_argument("--work", help="folder for the images (default: a temporary one)")
    args = p.parse_args()
    from transferkit.training.audit import audit_folder

    root = args.work or tempfile.mkdtemp(prefix="label-audit-")
    flipped = write_flipped(root, args.seed, tuple(args.scale))
    t0 = time.perf_counter()
    audit = audit_folder(root)
    seconds = time.perf_counter() - t0
    ranked = [audit.paths[i] for i in audit.order]
    flagged = {r["path"] for r in audit.label_issues()}
    suggested = {r["path"]: r["suggested"] for r in audit.label_issues()}
    found = flagged & set(flipped)
    print(f"{len(audit.paths)} images, {len(flipped)} flipped labels, {len(audit.class_names)} classes "
          f"(seed {args.seed}, crops {args.scale[0]:g}-{args.scale[1]:g} of the side); out-of-fold accuracy "
          f"{audit.extra['out_of_fold_accuracy']:.1%}")
    for top in (50, 100):
        hit = len(set(ranked[:top]) & set(flipped))
        print(f"flipped labels in the audit's top {top}: {hit} / {len(flipped)} = {hit / len(flipped):.0%}")
    print(f"cleanlab flags {len(flagged)}: precision {len(found) / max(len(flagged), 1):.0%}, recall "
          f"{len(found) / len(flipped):.0%}; suggested class right for {sum(suggested[q] == flipped[q] for q in found)}"
          f" / {len(found)} found; {len(audit.outliers())} outliers")
    print(f"audit time {seconds:.1f} s (features from the cache when they are there)")


if __name__ == "__main__":
    main()
