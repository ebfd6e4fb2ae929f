"""Hostile and odd image files (benchmarks/make_hostile_corpus.py) through every entry point: the decoder, `transferkit
inspect`, training, `transferkit predict` and the web server. Zero crashes, no traceback in any output, every bad
file named with its reason (a too-large one with its size and the limit), the server answering after each."""

import importlib.util
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from transferkit.data import images
from transferkit.data.images import OverPixelBudget, UnreadableImage, check_pixel_budget, load_image, open_rgb
from transferkit.data.images import probe_image, sniff_format
from transferkit.errors import TransferkitError

from children import run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("make_hostile_corpus",
                                               os.path.join(HERE, "..", "benchmarks", "make_hostile_corpus.py"))
corpus_maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus_maker)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(corpus folder, manifest {relative path: {category, expect}}), generated once."""
    root = str(tmp_path_factory.mktemp("hostile") / "corpus")
    manifest = corpus_maker.make_corpus(root, non_utf8_name=sys.platform == "linux")  # Linux takes any bytes
    assert len(manifest) >= 200
    return root, manifest


def _files(corpus, expect=None):
    root, manifest = corpus
    return {os.path.join(root, rel): e for rel, e in manifest.items() if expect is None or e["expect"] == expect}


def _tiny_png_bomb(width=9000, height=9000) -> bytes:
    return corpus_maker.png_file(width, height, 1, 0, corpus_maker.zero_rows_zlib((width + 7) // 8, height))


# --- the decoder ----------------------------------------------------------------------------------------------

def test_tiny_png_of_9000x9000_is_refused_with_its_size_and_the_limit(tmp_path):
    data = _tiny_png_bomb()
    assert len(data) < 20_000  # a few kB that would decode to 81 Mpx
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    for call in (lambda: sniff_format(str(path)), lambda: load_image(str(path), 64),
                 lambda: load_image(data, 64, name="upload.png")):
        with pytest.raises(UnreadableImage, match=r"too large \(9000x9000 pixels; limit 40,000,000 pixels") as exc:
            call()
        assert "\n" not in str(exc.value)


def test_bombs_over_pillows_own_limit_still_name_their_size(tmp_path):
    cases = {"png": _tiny_png_bomb(20000, 20000), "webp": corpus_maker.webp_vp8x_with_canvas(10**6, 10**6),
             "gif": corpus_maker.gif_file((16, 16), (60000, 60000)),
             "jpg": corpus_maker.jpeg_with_size(_jpeg(), 65500, 65500)}
    sizes = {"png": "20000x20000", "webp": "1000000x1000000", "gif": "60000x60000", "jpg": "65500x65500"}
    for ext, data in cases.items():
        with pytest.raises(UnreadableImage, match=f"too large \\({sizes[ext]} pixels; limit 40,000,000"):
            load_image(data, 64, name=f"bomb.{ext}")


def test_pixel_budget_is_configurable(monkeypatch):
    data = _png(40, 40)
    monkeypatch.setenv("TRANSFERKIT_MAX_PIXELS", "1000")
    with pytest.raises(UnreadableImage, match=r"40x40 pixels; limit 1,000 pixels per image, set by TRANSFERKIT"):
        load_image(data, 8)
    monkeypatch.setattr(images, "MAX_PIXELS", 2000)  # the Python override wins over the environment
    assert load_image(data, 8).shape == (8, 8, 3)
    monkeypatch.setattr(images, "MAX_PIXELS", None)
    monkeypatch.setenv("TRANSFERKIT_MAX_PIXELS", "lots")
    with pytest.raises(TransferkitError, match="TRANSFERKIT_MAX_PIXELS must be a positive number"):
        load_image(data, 8)


def test_formats_outside_the_list_are_refused_without_being_parsed(monkeypatch, tmp_path):
    Image.init()
    called = []
    for fmt, (factory, accept) in list(Image.OPEN.items()):
        if fmt not in images.OPEN_FORMATS:
            def spy(fp, filename, _fmt=fmt, _factory=factory):
                called.append(_fmt)
                return _factory(fp, filename)
            monkeypatch.setitem(Image.OPEN, fmt, (spy, accept))
    img = Image.new("RGB", (8, 8), (200, 30, 30))
    for fmt, reason in (("EPS", "PostScript/EPS"), ("ICO", "ICO"), ("PCX", "not an image"), ("TGA", "not an image"),
                        ("PPM", "not an image"), ("JPEG2000", "JPEG 2000"), ("QOI", "QOI"), ("PDF", "PDF")):
        buf = io.BytesIO()
        img.save(buf, fmt)
        path = tmp_path / f"{fmt.lower()}.jpg"
        path.write_bytes(buf.getvalue())
        with pytest.raises(UnreadableImage, match=reason):
            sniff_format(str(path))
        with pytest.raises(UnreadableImage, match=reason):
            load_image(buf.getvalue(), 8, name="upload.jpg")
    assert called == []


def test_jpeg_counts_its_reduced_decode_but_a_progressive_one_its_full_size():
    baseline = corpus_maker.jpeg_with_size(_jpeg(), 9000, 9000)
    info = probe_image(baseline, draft_size=64)
    assert (info["width"], info["height"], info["decoded"]) == (9000, 9000, (1125, 1125))  # 1/8 scale: cheap
    progressive = corpus_maker.jpeg_with_size(_jpeg(progressive=True), 9000, 9000)
    with pytest.raises(UnreadableImage, match=r"9000x9000 pixels; limit"):  # every coefficient held in memory
        probe_image(progressive, draft_size=64)


def test_animations_decode_only_their_first_frame(corpus, monkeypatch):
    from PIL import GifImagePlugin, WebPImagePlugin

    seeks = []
    real_seek, real_next = GifImagePlugin.GifImageFile._seek, WebPImagePlugin.WebPImageFile._get_next
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", lambda self, f, *a: (seeks.append(f),
                                                                                  real_seek(self, f, *a))[1])
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "_get_next", lambda self: (seeks.append("webp"),
                                                                                 real_next(self))[1])
    files = {os.path.basename(p): p for p in _files(corpus)}
    assert load_image(files["animated_5000_frames.gif"], 32).shape == (32, 32, 3)
    assert load_image(files["animated_2000_frames.webp"], 32).shape == (32, 32, 3)
    assert seeks == [0, "webp"]


def test_every_exif_orientation_is_applied(corpus):
    files = {os.path.basename(p): p for p in _files(corpus)}
    for value in range(1, 9):
        path = files[f"exif_orientation_{value}.jpg"]
        with Image.open(path) as img:
            expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        got = np.asarray(open_rgb(path))
        assert got.shape == expected.shape == ((32, 48, 3) if value < 5 else (48, 32, 3))
        assert np.array_equal(got, expected)


def test_request_budget_is_summed_from_headers_before_decoding():
    small = _png(40, 40)
    assert check_pixel_budget([("a.png", small), ("b.png", small)], 64, 3200) == 3200
    with pytest.raises(OverPixelBudget, match=r"^c\.png: image of 40x40 pixels brings the request to 3,200 pixels, "
                                              r"over the limit of 3,000 pixels per request$"):
        check_pixel_budget([("a.png", small), ("c.png", small), ("never_read.png", b"")], 64, 3000)
    with pytest.raises(UnreadableImage, match="bomb.png: image too large"):  # per-image limit first: 400, not 413
        check_pixel_budget([("bomb.png", _tiny_png_bomb())], 64, 10**12)


def test_every_corpus_file_decodes_or_is_refused_with_a_reason(corpus):
    refused = {}
    for path, entry in _files(corpus).items():
        try:
            sniff_format(path)
            assert load_image(path, 32).shape == (32, 32, 3)
        except UnreadableImage as exc:
            assert exc.reason and "\n" not in exc.reason and exc.path == path
            refused[path] = exc.reason
        if entry["expect"] != "any":
            assert (path in refused) == (entry["expect"] == "refused"), (path, refused.get(path))
    for path, entry in _files(corpus).items():
        if entry["category"] == "decompression bomb" and path in refused:
            assert "x" in refused[path].split(" pixels")[0] and "limit" in refused[path], refused[path]


# --- the commands and the server ------------------------------------------------------------------------------

def test_inspect_names_every_bad_file(corpus, tmp_path):
    root, manifest = corpus
    report = json.loads(run_cli("inspect", root, "--json", "--out", str(tmp_path)).stdout)
    unreadable = {u["path"]: u["reason"] for u in report["unreadable"]}
    assert report["n_images"] + len(unreadable) == len(manifest)
    for path in _files(corpus, "refused"):
        assert unreadable.get(path), path
    assert not set(_files(corpus, "ok")) & set(unreadable)


@pytest.fixture(scope="module")
def hostile_model(corpus, tmp_path_factory):
    """`transferkit train` on the corpus (tiny settings): the model, and the run's skipped files."""
    root, _ = corpus
    out = str(tmp_path_factory.mktemp("hostile_run"))
    run_cli("train", root, "--image-size", "64", "--epochs", "2", "--augment-views", "1", "--runtime", "keras",
            "--out", out)
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        skipped = {s["path"]: s["reason"] for s in json.load(f)["skipped"]}
    return os.path.join(out, "model.keras"), skipped


