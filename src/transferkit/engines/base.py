"""The prediction interface every model kind implements, and the two Keras helpers the engines share.

``Predictor`` is the one declared protocol: a batch of RGB images (uint8 or float, 0-255, already at the model's
square ``image_size``) -> class probabilities (n, classes), with the class names and metadata beside it. A
``.keras`` file on any engine (``engines.keras_model``), an ONNX export (``engines.onnx_model``) and a classifier
still in memory all satisfy it, so ``predict``, ``evaluate`` and the server take any of them.

``run_model`` pads a batch to a power of two so that a stream of odd-sized batches traces a handful of graphs
instead of one per size.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import keras
import numpy as np


@runtime_checkable
class Predictor(Protocol):
    """RGB 0-255 batch (n, image_size, image_size, 3) -> probabilities (n, len(class_names))."""

    class_names: list[str]
    image_size: int
    metadata: dict
    path: str

    def predict_images(self, images: np.ndarray) -> np.ndarray: ...


def run_model(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """``model`` on ``images`` (inference mode), as float32 numpy."""
    images = np.asarray(images, dtype="float32")
    n = len(images)
    if n == 0:
        return np.zeros((0,) + tuple(model.output.shape[1:]), dtype="float32")
    bucket = 1 << (n - 1).bit_length()
    if bucket != n:
        images = np.concatenate([images, np.zeros((bucket - n,) + images.shape[1:], dtype="float32")])
    return np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(images)))[:n]


def without_resize(model: keras.Model, size: int) -> keras.Model:
    """``model`` minus its leading resize layer: input (batch, size, size, 3) RGB 0-255. Exports and the fast
    runtimes take this fixed shape; callers resize first, as every transferkit pipeline does."""
    inputs = keras.Input((size, size, 3), name="image")
    x = inputs
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or layer.name == "resize":
            continue
        x = layer(x)
    fixed = keras.Model(inputs, x, name=f"{model.name}_fixed")
    fixed(np.zeros((1, size, size, 3), "float32"))  # built and called once (Keras's ONNX export needs that)
    return fixed
