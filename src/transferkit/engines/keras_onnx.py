"""A Keras model as an ONNX file (Keras's own ``model.export(format="onnx")``), past the traps of its converter.

- A model never called cannot be exported: it is called once on zeros first.
- Keras's ``Normalization`` layer (the stem of the EfficientNet B* applications) keeps its adapted mean and
  variance as eager tensors, which the converter turns into extra graph *inputs* that no runtime feeds. During
  the export the layer reads its (identical) variables instead, which the converter freezes into constants.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import keras
import numpy as np

from transferkit.errors import TransferkitError


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


def save_onnx(model: keras.Model, path: str | os.PathLike) -> None:
    """Write ``model`` (fixed input shape) to ``path`` as ONNX with exactly one graph input."""
    model(np.zeros((1,) + tuple(model.input.shape[1:]), "float32"))
    with _normalization_reads_variables(model):
        model.export(str(path), format="onnx", verbose=False)
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in constants]
    if len(inputs) != 1:
        raise TransferkitError(f"{path}: the ONNX export has {len(inputs)} inputs ({', '.join(inputs)})")
