"""Decode any image file a user may have into RGB uint8, the one way training, evaluation, prediction and
serving all use: content-sniffed format (only the supported formats' parsers ever see the bytes), a pixel budget
checked on the header before any pixel is decoded, EXIF orientation applied, every mode (L, LA, P, RGBA, CMYK,
I;16, F) converted to RGB, transparency composited on white, then resized to the model's square input."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from transferkit.errors import TransferkitError
from transferkit.log import logger

# Formats recognised by their content (Pillow's format names); GIF uses its first frame, TIFF its first page.
SUPPORTED_FORMATS = {"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO"}
# The only Pillow plugins that may parse a file (MPO, a multi-picture JPEG, comes through the JPEG plugin): content
# of any other format (EPS, which would run Ghostscript, PSD, ICO, PDF, ...) is refused by its first bytes.
OPEN_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_DRAFTABLE = ("JPEG", "MPO")  # libjpeg decodes these at 1/2, 1/4 or 1/8 scale on request (DCT scaling)

# The per-image pixel budget, counted on the pixels the decoder will produce: a baseline JPEG at its reduced draft
# scale, a progressive one at full size (libjpeg then holds every coefficient of the image). Why 40 Mpx: decoding
# peaks at up to ~15 bytes a pixel (RGBA: the decoded image, a white background, the composite, the RGB result), so
# one file stays under ~0.6 GB and about a second of CPU, where Pillow's own limit (an error only above 179 Mpx,
# twice its 89 Mpx warning) lets one file take ~2.5 GB. 40 Mpx is above what phones write (12-24 Mpx, 48-200 Mpx
# modes as JPEG) and most cameras' lossless exports; a baseline JPEG for a model input decodes at 1/8 scale, so
# one up to Pillow's 179 Mpx passes. Bigger scans or TIFF exports: set TRANSFERKIT_MAX_PIXELS (environment) or
# MAX_PIXELS (Python).
DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS: int | None = None  # a process-wide override; None: $TRANSFERKIT_MAX_PIXELS, else DEFAULT_MAX_PIXELS
_ANY_SIZE = 1  # "the smallest decode the format allows": training and prediction draft JPEGs to the model input

# The budget above refuses these files with their size and the limit; Pillow's warning would only add noise. A
# broken EXIF or TIFF tag block is ignored (the pixels are still used): Pillow's warnings about it would print its
# source lines amid the command's output.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="PIL.TiffImagePlugin")

# What a malformed file can make Pillow's parsers and decoders raise (a TransferkitError is re-raised as is).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
                  ZeroDivisionError, OverflowError, NotImplementedError, RecursionError)
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transposition that shows it upright
# Content that is not a supported image, named in the error by its first bytes (never handed to a parser).
_FOREIGN_MAGIC = ((b"%PDF-", "PDF"), (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
                  (b"8BPS", "Photoshop PSD"), (b"\x00\x00\x01\x00", "ICO"),
                  (b"PK\x03\x04", "ZIP archive"), (b"\x1f\x8b", "gzip archive"), (b"qoif", "QOI"),
                  (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
                  (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"DDS ", "DDS"))
_SUPPORTED_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"),
                    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
                    (b"BM", "BMP"))


class UnreadableImage(TransferkitError):
    """An image that cannot be used; ``reason`` is a short phrase for reports."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def max_pixels() -> int:
    """The per-image pixel budget of this process: MAX_PIXELS, else $TRANSFERKIT_MAX_PIXELS, else 40 Mpx."""
    if MAX_PIXELS is not None:
        return int(MAX_PIXELS)
    raw = os.environ.get("TRANSFERKIT_MAX_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw.replace("_", "")))
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise TransferkitError(f"TRANSFERKIT_MAX_PIXELS must be a positive number of pixels, got {raw!r}")
    return value


def _limit() -> tuple[int, str]:
    """(the pixel limit in force, where it is set): ours, or Pillow's if someone lowered it below ours."""
    ours, pillow = max_pixels(), Image.MAX_IMAGE_PIXELS
    if pillow and pillow < ours:
        return int(pillow), "PIL.Image.MAX_IMAGE_PIXELS"
    return ours, "TRANSFERKIT_MAX_PIXELS"


def _too_large(stored: tuple[int, int] | None, decoded: tuple[int, int] | None, limit: int, where: str,
              pixels: int | None = None) -> str:
    """The one-line reason for an image over the budget: its size (WxH), the decoded size if smaller, the limit."""
    if stored is None:
        size = f"{pixels:,} pixels" if pixels else "size unknown"
    else:
        size = f"{stored[0]}x{stored[1]} pixels"
        if decoded and tuple(decoded) != tuple(stored):
            size += f", decoded at {decoded[0]}x{decoded[1]}"
    return f"image too large ({size}; limit {limit:,} pixels per image, set by {where}; possible decompression bomb)"


def _label(source, name: str | None) -> str:
    return str(name or (source if isinstance(source, (str, os.PathLike)) else "<upload>"))


@contextlib.contextmanager
def _opened(source, label: str, stage: str, draft_size: int | None = None, info: dict | None = None):
    """Pillow-open a path or bytes with the supported parsers only, after the checks every reader shares (empty,
    format, pixel budget on the header, with a JPEG set to decode at its draft scale for ``draft_size``); any
    failure, here or in the caller's block, becomes UnreadableImage with a short reason. ``info``, if given,
    receives the file's format, mode, width and height as stored."""
    try:
        with _open_supported(source, label) as img:
            stored = img.size
            if info is not None:
                info.update(format=img.format, mode=img.mode, width=img.width, height=img.height)
            if img.format not in SUPPORTED_FORMATS:
                raise UnreadableImage(label, f"unsupported image format {img.format}")
            if draft_size and img.format in _DRAFTABLE:
                img.draft("RGB", (draft_size, draft_size))  # DCT-domain downscale: faster, still >= size
            decoded = _decoded_size(img, stored)
            limit, where = _limit()
            if decoded[0] * decoded[1] > limit:
                raise UnreadableImage(label, _too_large(stored, decoded, limit, where))
            yield img
    except TransferkitError:  # UnreadableImage, or a bad TRANSFERKIT_MAX_PIXELS
        raise
    except UnidentifiedImageError:
        raise UnreadableImage(label, _unrecognised(source)) from None
    except MemoryError:
        raise UnreadableImage(label, f"{stage}: out of memory") from None
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(label, f"{stage}: {_describe(exc)}") from None


def _decoded_size(img: Image.Image, stored: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) counted against the budget once ``img`` is set up to decode: its size after a JPEG's
    draft, except that a progressive JPEG holds the coefficients of every stored pixel, whatever the draft scale."""
    return stored if img.info.get("progressive") else img.size


def _open_supported(source, label: str) -> Image.Image:
    """``Image.open`` restricted to OPEN_FORMATS; Pillow's own bomb error is re-worded with the size and limit."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise UnreadableImage(label, "empty file")
        source = io.BytesIO(source)
    elif os.path.getsize(source) == 0:
        raise UnreadableImage(label, "empty file")
    try:
        return Image.open(source, formats=OPEN_FORMATS)
    except Image.DecompressionBombError as exc:
        limit, where = _limit()
        pixels = int("".join(c for c in str(exc).split(" pixels")[0] if c.isdigit()) or 0)
        raise UnreadableImage(label, _too_large(_header_size(source), None, limit, where, pixels)) from None


def _header_size(source) -> tuple[int, int] | None:
    """The stored (width, height) of a file Pillow refused as a bomb (its error names no dimensions): the plugin's
    header parser called without Pillow's check, else the GIF or WebP header fields; None if none says."""
    fp = source if isinstance(source, io.BytesIO) else open(source, "rb")
    try:
        fp.seek(0)
        head = fp.read(65536)
        for fmt in OPEN_FORMATS:
            factory, accept = Image.OPEN[fmt]
            if accept and not accept(head[:16]):
                continue
            fp.seek(0)
            try:
                return factory(fp, "").size
            except Exception:  # noqa: BLE001 - a best-effort description of a file already refused
                pass
        return _gif_size(head) or _webp_size(head)
    finally:
        if fp is not source:
            fp.close()


def _gif_size(head: bytes) -> tuple[int, int] | None:
    """A GIF's logical screen grown to its first frame's extent (Pillow refuses a frame beyond a small screen)."""
    if head[:4] != b"GIF8" or len(head) < 13:
        return None
    width, height = struct.unpack("<HH", head[6:10])
    i = 13 + (3 << ((head[10] & 7) + 1) if head[10] & 0x80 else 0)
    while i < len(head) - 10 and head[i] == 0x21:  # skip extensions (label, then data sub-blocks)
        i += 2
        while i < len(head) and head[i]:
            i += 1 + head[i]
        i += 1
    if i < len(head) - 10 and head[i] == 0x2C:
        x, y, w, h = struct.unpack("<HHHH", head[i + 1 : i + 9])
        width, height = max(width, x + w), max(height, y + h)
    return width, height


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header (VP8X, VP8L or VP8 chunk), read without decoding."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8X":
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


def _unrecognised(source) -> str:
    """Why Pillow's supported parsers found no image: a foreign format named by its first bytes, a supported one
    whose header is cut or corrupt, or content that is no image at all."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:1024])
    else:
        with open(source, "rb") as fp:
            head = fp.read(1024)
    for magic, kind in _SUPPORTED_MAGIC:
        if head.startswith(magic):
            return f"cannot open: truncated or corrupt {kind} header"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "cannot open: truncated or corrupt WEBP header"
    kind = _foreign_kind(head)
    if kind:
        return f"unsupported format ({kind}; supported: {', '.join(sorted(OPEN_FORMATS))})"
    return "not an image (unrecognised content)"


def _foreign_kind(head: bytes) -> str | None:
    for magic, kind in _FOREIGN_MAGIC:
        if head.startswith(magic):
            return kind
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return "HEIC/HEIF" if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1") else "ISO media (video?)"
    text = head.lower()
    if b"<svg" in text:
        return "SVG"
    if b"<html" in text or b"<!doctype html" in text:
        return "HTML"
    return None


def sniff_format(path: str) -> str:
    """The image format found in the file's bytes (not its name), or UnreadableImage with the reason (a file over
    the pixel budget even at the smallest decode its format allows is refused here, before any decoding)."""
    return probe_image(path, draft_size=_ANY_SIZE)["format"]


def probe_image(source, name: str | None = None, draft_size: int | None = None) -> dict:
    """Read the header only: format, mode, width and height as stored, and ``decoded``, the (width, height) that
    ``open_rgb(..., draft_size)`` counts against the budget; UnreadableImage if the format or the budget refuse it."""
    info: dict = {}
    with _opened(source, _label(source, name), "cannot open", draft_size, info) as img:
        info["decoded"] = _decoded_size(img, (info["width"], info["height"]))
    return info


class OverPixelBudget(TransferkitError):
    """Images whose pixels sum over a budget (a server request's); ``path`` is the image that crossed it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def check_pixel_budget(items: list[tuple[str, bytes]], draft_size: int | None, budget: int) -> int:
    """Read the headers of (name, bytes) images before decoding any: each must be a readable image within the
    per-image budget (else UnreadableImage), and their pixels, counted as ``probe_image`` does, must sum to at most
    ``budget`` (else OverPixelBudget naming the image that crossed it, its size and the limit). Returns the sum."""
    total = 0
    for name, data in items:
        info = probe_image(data, name=name, draft_size=draft_size)
        width, height = info["decoded"]
        total += width * height
        if total > budget:
            size = f"{info['width']}x{info['height']} pixels"
            if (width, height) != (info["width"], info["height"]):
                size += f", decoded at {width}x{height}"
            raise OverPixelBudget(name, f"image of {size} brings the request to {total:,} pixels, over the "
                                        f"limit of {budget:,} pixels per request")
    return total


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: 16-bit and float greys are scaled (not clipped), alpha on white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # integer maths: one 4 or 8-byte copy, no float copies
        arr = np.asarray(img).astype(np.int32 if mode.startswith("I;16") else np.int64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr += 128
            arr //= 257  # 0-65535 -> 0-255, rounded to nearest (as x / 257 is never a tie: 257 is odd)
        np.clip(arr, 0, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")  # L, 1, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, LAB, HSV
    return img


def open_rgb(source, name: str | None = None, draft_size: int | None = None, info: dict | None = None) -> Image.Image:
    """Open a path or bytes, apply EXIF orientation, return an RGB image; UnreadableImage says why not.
    ``info``, if given, receives the file's format, mode, width and height as stored. Only the first frame of an
    animation (or page of a TIFF) is decoded; the RGB conversion and the rotation make one copy each at most."""
    with _opened(source, _label(source, name), "cannot decode", draft_size, info) as img:
        img.load()
        orientation = _orientation(img)
        rgb = to_rgb(img)
    method = _TRANSPOSE.get(orientation)
    return rgb.transpose(method) if method is not None else rgb


def _orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 when absent, out of range or unreadable (a broken EXIF block leaves the
    pixels usable)."""
    try:
        value = img.getexif().get(0x0112, 1)
        return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1
    except _DECODE_ERRORS as exc:
        logger.debug(f"ignoring unreadable EXIF ({_describe(exc)})")
        return 1


def _describe(exc: BaseException) -> str:
    """One line for a decoding error: Pillow's message (the exception type if it is not an OSError's)."""
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    if not isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)):
        reason = f"{type(exc).__name__}: {reason}"
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
