"""The feature cache's layout: one checksummed ``.npy`` file per image (by content hash) and view, below a folder
named by the backbone, weights, size, depths, precision and augmentation recipe (``features.FeatureExtractor``).
Kept apart from ``features`` so that a Ray worker can write entries without importing Keras."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from transferkit.files import write_checked


def cache_file(root: Path, digest: str, view: int) -> Path:
    """Where the cache under ``root`` keeps the feature of view ``view`` of the image whose hash is ``digest``."""
    return Path(root) / digest[:2] / f"{digest}-v{view}.npy"


def store_feature(root: Path, digest: str, view: int, feature: np.ndarray, dtype) -> None:
    """One cache entry under ``root`` (an .npy file with a checksum trailer, written atomically)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(feature).astype(dtype), allow_pickle=False)
    write_checked(cache_file(root, digest, view), buffer.getvalue())
