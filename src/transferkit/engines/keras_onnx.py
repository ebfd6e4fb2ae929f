"""A Keras model as an ONNX file (Keras's own ``model.export(format="onnx")``), past the traps of its converter.

- A model never called cannot be exported: it is called once on zeros first.
- Keras's ``Normalization`` layer (the stem of the EfficientNet B* applications) keeps its adapted mean and
  variance as eager tensors, which the converter turns into extra graph *inputs* that no runtime feeds. During
  the export the layer reads its (identical) variables instead, which the converter freezes into constants.
- tf2onnx's graph optimizer deep-copies the whole graph before each of its passes (a dozen, several rounds), and
  each copy, a reference cycle, waited for Python's rare full collection: converting the Lite0 classifier peaked
  at 2.7 GB, 1.6 GB of it dead copies, and took 15 s. The previous copy is now collected before each pass, with
  the objects that existed before the conversion frozen out of the collector (``gc.freeze``), so that each
  collection walks only the new ones: 1.27 GB and 8.4 s (the peak is then TensorFlow itself, 650 MB, and the frozen
  graph; ``benchmarks/conversion_memory.py``).
- Keras's tf2onnx module tests ``hasattr(np, "object")``, which NumPy 2 answers with a FutureWarning at every
  process's first conversion: that one warning, from that module, is filtered during the export.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import threading
import types
import warnings
from typing import Iterator

import keras
import numpy as np

from transferkit.errors import TransferkitError

_ONE_EXPORT = threading.Lock()


def _all_layers(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    yield layer
    for child in getattr(layer, "layers", []):
        yield from _all_layers(child)


@contextlib.contextmanager
def _normalization_reads_variables(model: keras.Model):
    swapped = []
    for layer in _all_layers(model):
        adapted = isinstance(layer, keras.layers.Normalization) and layer.input_mean is None and layer.built
        # the variables have the layer's reduced shape; they broadcast like the tensors when only the last axis is kept
        if adapted and all(d == 1 for d in layer._broadcast_shape[:-1]):
            swapped.append((layer, layer.mean, layer.variance))
            layer.mean, layer.variance = layer.adapt_mean, layer.adapt_variance
    try:
        yield
    finally:
        for layer, mean, variance in swapped:
            layer.mean, layer.variance = mean, variance


@contextlib.contextmanager
def _dead_copies_collected():
    """tf2onnx's optimizer with each pass's garbage (the previous deep copy of the graph) collected before the
    next copy is made, and the collector walking only what the conversion created."""
    import tf2onnx.optimizer as passes

    def deepcopy(graph):
        gc.collect()
        return copy.deepcopy(graph)

    original = getattr(passes, "copy", None)
    with _ONE_EXPORT:  # the patch and the frozen generation are the process's: one conversion at a time
        gc.collect()
        gc.freeze()
        if original is copy:  # a tf2onnx that copies otherwise converts as it comes
            passes.copy = types.SimpleNamespace(deepcopy=deepcopy)
        try:
            yield
        finally:
            if original is copy:
                passes.copy = original
            gc.unfreeze()


def save_onnx(model: keras.Model, path: str | os.PathLike) -> None:
    """Write ``model`` (fixed input shape) to ``path`` as ONNX with exactly one graph input."""
    model(np.zeros((1,) + tuple(model.input.shape[1:]), "float32"))
    with _normalization_reads_variables(model), _dead_copies_collected(), warnings.catch_warnings():
        # (inside the export lock: no other conversion's warnings filters to lose)
        warnings.filterwarnings("ignore", message=r"In the future `np\.object` will be defined",
                                category=FutureWarning, module=r"keras\.src\.export\.tf2onnx_lib")
        model.export(str(path), format="onnx", verbose=False)
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in constants]
    if len(inputs) != 1:
        raise TransferkitError(f"{path}: the ONNX export has {len(inputs)} inputs ({', '.join(inputs)})")
