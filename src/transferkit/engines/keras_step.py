"""Running a Keras model on numpy batches, the way every Keras path in transferkit does.

``run_model`` pads a batch to a power of two so that a stream of odd-sized batches traces a handful of graphs
instead of one per size; ``without_resize`` gives the fixed-input model that exports and the fast runtimes take.
"""

from __future__ import annotations

import keras
import numpy as np


def _convolutional(model) -> bool:
    """True for a model with a convolution anywhere inside it (a backbone), False for a head on features."""
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) or _convolutional(layer):
            return True
    return False


def run_model(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """``model`` on ``images`` (inference mode), as float32 numpy. A head on features (no convolution) is called
    eagerly: ``predict_on_batch`` traced a graph per new head and batch size, 0.1-0.25 s each, several per
    ``train``, for a few matrix products."""
    images = np.asarray(images, dtype="float32")
    n = len(images)
    if n == 0:
        return np.zeros((0,) + tuple(model.output.shape[1:]), dtype="float32")
    if not _convolutional(model):
        return np.asarray(keras.ops.convert_to_numpy(model(images, training=False)), dtype="float32")
    bucket = 1 << (n - 1).bit_length()
    if bucket != n:
        images = np.concatenate([images, np.zeros((bucket - n,) + images.shape[1:], dtype="float32")])
    return np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(images)))[:n]


def without_resize(model: keras.Model, size: int, call: bool = True) -> keras.Model:
    """``model`` minus its leading resize layer: input (batch, size, size, 3) RGB 0-255. Exports and the fast
    runtimes take this fixed shape; callers resize first, as every transferkit pipeline does. The graph is
    replayed from a fixed-size input with the resize as identity (a multi-depth extractor is no chain), in
    4 ms; ``call``: then run once on zeros, as the exporters need (0.16-0.26 s for Lite0: an engine whose
    conversion is cached skips it; ``save_onnx`` makes the call itself)."""
    inputs = keras.Input((size, size, 3), name="image")
    outputs = model._run_through_graph(  # Keras's functional replay; the one private call, pinned by the tests
        inputs, operation_fn=lambda op: (lambda x, **_: x) if op.name == "resize" else op)
    fixed = keras.Model(inputs, outputs, name=f"{model.name}_fixed")
    if call:
        fixed(np.zeros((1, size, size, 3), "float32"))
    return fixed
