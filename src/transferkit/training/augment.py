"""Augmented views for feature caching: random flip, rotation and zoom like Keras's RandomFlip("horizontal"),
RandomRotation(0.1) and RandomZoom(0.1) (reflect fill), but drawn from a seed made of the image's content hash and
the view number, so view k of a file is the same picture in every run and its features can be cached."""

from __future__ import annotations

import hashlib
import math

import numpy as np

ROTATION = 0.1  # fraction of a full turn, as RandomRotation(0.1): up to +-36 degrees
ZOOM = 0.1  # as RandomZoom(0.1): up to 10 % in or out
RECIPE = f"flip-h+rot{ROTATION}+zoom{ZOOM}+reflect"  # part of the feature-cache key


def view_params(digest: str, view: int) -> tuple[bool, float, float]:
    """(flip, angle in radians, zoom scale) of view ``view`` (>= 1) of the image with content hash ``digest``."""
    seed = int.from_bytes(hashlib.blake2b(f"{digest}:{view}".encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    flip = bool(rng.random() < 0.5)
    angle = float(rng.uniform(-ROTATION, ROTATION) * 2 * math.pi)
    scale = float(1.0 + rng.uniform(-ZOOM, ZOOM))
    return flip, angle, scale


def affine_for(flip: bool, angle: float, scale: float, size: int) -> list[float]:
    """The 8-number projective transform (output pixel -> input pixel) of keras.ops.image.affine_transform."""
    c = (size - 1) / 2.0
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    fx = -1.0 if flip else 1.0
    # input = C + R(angle) * scale * diag(fx, 1) * (output - C)
    a0, a1 = cos * fx, -sin
    b0, b1 = sin * fx, cos
    a2 = c - a0 * c - a1 * c
    b2 = c - b0 * c - b1 * c
    return [a0, a1, a2, b0, b1, b2, 0.0, 0.0]


def augment_batch(images: np.ndarray, digests: list[str], view: int) -> np.ndarray:
    """Apply view ``view`` to a batch of square uint8 images; returns float32 0-255."""
    import keras  # here, not at the top: a Ray worker computing views 0 only never imports TensorFlow

    size = images.shape[1]
    transforms = np.asarray([affine_for(*view_params(d, view), size) for d in digests], dtype="float32")
    out = keras.ops.image.affine_transform(
        images.astype("float32"), transforms, interpolation="bilinear", fill_mode="reflect"
    )
    return np.clip(keras.ops.convert_to_numpy(out), 0, 255)
