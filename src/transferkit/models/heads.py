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
    return "avg" if kind == "gap" else None


def build_head(kind: str, feature_shape: tuple, n_classes: int, dropout: float = 0.2) -> keras.Model:
    """``gap``: (pooled features) -> Dropout -> Dense(softmax), the default;
    ``flatten-256-128``: (feature map) -> Flatten -> Dense 256 -> Dense 128 -> Dense(softmax), the seed's head."""
    head_pooling(kind)
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    if kind == "gap":
        x = layers.Dropout(dropout, name="head_dropout")(inputs)
    else:
        x = layers.Flatten(name="head_flatten")(inputs)
        x = layers.Dense(256, activation="relu", name="head_dense_256")(x)
        x = layers.Dropout(dropout, name="head_dropout")(x)
        x = layers.Dense(128, activation="relu", name="head_dense_128")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="head")
