"""Classification heads trained on cached backbone features."""

from __future__ import annotations

import keras
from keras import layers

from transferkit.errors import TransferkitError
from transferkit.options import HEADS


def head_pooling(kind: str) -> str | None:
    """What the feature extractor must output for this head: pooled vectors, or the last feature map."""
    if kind not in HEADS:
        raise TransferkitError(f"unknown head '{kind}'; choose one of {', '.join(HEADS)}")
    return None if kind == "flatten-256-128" else "avg"


def first_columns(x, keep: int | None):
    """The first ``keep`` features of (batch, features) ``x``, in built-in layers (every export runs them): the
    features of fewer depths are a prefix of a multi-depth vector."""
    total = int(x.shape[-1])
    if keep is None or keep >= total:
        return x
    x = layers.Reshape((total, 1), name="depth_columns")(x)
    x = layers.Cropping1D((0, total - keep), name="depth_crop")(x)
    return layers.Reshape((keep,), name="depth_features")(x)


def build_head(kind: str, feature_shape: tuple, n_classes: int, dropout: float = 0.2,
               keep: int | None = None, activation: str = "softmax") -> keras.Model:
    """``gap``: (pooled features) -> Dropout -> Dense(softmax); ``flatten-256-128``: (feature map) -> Flatten ->
    Dense 256 -> Dense 128 -> Dense(softmax), the seed's head. ``keep``: read only the first ``keep`` features;
    ``activation``: the task's output (``tasks``).
    (``logistic`` heads are built by :func:`logistic_head` from a fitted scikit-learn model.)"""
    head_pooling(kind)
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    if kind in ("gap", "auto"):
        x = layers.Dropout(dropout, name="head_dropout")(first_columns(inputs, keep))
    else:
        x = layers.Flatten(name="head_flatten")(inputs)
        x = layers.Dense(256, activation="relu", name="head_dense_256")(x)
        x = layers.Dropout(dropout, name="head_dropout")(x)
        x = layers.Dense(128, activation="relu", name="head_dense_128")(x)
    outputs = layers.Dense(n_classes, activation=activation, name="probabilities")(x)
    return keras.Model(inputs, outputs, name="head")


def logistic_head(n_features: int, keep: int, mean, variance, coef, intercept,
                  activation: str = "softmax") -> keras.Model:
    """A fitted standardised logistic regression as Keras layers: features -> the first ``keep`` -> standardised
    -> Dense(softmax) with its coefficients. The standardisation is a frozen BatchNormalization holding the mean
    and variance as weights (a Normalization layer given them keeps eager tensors that the ONNX export turns into
    extra graph inputs); frozen, it stays in inference mode through fine-tuning."""
    import numpy as np

    epsilon = 1e-10  # BatchNormalization divides by sqrt(variance + epsilon): the stored variance is less it
    inputs = keras.Input(shape=(n_features,), name="features")
    standardise = layers.BatchNormalization(epsilon=epsilon, name="head_standardise")
    x = standardise(first_columns(inputs, keep))
    final = layers.Dense(len(intercept), activation=activation, name="probabilities")
    head = keras.Model(inputs, final(x), name="head")
    variance = np.maximum(np.asarray(variance, "float64") - epsilon, 0.0)
    standardise.set_weights([np.ones(keep, "float32"), np.zeros(keep, "float32"), np.asarray(mean, "float32"),
                             variance.astype("float32")])
    standardise.trainable = False
    final.set_weights([np.asarray(coef, "float32").T, np.asarray(intercept, "float32")])
    return head
