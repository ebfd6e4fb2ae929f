"""Write a corpus of hostile and odd image files (and a few good photos) for the decoding hardening tests.

    python benchmarks/make_hostile_corpus.py OUT_DIR

Layout OUT_DIR/<class>/<file> with two classes, so the same folder is a training folder; OUT_DIR/.manifest.json
(hidden: scanning and `predict DIR` skip it) maps each file, relative to OUT_DIR, to its category and what a
decoder must do with it: "ok" (decodes), "refused" (refused with a reason) or "any" (either, never a crash).
Deterministic (fixed seeds, no timestamps) and fast; made with Pillow, numpy, zlib and the standard library only.
Categories: truncated files at many offsets (JPEG, PNG, GIF, WEBP, BMP, TIFF), empty and tiny files, wrong
extensions, polyglots, decompression bombs of each format (real ones and huge headers with tiny payloads), 16-bit,
float, CMYK, palette + alpha, animations with thousands of frames, EXIF orientations 1-8, other formats named .jpg
(SVG, HEIC, PDF, EPS, ...), odd sizes and encodings, good photos with accented and odd file names.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zipfile
import zlib

import numpy as np
from PIL import Image

FIXED_DATE = time.gmtime(1577836800)  # 2020-01-01 as the PDF dates: deterministic output
CLASSES = ("rayures", "disques dorés")  # stripes / golden discs: the good photos' visible classes


class Corpus:
    """Collects files for OUT_DIR; hostile files alternate between the two classes."""

    def __init__(self, root: str):
        self.root, self.entries, self._turn = root, {}, 0

    def add(self, name: str, data: bytes, category: str, expect: str, cls: int | None = None) -> None:
        if cls is None:
            cls, self._turn = self._turn, 1 - self._turn
        rel = os.path.join(CLASSES[cls], name)
        assert rel not in self.entries, rel
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        self.entries[rel] = {"category": category, "expect": expect}

    def write_manifest(self) -> str:
        path = os.path.join(self.root, ".manifest.json")
        with open(path, "w", encoding="ascii") as f:  # \u escapes: a non-UTF-8 file name survives the round trip
            json.dump(self.entries, f, indent=1, sort_keys=True)
        return path


def photo(kind: int, rng: np.random.Generator, size=(48, 64)) -> np.ndarray:
    """A photo-like RGB array whose class is visible: stripes (kind 0) or a golden disc (kind 1)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == 0:
        mask = (yy // int(rng.integers(5, 9))) % 2 == 0
        fg = (40, 60, 200)
    else:
        r = rng.uniform(0.25, 0.4) * min(h, w)
        mask = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < r * r
        fg = (230, 180, 40)
    img = np.where(mask[..., None], np.array(fg, float), 235.0) + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_file(width: int, height: int, depth: int, color: int, idat: bytes, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def zero_rows_zlib(row_bytes: int, height: int) -> bytes:
    """zlib stream of ``height`` PNG scanlines of zeros (filter byte included), compressed block by block."""
    comp, rows = zlib.compressobj(9), b"\x00" * ((1 + row_bytes) * 256)
    out = [comp.compress(rows) for _ in range(height // 256)]
    out.append(comp.compress(b"\x00" * ((1 + row_bytes) * (height % 256))))
    return b"".join(out) + comp.flush()


def gif_file(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF whose header claims ``screen`` and one ``frame`` with a tiny LZW stream (clear, one pixel, end)."""
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    desc = b"," + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return head + desc + b"\x02" + b"\x02\x44\x01" + b"\x00" + b";"


def tiff_file(width: int, height: int, compression: int, data: bytes, bits: int = 8) -> bytes:
    """A little-endian grey TIFF with one strip holding ``data`` (whatever the dimensions claim)."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, compression), (262, 3, 1),
            (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, len(data))]
    ifd_size = 2 + 12 * len(tags) + 4
    data_offset = 8 + ifd_size
    out = [b"II*\x00", struct.pack("<I", 8), struct.pack("<H", len(tags))]
    for tag, kind, value in tags:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        out.append(struct.pack("<HHI", tag, kind, 1) + packed)
    out.append(struct.pack("<I", 0))
    return b"".join(out) + data


def bmp_file(width: int, height: int, bpp: int, compression: int, data: bytes) -> bytes:
    """A BMP (BITMAPINFOHEADER) with a 2-colour palette (for bpp <= 8) and ``data`` as its pixels."""
    palette = b"\x00\x00\x00\x00\xff\xff\xff\x00" if bpp <= 8 else b""
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, compression, len(data), 2835, 2835,
                       2 if palette else 0, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data


def gif_blocks(data: bytes) -> tuple[bytes, list[bytes]]:
    """A GIF split into its header (signature, screen descriptor, global palette) and its blocks (extensions and
    images, each with its data sub-blocks), the trailer left out."""
    flags = data[10]
    i = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    header, blocks = data[:i], []
    while data[i : i + 1] != b";":
        start = i
        if data[i] == 0x21:
            i += 2
        else:
            local = data[i + 9]
            i += 10 + (3 * 2 ** ((local & 7) + 1) if local & 0x80 else 0) + 1
        while data[i]:
            i += 1 + data[i]
        i += 1
        blocks.append(data[start:i])
    return header, blocks


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose SOF header is patched to claim ``width`` x ``height`` (the scan data stays tiny)."""
    i = 2
    while i < len(data) - 9:
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]
        i += 2 + length
    raise ValueError("no SOF marker")


def jpeg_with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """Insert an APPn (or COM) segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def webp_with_size(width: int, height: int) -> bytes:
    """A lossless 16x16 WebP whose VP8L header is patched to claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 90, 90)), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L" and data[20] == 0x2F
    bits = int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
    data[21:25] = (bits | (width - 1) | ((height - 1) << 14)).to_bytes(4, "little")
    return bytes(data)


def webp_vp8x_with_canvas(width: int, height: int) -> bytes:
    """A WebP with a VP8X chunk (written for the EXIF) whose canvas is patched to ``width`` x ``height``."""
    exif = Image.Exif()
    exif[0x0112] = 1
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 90, 90)), "WEBP", exif=exif.tobytes()))
    assert data[12:16] == b"VP8X"
    data[24:27], data[27:30] = (width - 1).to_bytes(3, "little"), (height - 1).to_bytes(3, "little")
    return bytes(data)


def add_good_photos(c: Corpus, rng: np.random.Generator) -> None:
    """12 photos per class (JPEG and PNG), some with accented, composed or odd file names."""
    odd = ["photo_été_01.jpg", "ñandú.jpg", "日本語の写真.jpg", "emoji_🍓.jpg", "pe\u0302che_decomposed.jpg",
           "café (copie) [1].jpg", "mojibake_cafÃ©_Ã¨.jpg", "rtl_\u202egpj.exe.jpg", "zero\u200bwidth.jpg",
           "quote'\"semi;colon.jpg", "$(echo hi) %s%n.jpg", "-dash-first.png", "UPPER.JPG",
           "long_" + "x" * 180 + ".jpg", "Ωμέγα ελληνικά.png", "кириллица.jpg"]
    for cls in (0, 1):
        for i in range(12):
            name = odd.pop(0) if odd and i % 3 == cls else f"photo_{i:02d}.{'png' if i % 4 == 3 else 'jpg'}"
            fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
            c.add(name, encode(Image.fromarray(photo(cls, rng)), fmt), "good photo", "ok", cls)


def add_truncated(c: Corpus, rng: np.random.Generator) -> None:
    """Each format cut at 15 offsets, from the first byte to the last."""
    base = Image.fromarray(photo(1, rng, (40, 48)))
    files = {"jpg": encode(base, "JPEG", quality=90), "png": encode(base, "PNG"), "gif": encode(base, "GIF"),
             "webp": encode(base, "WEBP", quality=80), "bmp": encode(base, "BMP"), "tif": encode(base, "TIFF"),
             "progressive.jpg": encode(base, "JPEG", quality=90, progressive=True)}
    for ext, data in files.items():
        n = len(data)
        offsets = sorted({1, 2, 3, 8, 16, 30, 64, 128, n // 4, n // 2, 3 * n // 4, n - 16, n - 2, n - 1}
                         if ext != "progressive.jpg" else {n // 3, n // 2, n - 2})
        for cut in offsets:
            c.add(f"truncated_{cut:05d}_of_{n}.{ext}", data[:cut], "truncated", "any")


def add_empty_and_tiny(c: Corpus) -> None:
    for name, data in [("empty.jpg", b""), ("empty.png", b""), ("empty_no_extension", b""), ("one_byte.jpg", b"\xff"),
                       ("jpeg_magic_only.jpg", b"\xff\xd8\xff"), ("png_signature_only.png", b"\x89PNG\r\n\x1a\n"),
                       ("gif_header_only.gif", b"GIF89a"), ("riff_webp_only.webp", b"RIFF\x04\x00\x00\x00WEBP")]:
        c.add(name, data, "empty or tiny", "refused")


def add_wrong_extensions(c: Corpus, rng: np.random.Generator) -> None:
    img = Image.fromarray(photo(0, rng))
    for name, fmt in [("png_named.jpg", "PNG"), ("jpeg_named.png", "JPEG"), ("gif_named.webp", "GIF"),
                      ("webp_named.bmp", "WEBP"), ("tiff_named.gif", "TIFF"), ("bmp_named.tiff", "BMP"),
                      ("jpeg_without_extension", "JPEG"), ("jpeg_named.txt", "JPEG"), ("png_named.jpeg", "PNG"),
                      ("jpeg_named.heic", "JPEG")]:
        c.add(name, encode(img, fmt), "wrong extension", "ok")


def add_polyglots(c: Corpus, rng: np.random.Generator) -> None:
    img = Image.fromarray(photo(1, rng))
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr(zipfile.ZipInfo("readme.txt", date_time=(2020, 1, 1, 0, 0, 0)), "a zip inside an image")
        z.writestr(zipfile.ZipInfo("evil.html", date_time=(2020, 1, 1, 0, 0, 0)), "<script>alert(1)</script>")
    zip_bytes, html = zbuf.getvalue(), b"<html><body><script>alert('polyglot')</script></body></html>\n"
    jpeg, png = encode(img, "JPEG"), encode(img, "PNG")
    c.add("png_plus_zip.png", png + zip_bytes, "polyglot", "ok")
    c.add("jpeg_plus_html.jpg", jpeg + html, "polyglot", "ok")
    c.add("jpeg_plus_zip.jpg", jpeg + zip_bytes, "polyglot", "ok")
    c.add("gif_plus_script.gif", encode(img, "GIF") + b"\n/*" + html + b"*/", "polyglot", "ok")
    c.add("jpeg_comment_html.jpg", jpeg_with_segment(jpeg, 0xFE, html), "polyglot", "ok")
    c.add("png_text_html.png", png[:33] + png_chunk(b"tEXt", b"Comment\x00" + html) + png[33:], "polyglot", "ok")
    c.add("zip_then_jpeg.jpg", zip_bytes + jpeg, "polyglot", "refused")
    c.add("html_then_jpeg.jpg", html + jpeg, "polyglot", "refused")


def add_bombs(c: Corpus) -> None:
    """Huge dimensions in a few bytes: real streams that decode to them, and headers over a tiny payload."""
    tiny_jpeg = encode(Image.new("RGB", (16, 16), (120, 120, 120)), "JPEG")
    tiny_prog = encode(Image.new("RGB", (16, 16), (120, 120, 120)), "JPEG", progressive=True)
    bombs = [
        ("png_9000x9000_1bit.png", png_file(9000, 9000, 1, 0, zero_rows_zlib(1125, 9000)), "refused"),
        ("png_8000x6000_grey.png", png_file(8000, 6000, 8, 0, zero_rows_zlib(8000, 6000)), "refused"),
        ("png_20000x20000_1bit.png", png_file(20000, 20000, 1, 0, zero_rows_zlib(2500, 20000)), "refused"),
        ("png_header_65535x65535.png", png_file(65535, 65535, 8, 2, zlib.compress(b"\x00" * 64)), "refused"),
        ("gif_65535x65535.gif", gif_file((65535, 65535), (65535, 65535)), "refused"),
        ("gif_9000x9000.gif", gif_file((9000, 9000), (9000, 9000)), "refused"),
        ("gif_frame_beyond_screen.gif", gif_file((16, 16), (60000, 60000)), "refused"),
        ("tiff_9000x9000_group4.tif", encode(Image.new("1", (9000, 9000), 1), "TIFF", compression="group4"),
         "refused"),
        ("tiff_100000x100000_deflate.tif", tiff_file(100000, 100000, 8, zlib.compress(b"\x00" * 4096)), "refused"),
        ("tiff_9000x9000_raw.tif", tiff_file(9000, 9000, 1, b"\x00" * 64), "refused"),
        ("webp_16383x16383.webp", webp_with_size(16383, 16383), "refused"),
        ("webp_9000x9000.webp", webp_with_size(9000, 9000), "refused"),
        ("webp_vp8x_1000000x1000000.webp", webp_vp8x_with_canvas(1_000_000, 1_000_000), "refused"),
        ("bmp_30000x30000_rle8.bmp", bmp_file(30000, 30000, 8, 1, b"\x00\x01"), "refused"),
        ("bmp_9000x9000_24bit.bmp", bmp_file(9000, 9000, 24, 0, b"\x00" * 64), "refused"),
        ("bmp_top_down_9000x-9000.bmp", bmp_file(9000, -9000, 8, 0, b"\x00" * 64), "refused"),
        ("jpeg_65500x65500.jpg", jpeg_with_size(tiny_jpeg, 65500, 65500), "refused"),
        ("jpeg_progressive_13000x13000.jpg", jpeg_with_size(tiny_prog, 13000, 13000), "refused"),
        ("jpeg_progressive_9000x9000.jpg", jpeg_with_size(tiny_prog, 9000, 9000), "refused"),
        ("jpeg_13000x13000.jpg", jpeg_with_size(tiny_jpeg, 13000, 13000), "any"),  # decoded at 1/8 scale
        ("jpeg_9000x9000.jpg", jpeg_with_size(tiny_jpeg, 9000, 9000), "any"),
    ]
    for name, data, expect in bombs:
        c.add(name, data, "decompression bomb", expect)


def add_deep_and_odd_modes(c: Corpus, rng: np.random.Generator) -> None:
    """16-bit, 32-bit and float greys and colours, CMYK, LAB, bilevel, palette and alpha."""
    grad16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    rgb = photo(0, rng)
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))])
    rgb16 = (rgb.astype(">u2") * 257).tobytes()
    raw16 = b"".join(b"\x00" + rgb16[r * 64 * 6 : (r + 1) * 64 * 6] for r in range(48))
    rgba16 = (rgba.astype(">u2") * 257).tobytes()
    raw16a = b"".join(b"\x00" + rgba16[r * 64 * 8 : (r + 1) * 64 * 8] for r in range(48))
    grey2 = b"".join(b"\x00" + bytes([0b00011011] * 16) for _ in range(48))
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    files = [
        ("deep_16bit_grey.png", encode(Image.fromarray(grad16), "PNG")),
        ("deep_16bit_rgb.png", png_file(64, 48, 16, 2, zlib.compress(raw16))),
        ("deep_16bit_rgba.png", png_file(64, 48, 16, 6, zlib.compress(raw16a))),
        ("deep_2bit_grey.png", png_file(64, 48, 2, 0, zlib.compress(grey2))),
        ("deep_16bit_grey.tif", encode(Image.fromarray(grad16), "TIFF")),
        ("deep_32bit_int.tif", encode(Image.fromarray(grad16.astype(np.int32) * 3), "TIFF")),
        ("deep_float32.tif", encode(Image.fromarray(grad16.astype(np.float32) / 65535), "TIFF")),
        ("cmyk.jpg", encode(Image.fromarray(rgb).convert("CMYK"), "JPEG")),
        ("cmyk.tif", encode(Image.fromarray(rgb).convert("CMYK"), "TIFF")),
        ("lab.tif", encode(Image.merge("LAB", [Image.fromarray(rgb[..., i]) for i in range(3)]), "TIFF")),
        ("ycbcr_444.jpg", encode(Image.fromarray(rgb), "JPEG", subsampling=0)),
        ("grey.jpg", encode(Image.fromarray(rgb).convert("L"), "JPEG")),
        ("bilevel.png", encode(Image.fromarray(rgb).convert("1"), "PNG")),
        ("bilevel_g4.tif", encode(Image.fromarray(rgb).convert("1"), "TIFF", compression="group4")),
        ("palette_trns.png", encode(pal, "PNG", transparency=0)),
        ("palette_transparency.gif", encode(pal, "GIF", transparency=3)),
        ("grey_alpha_la.png", encode(Image.fromarray(rgba).convert("LA"), "PNG")),
        ("rgba.png", encode(Image.fromarray(rgba), "PNG")),
        ("rgba.webp", encode(Image.fromarray(rgba), "WEBP", lossless=True)),
        ("rgba.tif", encode(Image.fromarray(rgba), "TIFF")),
        ("tiff_lzw.tif", encode(Image.fromarray(rgb), "TIFF", compression="tiff_lzw")),
        ("tiff_jpeg.tif", encode(Image.fromarray(rgb), "TIFF", compression="jpeg")),
        ("bmp_rgba_32bit.bmp", encode(Image.fromarray(rgba), "BMP")),
        ("bmp_1bit.bmp", encode(Image.fromarray(rgb).convert("1"), "BMP")),
    ]
    for name, data in files:
        c.add(name, data, "odd mode", "ok")


def add_animations(c: Corpus, rng: np.random.Generator) -> None:
    """Thousands of frames (only the first must be decoded), a multi-picture JPEG and a multi-page TIFF."""
    frames = [Image.fromarray(photo(i % 2, rng, (16, 16))) for i in range(8)]
    header, blocks = gif_blocks(encode(frames[1], "GIF"))
    gce = b"\x21\xf9\x04\x04\x01\x00\x00\x00"  # 10 ms per frame, keep the previous frame
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    image = [b for b in blocks if b[:1] == b","][0]
    c.add("animated_5000_frames.gif", header + loop + (gce + image) * 5000 + b";", "animation", "ok")
    webp = encode(frames[0], "WEBP", save_all=True, append_images=[frames[(i % 7) + 1] for i in range(1999)],
                  lossless=True, duration=10)
    c.add("animated_2000_frames.webp", webp, "animation", "ok")
    apng = encode(frames[0], "PNG", save_all=True, append_images=[frames[(i % 7) + 1] for i in range(999)],
                  duration=10)
    c.add("animated_1000_frames.png", apng, "animation", "ok")
    c.add("tiff_300_pages.tif", encode(frames[0], "TIFF", save_all=True,
                                       append_images=[frames[(i % 7) + 1] for i in range(299)]), "animation", "ok")
    c.add("mpo_two_pictures.jpg", encode(frames[0], "MPO", save_all=True, append_images=[frames[1]]),
          "animation", "ok")
    c.add("gif_no_frames.gif", header + loop + b";", "animation", "refused")


def add_exif(c: Corpus, rng: np.random.Generator) -> None:
    """EXIF orientation 1-8 (JPEG), in PNG, WebP and TIFF too, via XMP, out of range, and a broken EXIF block."""
    img = Image.fromarray(photo(0, rng, (32, 48)))

    def exif_bytes(value: int) -> bytes:
        exif = Image.Exif()
        exif[0x0112] = value
        return exif.tobytes()

    for value in range(1, 9):
        c.add(f"exif_orientation_{value}.jpg", encode(img, "JPEG", exif=exif_bytes(value)), "exif", "ok")
    c.add("exif_orientation_6.png", encode(img, "PNG", exif=exif_bytes(6)), "exif", "ok")
    c.add("exif_orientation_8.webp", encode(img, "WEBP", exif=exif_bytes(8)), "exif", "ok")
    c.add("exif_orientation_3.tif", encode(img, "TIFF", tiffinfo={0x0112: 3}), "exif", "ok")
    c.add("exif_orientation_0.jpg", encode(img, "JPEG", exif=exif_bytes(0)), "exif", "ok")
    c.add("exif_orientation_9999.jpg", encode(img, "JPEG", exif=exif_bytes(9999)), "exif", "ok")
    xmp = (b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF><rdf:Description "
           b"xmlns:tiff='http://ns.adobe.com/tiff/1.0/' tiff:Orientation=\"6\"/></rdf:RDF></x:xmpmeta>")
    c.add("xmp_orientation_6.jpg", jpeg_with_segment(encode(img, "JPEG"), 0xE1, xmp), "exif", "ok")
    broken = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + bytes(range(256)) * 4
    c.add("exif_broken.jpg", jpeg_with_segment(encode(img, "JPEG"), 0xE1, broken), "exif", "ok")
    loop = (b"Exif\x00\x00II*\x00\x08\x00\x00\x00"  # one IFD whose EXIF pointer (0x8769) points back at itself
            b"\x01\x00\x69\x87\x04\x00\x01\x00\x00\x00\x08\x00\x00\x00\x08\x00\x00\x00")
    c.add("exif_ifd_loop.jpg", jpeg_with_segment(encode(img, "JPEG"), 0xE1, loop), "exif", "ok")


def add_foreign(c: Corpus, rng: np.random.Generator) -> None:
    """Content of formats outside the supported list, named .jpg: refused by their bytes, never parsed."""
    img = Image.fromarray(photo(1, rng, (32, 32)))
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="99999" height="99999">' \
          b'<circle cx="50" cy="50" r="40" fill="gold"/></svg>\n'
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + b"\x00" * 200
    pdf = encode(img, "PDF", creationDate=FIXED_DATE, modDate=FIXED_DATE)
    files = [("svg.jpg", svg), ("heic.jpg", heic), ("pdf.jpg", pdf), ("eps.jpg", encode(img, "EPS")),
             ("psd.jpg", b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 99999, 99999, 8, 3) + b"\x00" * 64),
             ("ico.jpg", encode(img, "ICO")), ("pcx.jpg", encode(img, "PCX")), ("tga.jpg", encode(img, "TGA")),
             ("ppm.jpg", encode(img, "PPM")), ("sgi.jpg", encode(img, "SGI")), ("qoi.jpg", encode(img, "QOI")),
             ("jpeg2000.jpg", encode(img, "JPEG2000")), ("avif.jpg", _avif_or_header(img)),
             ("mp4.jpg", struct.pack(">I", 24) + b"ftypisom" + b"\x00\x00\x02\x00isomiso2" + b"\x00" * 64),
             ("html.jpg", b"<!DOCTYPE html><html><body>not a photo</body></html>"),
             ("text.jpg", "une note, pas une photo: café\n".encode("utf-8")), ("json.png", b'{"image": true}'),
             ("gzip.jpg", b"\x1f\x8b\x08\x00" + b"\x00" * 32), ("random_bytes.jpg", rng.bytes(4096)),
             ("utf16_text.jpg", "texte".encode("utf-16"))]
    for name, data in files:
        c.add(name, data, "other format", "refused")


def _avif_or_header(img: Image.Image) -> bytes:
    try:
        return encode(img, "AVIF")
    except (OSError, KeyError, ValueError):  # Pillow built without libavif: the header is what gets sniffed
        return struct.pack(">I", 24) + b"ftypavif" + b"\x00\x00\x00\x00mif1avif" + b"\x00" * 200


def add_odd_sizes(c: Corpus, rng: np.random.Generator) -> None:
    """Tiny, thin, big-metadata and slightly broken but decodable files."""
    base = photo(0, rng)
    line = np.repeat(base[:1, :1], 10000, axis=1)
    big_icc = b"\x00" * 300_000
    png = encode(Image.fromarray(base), "PNG")
    files = [
        ("one_pixel.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok"),
        ("one_pixel.gif", encode(Image.new("P", (1, 1)), "GIF"), "ok"),
        ("one_pixel.jpg", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "JPEG"), "ok"),
        ("wide_10000x1.png", encode(Image.fromarray(line), "PNG"), "ok"),
        ("tall_1x10000.jpg", encode(Image.fromarray(line.transpose(1, 0, 2)), "JPEG"), "ok"),
        ("jpeg_restart_markers.jpg", encode(Image.fromarray(base), "JPEG", restart_marker_blocks=1), "ok"),
        ("jpeg_junk_icc.jpg", encode(Image.fromarray(base), "JPEG", icc_profile=big_icc), "any"),
        ("png_5mb_ztxt.png", png[:33] + png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"A" * 5_000_000))
         + png[33:], "any"),
        ("png_bad_crc.png", png[:29] + b"\xde\xad\xbe\xef" + png[33:], "any"),
        ("png_no_iend.png", png[:-12], "any"),
        ("png_trailing_garbage.png", png + rng.bytes(2048), "ok"),
        ("jpeg_double_soi.jpg", b"\xff\xd8" + encode(Image.fromarray(base), "JPEG"), "any"),
        ("tiff_hand_built_grey.tif", _hand_built_tiff(base), "ok"),
    ]
    for name, data, expect in files:
        c.add(name, data, "odd file", expect)


def _hand_built_tiff(rgb: np.ndarray) -> bytes:
    grey = Image.fromarray(rgb).convert("L")
    return tiff_file(grey.width, grey.height, 1, grey.tobytes())


def add_non_utf8_name(c: Corpus, rng: np.random.Generator) -> None:
    """A good photo whose file name is Latin-1 bytes, not UTF-8 (Python sees it with a surrogate escape)."""
    name = b"caf\xe9_latin1_name.jpg".decode("utf-8", "surrogateescape")
    c.add(name, encode(Image.fromarray(photo(0, rng)), "JPEG"), "good photo", "ok", 0)


def make_corpus(out_dir: str, non_utf8_name: bool = False) -> dict:
    """Write the corpus under ``out_dir``; returns the manifest (relative path -> category, expect).
    ``non_utf8_name``: add a photo whose file name is not valid UTF-8 (off by default: not every file system or
    tool accepts one)."""
    rng = np.random.default_rng(20240611)
    c = Corpus(out_dir)
    add_good_photos(c, rng)
    add_truncated(c, rng)
    add_empty_and_tiny(c)
    add_wrong_extensions(c, rng)
    add_polyglots(c, rng)
    add_bombs(c)
    add_deep_and_odd_modes(c, rng)
    add_animations(c, rng)
    add_exif(c, rng)
    add_foreign(c, rng)
    add_odd_sizes(c, rng)
    if non_utf8_name:
        add_non_utf8_name(c, rng)
    c.write_manifest()
    return c.entries


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--non-utf8-name", action="store_true", help="also a photo whose file name is not UTF-8")
    args = p.parse_args()
    start = time.perf_counter()
    entries = make_corpus(args.out_dir, args.non_utf8_name)
    counts: dict[str, int] = {}
    for e in entries.values():
        counts[e["category"]] = counts.get(e["category"], 0) + 1
    size = sum(os.path.getsize(os.path.join(args.out_dir, rel)) for rel in entries)
    print(f"{len(entries)} files ({size / 1e6:.1f} MB) in {args.out_dir} in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
