"""An exported ONNX classifier as a ``Predictor``, run by onnxruntime alone (no TensorFlow, no Keras), so
`transferkit predict` and `evaluate` take an export exactly as they take the ``.keras`` file."""

from __future__ import annotations

import json
import os

import numpy as np

from transferkit.errors import TransferkitError


class OnnxPredictor:
    """An ONNX classifier exported by transferkit, with the class names and metadata embedded in it."""

    def __init__(self, session, class_names: list[str], image_size: int, metadata: dict, path: str = ""):
        self.session, self.class_names, self.image_size = session, list(class_names), int(image_size)
        self.metadata, self.path = metadata, path

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of RGB 0-255 images (n, size, size, 3)."""
        feed = {self.session.get_inputs()[0].name: np.asarray(images, dtype=np.float32)}
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


def load_onnx(path: str) -> OnnxPredictor:
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
    return OnnxPredictor(session, list(metadata["class_names"]), size, metadata, path)
