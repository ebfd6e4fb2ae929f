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
import numpy as np

from transferkit.errors import TransferkitError
from transferkit import runtimes
from transferkit.files import atomic_path, file_digest
from transferkit.inference import run_model, without_resize

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
class LoadedModel:
    """A trained classifier and what it knows about itself."""

    keras_model: keras.Model
    class_names: list[str]
    image_size: int
    metadata: dict = field(default_factory=dict)
    path: str = ""
    runtime: str = "keras"
    precision: str = "fp32"
    verbose: bool = False
    _engine: object = field(default=None, repr=False)

    def use_runtime(self, runtime: str = "auto", precision: str = "auto", verbose: bool = False) -> "LoadedModel":
        """Run predictions on another engine (onnxruntime, OpenVINO; see transferkit.runtimes)."""
        self.runtime, self.precision = runtimes.resolve(runtime, precision)
        self.verbose, self._engine = verbose, None
        return self

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of RGB 0-255 images (n, size, size, 3), through the compiled model or the
        chosen engine (converted, and checked against fp32 for bf16, at the first call)."""
        if self.runtime == "keras":
            return run_model(self.keras_model, images)
        if self._engine is None:
            key = f"classifier-{file_digest(self.path)[:16] if self.path else id(self)}-{self.image_size}px"
            self._engine = runtimes.build_engine(without_resize(self.keras_model, self.image_size), key, self.runtime,
                                                 self.precision, check_images=np.asarray(images, np.float32),
                                                 verbose=self.verbose)
        return self._engine(images)


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


def load(path: str) -> LoadedModel:
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
    return LoadedModel(model, class_names, size, metadata, path)
