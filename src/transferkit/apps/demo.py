"""The embedded default job: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, shipped inside the
package, so nothing is downloaded) written out as one folder per class, then train -> evaluate -> report."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

CLASS_NAMES = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"]  # accents on purpose


def write_digits(root: str, test_fraction: float = 0.25, seed: int = 0) -> tuple[str, str]:
    """Write the digits as PNGs under ``root/train/<class>/`` and ``root/test/<class>/``; returns both folders."""
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    idx_train, idx_test = train_test_split(np.arange(len(images)), test_size=test_fraction,
                                           stratify=digits.target, random_state=seed)
    for split, index in (("train", idx_train), ("test", idx_test)):
        for i in index:
            folder = os.path.join(root, split, CLASS_NAMES[digits.target[i]])
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"digit_{i:04d}.png")
            if not os.path.exists(path):
                Image.fromarray(images[i], "L").save(path)
    return os.path.join(root, "train"), os.path.join(root, "test")


def run_demo(data_root: str = "demo_data", out: str = os.path.join("runs", "demo")) -> dict:
    """Train the offline default backbone on the digits, evaluate the saved model file, print the report."""
    from transferkit.api import evaluate
    from transferkit.classifier import ImageClassifier
    from transferkit.reports.metrics import text_report

    train_dir, test_dir = write_digits(data_root)
    # 8x8 scans: 96 px is plenty; rotation/flip would turn a 6 into a 9, so no augmented views here.
    clf = ImageClassifier(image_size=96, augment_views=0, epochs=40).fit(train_dir, out=out)
    metrics = evaluate(clf.model_path_, test_dir, out=out)  # the saved file, as a user would evaluate it
    print(text_report(metrics))
    print(f"\nmodel: {clf.model_path_}  test accuracy: {metrics['accuracy']:.4f}")
    return metrics