def test_training_skips_every_bad_file_with_its_reason(corpus, hostile_model):
    _, skipped = hostile_model
    for path in _files(corpus, "refused"):
        assert skipped.get(path), path
    assert not set(_files(corpus, "ok")) & set(skipped)


def test_predict_gives_every_file_a_row(corpus, hostile_model):
    root, manifest = corpus
    rows = json.loads(run_cli("predict", hostile_model[0], root, "--format", "json", "--runtime", "keras").stdout)
    assert len(rows) == len(manifest)
    by_path = {r["path"]: r for r in rows}
    for path, entry in _files(corpus).items():
        row = by_path[path]
        if entry["expect"] == "refused":
            assert row["error"] and row["label"] is None, path
        if entry["expect"] == "ok":  # decoded and answered (a class, or "unknown" for a photo unlike them)
            assert (row["label"] or row["unknown"]) and not row.get("error"), (path, row.get("error"))


def test_server_refuses_each_bad_upload_and_keeps_answering(corpus, hostile_model):
    from transferkit.apps.serve import create_app
    from transferkit.options import ServeOptions

    client = create_app(hostile_model[0], ServeOptions(runtime="keras")).test_client()
    good = ("good.jpg", _jpeg())

    def post(*files):
        return client.post("/api/predict", data={"image": [(io.BytesIO(d), n) for n, d in files]},
                           content_type="multipart/form-data")

    for path, entry in _files(corpus).items():
        name = os.fsencode(os.path.basename(path)).decode("utf-8", "replace")  # what a browser would send
        with open(path, "rb") as f:
            r = post((name, f.read()))
        assert r.status_code in (200, 400, 413), (path, r.status_code)
        if r.status_code != 200:
            message = r.get_json()["error"]
            assert message.startswith(f"{name}: ") and "\n" not in message, message
            assert post(good).status_code == 200  # and the server goes on
        assert (r.status_code != 200) == (entry["expect"] == "refused") or entry["expect"] == "any", (path, r.json)
    bomb = _tiny_png_bomb(6000, 6000)  # 36 Mpx: within the image limit, 3 of them over the request's 100 Mpx
    r = post(good, ("a.png", bomb), ("b.png", bomb), ("c.png", bomb), good)
    assert r.status_code == 413
    assert r.get_json()["error"] == ("c.png: image of 6000x6000 pixels brings the request to 108,003,072 pixels, "
                                     "over the limit of 100,000,000 pixels per request")
    assert post(good).status_code == 200


def _png(width, height) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 30)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(progressive=False) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG", progressive=progressive)
    return buf.getvalue()
