import io

import numpy as np
import pytest
from PIL import Image

from transferkit.data.images import UnreadableImage, load_image, open_rgb, sniff_format


def _jpeg_bytes(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def test_truncated_jpeg_is_unreadable_with_reason(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _jpeg_bytes(arr)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    sniff_format(str(path))  # the header is fine ...
    with pytest.raises(UnreadableImage, match="cut.jpg: cannot decode: truncated"):
        load_image(str(path), 32)  # ... the pixels are not


def test_zero_byte_and_text_files_are_unreadable(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    with pytest.raises(UnreadableImage, match="empty file"):
        sniff_format(str(empty))
    with pytest.raises(UnreadableImage, match="not an image"):
        sniff_format(str(text))
    with pytest.raises(UnreadableImage, match="not an image"):
        load_image(str(text), 32)


def test_format_is_recognised_by_content_not_extension(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (10, 10), (1, 2, 3)).save(path, "PNG")
    assert sniff_format(str(path)) == "PNG"
    for fmt, ext in (("WEBP", "webp"), ("TIFF", "tif"), ("BMP", "bmp"), ("GIF", "gif")):
        p = tmp_path / f"x.{ext}"
        Image.new("RGB", (10, 10), (200, 10, 10)).save(p, fmt)
        assert sniff_format(str(p)) == fmt
        assert load_image(str(p), 8).shape == (8, 8, 3)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # pure red in CMYK
    r, g, b = load_image(str(path), 16)[8, 8].astype(int)
    assert r > 200 and g < 50 and b < 50


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    arr = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(arr).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    out = np.asarray(open_rgb(str(path)))
    assert out.shape == (8, 64, 3)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert abs(int(out[0, 32, 0]) - round(arr[0, 32] / 257)) <= 1  # mid-grey stays mid-grey


def test_rgba_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "cutout.png"
    arr = np.zeros((10, 10, 4), np.uint8)  # transparent black ...
    arr[:5, :, :] = (255, 0, 0, 255)  # ... under an opaque red top half
    Image.fromarray(arr, "RGBA").save(path)
    out = np.asarray(open_rgb(str(path)))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[9, 9]) == (255, 255, 255)


def test_grey_and_palette_images_become_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (6, 6), 77).save(grey)
    assert tuple(np.asarray(open_rgb(str(grey)))[0, 0]) == (77, 77, 77)
    pal = tmp_path / "pal.gif"
    Image.new("RGB", (6, 6), (0, 0, 255)).convert("P").save(pal)
    assert tuple(np.asarray(open_rgb(str(pal)))[0, 0]) == (0, 0, 255)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(arr).save(path, "JPEG", quality=95, exif=exif.tobytes())
    out = np.asarray(open_rgb(str(path)))
    assert out.shape == (40, 20, 3)  # portrait, as the phone showed it
    assert out[2, 10, 0] > 200 and out[2, 10, 2] < 60  # left (red) is now on top
    assert out[-3, 10, 2] > 200


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # Pillow's own limit, lowered for a small file
    with pytest.raises(UnreadableImage, match="too large"):
        open_rgb(str(path))
    with pytest.raises(UnreadableImage, match="too large"):
        open_rgb(path.read_bytes(), name="upload.png")


def test_resize_gives_square_uint8(tmp_path):
    path = tmp_path / "wide.jpg"
    path.write_bytes(_jpeg_bytes(np.full((30, 90, 3), 128, np.uint8)))
    out = load_image(str(path), 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
