"""Where the model looked: Grad-CAM heat maps on the backbone's last convolutional block.

Grad-CAM (Selvaraju et al., 2017) weights each channel k of the last feature map A (h x w x K) by the mean gradient
of the class logit over A_k and keeps the positive part of the weighted sum. For transferkit's default head
(global average pooling -> dropout -> a Dense on the pooled features) the logit is linear in A, every gradient is
w_ck / (h w), and Grad-CAM *is* the class activation map sum_k w_ck A_k (CAM, Zhou et al., 2016) up to a positive
factor: ``method`` says "cam" there (tests/test_explain.py checks the equality); other heads (``flatten-256-128``)
get Grad-CAM proper. Only the small tail after the feature map (pooling + head) is differentiated; the backbone
runs once, forward. Works for every registry backbone (its headless output is the last block), for fine-tuned
models (the same nested backbone, its weights moved) and for a network with its own classifier top, such as
``backbones.imagenet_classifier`` (the last feature map before its global pooling).

Measured on scikit-image's photographs through the ImageNet classifier of EfficientNet-Lite0 (224 px, 7 x 7
map): see tests/test_explain.py for the object boxes and the share of the heat map inside them.
"""

from __future__ import annotations

import keras
import numpy as np

from transferkit.errors import TransferkitError
from transferkit.models.backbones import find_backbone


def _pre_softmax(layer, x):
    """The logits of ``layer`` (a Dense with a softmax activation, or a Softmax / Activation layer) from its
    input ``x``; None for another layer."""
    activation = getattr(layer, "activation", None)
    if isinstance(layer, keras.layers.Dense) and getattr(activation, "__name__", "") == "softmax":
        return keras.ops.matmul(x, layer.kernel) + layer.bias
    if isinstance(layer, (keras.layers.Softmax, keras.layers.Activation)):
        return x
    return None


def _head_parts(model: keras.Model):
    """(image -> [feature map, logits] model, head is linear on pooled features, (image -> [feature map, head
    features] model, head features -> logits model)) for a transferkit classifier."""
    head = model.get_layer("head")
    backbone = find_backbone(model)
    feature_map = backbone._inbound_nodes[0].output_tensors[0]
    features = head._inbound_nodes[0].input_tensors[0]  # pooled (gap head) or the map itself (flatten head)
    names = [layer.name for layer in head.layers]
    if "logits" in names:  # a trusted head: features -> ... -> logits (before the temperature)
        to_logits = keras.Model(head.input, head.get_layer("logits").output, name="cam_logits")
        body, final = head.get_layer("head_body"), None
    else:  # a plain head ending in the softmax Dense "probabilities"
        final = head.get_layer("probabilities")
        hidden = keras.Model(head.input, final.input, name="cam_hidden")
        to_logits = keras.Model(head.input, _pre_softmax(final, hidden(head.input)), name="cam_logits")
        body = head
    between = [layer for layer in body.layers if not isinstance(layer, keras.layers.InputLayer) and layer is not final]
    linear = len(features.shape) == 2 and all(isinstance(layer, keras.layers.Dropout) for layer in between) \
        and features.shape[-1] == feature_map.shape[-1]  # pooled final features only: no other block's pools
    cam_model = keras.Model(model.input, [feature_map, to_logits(features)], name="cam_model")
    return cam_model, linear, (keras.Model(model.input, [feature_map, features], name="cam_forward"), to_logits)


def _top_parts(model: keras.Model):
    """The same for a network with its own classifier top (its last spatial feature map, its logits)."""
    inner = find_backbone(model)
    maps = [layer for layer in inner.layers if len(layer.output.shape) == 4 and (layer.output.shape[1] or 2) > 1]
    if not maps:
        raise TransferkitError(f"{model.name}: no convolutional feature map to explain")
    final = inner.layers[-1]
    logits = _pre_softmax(final, final.input)
    if logits is None:
        raise TransferkitError(f"{model.name}: its last layer {final.name!r} is not a softmax; cannot find logits")
    two = keras.Model(inner.input, [maps[-1].output, logits], name="cam_inner")
    outputs = two(inner._inbound_nodes[0].input_tensors[0])
    return keras.Model(model.input, outputs, name="cam_model"), False


