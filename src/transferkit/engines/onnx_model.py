"""An exported ONNX classifier as a ``Predictor``, run by onnxruntime alone (no TensorFlow, no Keras), so
`transferkit predict` and `evaluate` take an export exactly as they take the ``.keras`` file."""

from __future__ import annotations

import json
import os

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.engines.runtimes import thread_limit
from transferkit.runs import check_model_metadata


class OnnxPredictor:
    """An ONNX classifier exported by transferkit, with the class names and metadata embedded in it."""

    def __init__(self, session, class_names: list[str], image_size: int, metadata: dict, path: str = "",
                 run=None):
        self.session, self.class_names, self.image_size = session, list(class_names), int(image_size)
        self.metadata, self.path = metadata, path
        self._run = run  # another runtime's function on the same file (OpenVINO); None: the session's

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of RGB 0-255 images (n, size, size, 3)."""
        images = np.asarray(images, dtype=np.float32)
        if self._run is not None:
            return np.asarray(self._run(images), dtype=np.float32)
        feed = {self.session.get_inputs()[0].name: images}
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


def load_onnx(path: str, runtime: str = "auto") -> OnnxPredictor:
    """An export on onnxruntime (``auto`` where installed) or OpenVINO fp32 (the default install's runtime);
    the class names and metadata are read by onnx's own reader either way."""
    from transferkit.engines.runtimes import installed

    if runtime == "openvino" or (runtime == "auto" and not installed("onnxruntime")):
        return _load_openvino(path)
    try:
        import onnxruntime as ort
    except ImportError:
        raise TransferkitError("runtime onnxruntime is not installed: pip install 'transferkit[fast]'") from None
    if not os.path.isfile(path):
        raise TransferkitError(f"{path}: model file not found")
    try:
        options = ort.SessionOptions()
        if thread_limit():
            options.intra_op_num_threads = thread_limit()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a bad file
        raise TransferkitError(f"{path}: cannot load the ONNX model ({str(exc).splitlines()[0]})") from None
    metadata = _metadata(path, session.get_modelmeta().custom_metadata_map.get("transferkit"))
    size = _input_size(path, session)
    outputs = session.get_outputs()
    if len(outputs) != 1 or len(outputs[0].shape) != 2:
        raise TransferkitError(f"{path}: not a transferkit export (expected one (batch, classes) output)")
    n_out = outputs[0].shape[-1] if isinstance(outputs[0].shape[-1], int) else None
    return OnnxPredictor(session, check_model_metadata(path, metadata, n_out), size, metadata, path)


def _metadata(path: str, raw: str | None) -> dict:
    """The transferkit metadata an export carries (its class names), or one line saying what is wrong."""
    if raw is None:
        raise TransferkitError(f"{path}: not a transferkit export (no class names inside)")
    try:
        return json.loads(raw)
    except ValueError:
        raise TransferkitError(f"{path}: damaged transferkit metadata (not JSON)") from None


def _input_size(path: str, session) -> int:
    """The fixed square size of an export's one image input (batch, size, size, 3)."""
    inputs = session.get_inputs()
    shape = inputs[0].shape if len(inputs) == 1 else None
    if not shape or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or not isinstance(shape[1], int):
        raise TransferkitError(f"{path}: not a transferkit export (expected one (batch, size, size, 3) image "
                               f"input, found {[i.shape for i in inputs]})")
    return int(shape[1])


def _load_openvino(path: str) -> OnnxPredictor:
    from transferkit.engines.runtimes import openvino_run

    if not os.path.isfile(path):
        raise TransferkitError(f"{path}: model file not found")
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
        run = openvino_run(path, "fp32", cache_compiled=False)  # a user's file: nothing of it kept in the cache
    except Exception as exc:  # onnx and OpenVINO raise their own types for a bad file
        raise TransferkitError(f"{path}: cannot load the ONNX model ({str(exc).splitlines()[0][:300]})") from None
    metadata = _metadata(path, {p.key: p.value for p in proto.metadata_props}.get("transferkit"))
    inputs = [i for i in proto.graph.input if i.name not in {init.name for init in proto.graph.initializer}]
    dims = [d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else []
    if len(dims) != 4 or dims[3] != 3 or dims[1] != dims[2] or not dims[1]:
        raise TransferkitError(f"{path}: not a transferkit export (expected one (batch, size, size, 3) image input)")
    outputs = proto.graph.output
    n_out = outputs[0].type.tensor_type.shape.dim[-1].dim_value if len(outputs) == 1 else 0
    if len(outputs) != 1 or len(outputs[0].type.tensor_type.shape.dim) != 2:
        raise TransferkitError(f"{path}: not a transferkit export (expected one (batch, classes) output)")
    return OnnxPredictor(None, check_model_metadata(path, metadata, n_out or None), int(dims[1]), metadata, path,
                         run=run)
