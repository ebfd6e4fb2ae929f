"""One ``.keras`` file = resize + preprocessing + backbone + head, plus class names and metadata.

The metadata rides inside the same zip as ``transferkit.json`` (Keras ignores files it does not know, so plain
``keras.models.load_model`` still opens the model). The input size and scaling are layers of the model, so a
prediction cannot use another resize, scaling or class order than training did.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field

import keras

from transferkit.errors import TransferkitError
from transferkit.files import atomic_path

METADATA_NAME = "transferkit.json"


def assemble(extractor: keras.Model, head: keras.Model) -> keras.Model:
    """The deployable classifier: raw RGB 0-255 of any size -> class probabilities."""
    return keras.Model(extractor.input, head(extractor.output), name="transferkit_classifier")


def save(model: keras.Model, path: str, metadata: dict) -> str:
    """Write model + metadata to ``path`` atomically (a crash leaves the previous file, never half a file)."""
    if not str(path).endswith(".keras"):
        raise TransferkitError(f"{path}: the model file name must end in .keras")
    with atomic_path(path, suffix=".keras") as tmp:
        os.unlink(tmp)
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(METADATA_NAME, json.dumps(metadata, indent=2, ensure_ascii=False))
    return str(path)


@dataclass
class ModelFile:
    """What a ``.keras`` model file holds: the Keras classifier and what it knows about itself."""

    keras_model: keras.Model
    class_names: list[str]
    image_size: int
    metadata: dict = field(default_factory=dict)
    path: str = ""


def read_metadata(path: str) -> dict:
    """The transferkit metadata stored in a model file."""
    try:
        with zipfile.ZipFile(path) as zf:
            if METADATA_NAME not in zf.namelist():
                raise TransferkitError(f"{path}: not a transferkit model file (no {METADATA_NAME} inside)")
            return json.loads(zf.read(METADATA_NAME).decode("utf-8"))
    except FileNotFoundError:
        raise TransferkitError(f"{path}: model file not found") from None
    except zipfile.BadZipFile:
        raise TransferkitError(f"{path}: not a .keras model file (not a zip archive)") from None


def load(path: str) -> ModelFile:
    """Load a model file written by :func:`save`."""
    path = str(path)
    metadata = read_metadata(path)
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a damaged archive
        raise TransferkitError(f"{path}: cannot load the model ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    resize = model.get_layer("resize")
    size = int(resize.height)
    if metadata.get("image_size") not in (None, size):
        raise TransferkitError(f"{path}: metadata image size {metadata['image_size']} != model input {size}")
    class_names = list(metadata["class_names"])
    if model.output.shape[-1] != len(class_names):
        raise TransferkitError(f"{path}: {len(class_names)} class names for {model.output.shape[-1]} outputs")
    return ModelFile(model, class_names, size, metadata, path)
