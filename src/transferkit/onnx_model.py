"""Run an exported ONNX model with onnxruntime alone (no TensorFlow, no Keras): the same interface as a loaded
``.keras`` model, so `transferkit predict` and `evaluate` take either."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from transferkit.errors import TransferkitError


@dataclass
class OnnxModel:
    """An ONNX classifier exported by transferkit, with the class names and metadata embedded in it."""

    session: object
    class_names: list[str]
    image_size: int
    metadata: dict = field(default_factory=dict)
    path: str = ""

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of RGB 0-255 images (n, size, size, 3)."""
        feed = {self.session.get_inputs()[0].name: np.asarray(images, dtype=np.float32)}
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


def load_onnx(path: str) -> OnnxModel:
    try:
        import onnxruntime as ort
    except ImportError:
        raise TransferkitError("running an .onnx model needs onnxruntime: pip install 'transferkit[export]'") from None
    if not os.path.isfile(path):
        raise TransferkitError(f"{path}: model file not found")
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a bad file
        raise TransferkitError(f"{path}: cannot load the ONNX model ({str(exc).splitlines()[0]})") from None
    raw = session.get_modelmeta().custom_metadata_map.get("transferkit")
    if raw is None:
        raise TransferkitError(f"{path}: not a transferkit export (no class names inside)")
    metadata = json.loads(raw)
    size = int(session.get_inputs()[0].shape[1])
    return OnnxModel(session, list(metadata["class_names"]), size, metadata, path)
