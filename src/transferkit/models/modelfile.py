"""One ``.keras`` file = resize + preprocessing + backbone + head, plus class names and metadata.

The metadata rides inside the same zip as ``transferkit.json`` (Keras ignores files it does not know, so plain
``keras.models.load_model`` still opens the model). The input size and scaling are layers of the model, so a
prediction cannot use another resize, scaling or class order than training did. Keras is imported only where a
model is built, saved or loaded: reading the metadata and the check photos (all the cached engine needs,
``engines.cached``) costs no TensorFlow import.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from transferkit.errors import TransferkitError
from transferkit.files import atomic_path, json_text
from transferkit.runs import check_model_metadata

METADATA_NAME = "transferkit.json"
CHECK_FOLDER = "transferkit_check/"  # validation photos (PNG at the model's size): engines are checked on them
MAX_CHECK_IMAGES = 8
MAX_METADATA_BYTES = 16 * 1024 * 1024  # ours are a few KB; a bigger member is not ours


def assemble(extractor: keras.Model, head: keras.Model) -> keras.Model:
    """The deployable classifier: raw RGB 0-255 of any size -> class probabilities."""
    import keras

    return keras.Model(extractor.input, head(extractor.output), name="transferkit_classifier")


def save(model: keras.Model, path: str, metadata: dict, check_images: np.ndarray | None = None) -> str:
    """Write model + metadata (+ a few validation photos, the images any engine is checked on) to ``path``
    atomically (a crash leaves the previous file, never half a file)."""
    if not str(path).endswith(".keras"):
        raise TransferkitError(f"{path}: the model file name must end in .keras")
    with atomic_path(path, suffix=".keras") as tmp:
        os.unlink(tmp)
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(METADATA_NAME, json_text(metadata))
            for i, image in enumerate(check_images if check_images is not None else ()):
                buffer = io.BytesIO()
                # zlib level 1: 8 photos in 0.06 s instead of 0.15 s (level 6), 6 % larger
                Image.fromarray(np.asarray(image, np.uint8)).save(buffer, "PNG", compress_level=1)
                zf.writestr(f"{CHECK_FOLDER}{i}.png", buffer.getvalue(), compress_type=zipfile.ZIP_STORED)
    return str(path)


def read_check_images(path: str, size: int) -> np.ndarray | None:
    """The validation photos stored in a model file (uint8 (n, size, size, 3)), or None where it has none (an
    older file) or they do not decode as ours."""
    from transferkit.data.images import UnreadableImage, load_image

    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.startswith(CHECK_FOLDER))[:MAX_CHECK_IMAGES]
            if any(zf.getinfo(n).file_size > 4 * size * size * 3 + 65536 for n in names):
                return None
            images = [load_image(zf.read(n), size, name=n) for n in names]
    except (OSError, zipfile.BadZipFile, UnreadableImage, ValueError, EOFError):
        return None
    return np.stack(images) if images else None


@dataclass
class ModelFile:
    """What a ``.keras`` model file holds: the Keras classifier and what it knows about itself."""

    keras_model: keras.Model
    class_names: list[str]
    image_size: int
    metadata: dict = field(default_factory=dict)
    path: str = ""
    check_images: np.ndarray | None = None


def read_metadata(path: str) -> dict:
    """The transferkit metadata stored in a model file (a JSON object; its size is bounded before reading)."""
    try:
        with zipfile.ZipFile(path) as zf:
            if METADATA_NAME not in zf.namelist():
                raise TransferkitError(f"{path}: not a transferkit model file (no {METADATA_NAME} inside)")
            if zf.getinfo(METADATA_NAME).file_size > MAX_METADATA_BYTES:
                raise TransferkitError(f"{path}: damaged transferkit metadata (over {MAX_METADATA_BYTES} bytes)")
            metadata = json.loads(zf.read(METADATA_NAME).decode("utf-8"))
    except FileNotFoundError:
        raise TransferkitError(f"{path}: model file not found") from None
    except IsADirectoryError:
        raise TransferkitError(f"{path}: a folder, not a .keras model file") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError):
        raise TransferkitError(f"{path}: not a .keras model file (not a readable zip archive)") from None
    except (ValueError, OSError, RuntimeError) as exc:  # bad JSON or UTF-8, a damaged or encrypted member
        raise TransferkitError(f"{path}: damaged transferkit metadata ({_first_line(exc)})") from None
    if not isinstance(metadata, dict):
        raise TransferkitError(f"{path}: damaged transferkit metadata (not a JSON object)")
    return metadata


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load(path: str) -> ModelFile:
    """Load a model file written by :func:`save`."""
    import keras

    path = str(path)
    metadata = read_metadata(path)
    check_model_metadata(path, metadata)
    try:  # safe_mode stays on: a model file from elsewhere may not run code (Lambda layers, unknown modules)
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a damaged or hostile archive
        raise TransferkitError(f"{path}: cannot load the model ({_first_line(exc)})") from None
    size = _input_size(path, model)
    if metadata.get("image_size") not in (None, size):
        raise TransferkitError(f"{path}: metadata image size {metadata['image_size']} != model input {size}")
    if len(model.outputs) != 1:
        raise TransferkitError(f"{path}: not a transferkit classifier ({len(model.outputs)} outputs)")
    class_names = check_model_metadata(path, metadata, n_outputs=model.output.shape[-1])
    return ModelFile(model, class_names, size, metadata, path, read_check_images(path, size))


def _input_size(path: str, model: keras.Model) -> int:
    """The square size of the model's own resize layer (a transferkit classifier resizes inside the model)."""
    try:
        layer = model.get_layer("resize")
        if layer.height != layer.width or int(layer.height) < 8:
            raise ValueError("not square")
        return int(layer.height)
    except (ValueError, AttributeError, TypeError):
        raise TransferkitError(f"{path}: not a transferkit classifier (no square 'resize' layer at its "
                               f"input)") from None
