"""Decode any image file a user may have into RGB uint8, the one way training, evaluation, prediction and
serving all use: content-sniffed format, EXIF orientation applied, every mode (L, LA, P, RGBA, CMYK, I;16, F)
converted to RGB, transparency composited on white, then resized to the model's square input."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit.errors import TransferkitError

# Formats recognised by their content (Pillow's format names); GIF uses its first frame, TIFF its first page.
SUPPORTED_FORMATS = {"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO"}


class UnreadableImage(TransferkitError):
    """An image that cannot be used; ``reason`` is a short phrase for reports."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@contextlib.contextmanager
def _opened(source, label: str, stage: str):
    """Pillow-open a path or bytes after the checks every reader shares (empty, format, pixel limit); any failure,
    here or in the caller's block, becomes UnreadableImage with a short reason."""
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise UnreadableImage(label, "empty file")
            source = io.BytesIO(source)
        elif os.path.getsize(source) == 0:
            raise UnreadableImage(label, "empty file")
        with Image.open(source) as img:
            if img.format not in SUPPORTED_FORMATS:
                raise UnreadableImage(label, f"unsupported image format {img.format}")
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:  # Pillow only warns between 1x and 2x its limit
                raise UnreadableImage(label, f"image too large ({img.width}x{img.height} pixels, possible "
                                             f"decompression bomb; limit {limit})")
            yield img
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage(label, "not an image (unrecognised content)") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(label, f"image too large, possible decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnreadableImage(label, f"{stage}: {_describe(exc)}") from None


def sniff_format(path: str) -> str:
    """The image format found in the file's bytes (not its name), or UnreadableImage with the reason."""
    with _opened(path, str(path), "cannot open") as img:
        return img.format


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: 16-bit and float greys are scaled (not clipped), alpha on white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0-65535 -> 0-255
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")  # L, 1, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, LAB, HSV
    return img


def open_rgb(source, name: str | None = None, draft_size: int | None = None, info: dict | None = None) -> Image.Image:
    """Open a path or bytes, apply EXIF orientation, return an RGB image; UnreadableImage says why not.
    ``info``, if given, receives the file's format, mode, width and height as stored."""
    label = str(name or (source if isinstance(source, (str, os.PathLike)) else "<upload>"))
    with _opened(source, label, "cannot decode") as img:
        if info is not None:
            info.update(format=img.format, mode=img.mode, width=img.width, height=img.height)
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))  # DCT-domain downscale: faster, still >= size
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


def _describe(exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    return f"truncated image ({reason})" if "truncat" in reason.lower() else reason


def load_image(source, size: int, name: str | None = None) -> np.ndarray:
    """Decode ``source`` and resize to ``size`` x ``size`` (squash, bilinear with antialiasing): uint8 (size, size, 3)."""
    return _square(open_rgb(source, name=name, draft_size=size), size)


def _square(img: Image.Image, size: int) -> np.ndarray:
    """An RGB image squashed to ``size`` x ``size`` (bilinear with antialiasing), as uint8 (size, size, 3)."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_batch(paths: list, size: int, pool) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Decode images in parallel on ``pool`` (Pillow releases the GIL): (arrays or None, reasons or None)."""

    def one(path):
        try:
            return load_image(path, size), None
        except UnreadableImage as exc:
            return None, exc.reason

    results = list(pool.map(one, paths))
    return [r[0] for r in results], [r[1] for r in results]


def to_model_input(item, size: int) -> np.ndarray:
    """One image for a model of input ``size``: a path or bytes (decoded as every file is), a Pillow image, or an
    RGB / grey array (uint8 0-255, or float 0-255) of any size -> uint8 (size, size, 3), resized like files are."""
    if isinstance(item, (str, os.PathLike, bytes)):
        return load_image(item, size)
    if isinstance(item, Image.Image):
        img = to_rgb(item)
    else:
        arr = np.asarray(item)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise TransferkitError(f"an image array must be (height, width, 3), got shape {arr.shape}")
        img = to_rgb(Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)))
    return _square(img, size)