class GradCam:
    """Heat maps of a Keras classifier: a transferkit model (``.keras`` file, fine-tuned or not) or a network with
    its own softmax top. ``heatmaps(images)`` takes RGB 0-255 batches at the model's input size. ``forward``
    (a transferkit model whose backbone is frozen): NumPy images -> (its last feature map, the head's input), on
    a faster engine than TensorFlow (``FeatureExtractor.map_forward``); only the head is then run in Keras."""

    def __init__(self, model: keras.Model, forward=None):
        self._split = None  # (image -> [map, head features], head features -> logits): see _tail
        self._forward = None  # NumPy images -> (map, head features) on a faster engine (see _tail)
        try:
            model.get_layer("head")
            self.model, linear, self._split = _head_parts(model)
            self._forward = forward
        except ValueError:
            self.model, linear = _top_parts(model)
        self.method = "cam" if linear else "grad-cam"
        self.map_shape = tuple(int(d) for d in self.model.outputs[0].shape[1:3] if d is not None)

    def heatmaps(self, images: np.ndarray, classes=None, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(maps (n, h, w) of the last feature map, each scaled to max 1 (all zeros where nothing is positive),
        the class each explains): ``classes`` (n,) or None for the top logit's class."""
        images = np.asarray(images, np.float32)
        maps, chosen = [], []
        for start in range(0, len(images), batch_size):
            wanted = None if classes is None else np.asarray(classes[start:start + batch_size], np.int64)
            m, c = self._batch(images[start:start + batch_size], wanted)
            maps.append(m)
            chosen.append(c)
        if not maps:
            return np.zeros((0,) + self.map_shape, np.float32), np.zeros(0, np.int64)
        return np.concatenate(maps), np.concatenate(chosen)

    def _tail(self, x, tape):
        """(feature map, logits) with only the head recorded on ``tape``: the backbone runs forward outside it,
        and the head's input is rebuilt from the map (its first columns are the map's average pool; the other
        blocks' pools, which the map does not change, are taken as computed). With the whole forward pass on the
        tape, the gradient walked back through the backbone too: 12 photos at 224 px took 1.03 s, against 0.35 s
        for the forward pass alone. None where the head's input is not laid out so."""
        import tensorflow as tf

        forward, to_logits = self._split
        with tape.stop_recording():
            if self._forward is not None:  # the frozen backbone's engines (FeatureExtractor.map_forward)
                feature_map, features = (tf.convert_to_tensor(a) for a in self._forward(x.numpy()))
            else:
                feature_map, features = forward(x, training=False)
        if len(features.shape) == 4:  # the flatten head reads the map itself
            tape.watch(feature_map)
            return feature_map, to_logits(feature_map, training=False)
        channels = int(feature_map.shape[-1])
        pooled = tf.reduce_mean(feature_map, axis=(1, 2))
        if not np.allclose(pooled.numpy(), features[:, :channels].numpy(), rtol=1e-4, atol=1e-4):
            if self._forward is not None:  # the engines disagree with each other: the Keras forward pass instead
                self._forward = None
                return self._tail(x, tape)
            self._split = None  # not the layout assumed: differentiate the whole model instead
            return None
        tape.watch(feature_map)
        rebuilt = tf.concat([tf.reduce_mean(feature_map, axis=(1, 2)), features[:, channels:]], axis=1)
        return feature_map, to_logits(rebuilt, training=False)

    def _batch(self, images: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf

        x = tf.convert_to_tensor(images)
        with tf.GradientTape() as tape:
            found = self._tail(x, tape) if self._split is not None else None
            feature_map, logits = found if found is not None else self.model(x, training=False)
            chosen = tf.argmax(logits, axis=1) if classes is None else tf.constant(classes)
            score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
        grads = tape.gradient(score, feature_map)  # each image's score depends on its own map only
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1)).numpy().astype(np.float64)
        peak = cam.reshape(len(cam), -1).max(axis=1)
        cam = cam / np.where(peak > 0, peak, 1.0)[:, None, None]
        return cam.astype(np.float32), chosen.numpy().astype(np.int64)


def upsample(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
    """A heat map (h, w) resized bilinearly to (height, width), as the model squashed the photo (values in 0-1)."""
    from PIL import Image

    image = Image.fromarray(np.asarray(heatmap, np.float32), mode="F")
    return np.clip(np.asarray(image.resize((int(width), int(height)), Image.Resampling.BILINEAR)), 0.0, 1.0)
