"""An exported ONNX classifier as a ``Predictor``, run by onnxruntime alone (no TensorFlow, no Keras), so
`transferkit predict` and `evaluate` take an export exactly as they take the ``.keras`` file."""

from __future__ import annotations

import json
import os

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.runs import check_model_metadata


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
    try:
        metadata = json.loads(raw)
    except ValueError:
        raise TransferkitError(f"{path}: damaged transferkit metadata (not JSON)") from None
    size = _input_size(path, session)
    outputs = session.get_outputs()
    if len(outputs) != 1 or len(outputs[0].shape) != 2:
        raise TransferkitError(f"{path}: not a transferkit export (expected one (batch, classes) output)")
    n_out = outputs[0].shape[-1] if isinstance(outputs[0].shape[-1], int) else None
    return OnnxPredictor(session, check_model_metadata(path, metadata, n_out), size, metadata, path)


def _input_size(path: str, session) -> int:
    """The fixed square size of an export's one image input (batch, size, size, 3)."""
    inputs = session.get_inputs()
    shape = inputs[0].shape if len(inputs) == 1 else None
    if not shape or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or not isinstance(shape[1], int):
        raise TransferkitError(f"{path}: not a transferkit export (expected one (batch, size, size, 3) image "
                               f"input, found {[i.shape for i in inputs]})")
    return int(shape[1])
