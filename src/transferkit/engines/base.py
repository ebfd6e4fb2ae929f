"""The prediction interface every model kind implements.

``Predictor`` is the one declared protocol: a batch of RGB images (uint8 or float, 0-255, already at the model's
square ``image_size``) -> class probabilities (n, classes), with the class names and metadata beside it. A
``.keras`` file on any engine (``engines.keras_model``), an ONNX export (``engines.onnx_model``) and a classifier
still in memory all satisfy it, so ``predict``, ``evaluate`` and the server take any of them.
This module imports no Keras: an ONNX export is predicted without TensorFlow.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Predictor(Protocol):
    """RGB 0-255 batch (n, image_size, image_size, 3) -> probabilities (n, len(class_names))."""

    class_names: list[str]
    image_size: int
    metadata: dict
    path: str

    def predict_images(self, images: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class FilePredictor(Predictor, Protocol):
    """A predictor that answers image files itself, e.g. from cached features (an ImageClassifier whose backbone
    is still the frozen one that extracted them): (probabilities, indices of ``paths`` kept, skipped files)."""

    def probabilities_for_files(self, paths: list[str], batch_size: int | None = None) -> tuple: ...
