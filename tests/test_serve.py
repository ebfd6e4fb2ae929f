import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from browser import chromium, save_screenshot
from conftest import CLASSES

MAX_UPLOAD_MB = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained):
    """A real `transferkit serve` process (gunicorn) on 127.0.0.1 and a free port."""
    result, out = trained
    port = _free_port()
    log = open(os.path.join(out, "serve.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", result["model_path"], "--port", str(port),
                             "--max-upload-mb", str(MAX_UPLOAD_MB)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except requests.RequestException:  # refused, or queued while the worker loads the model
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            pytest.fail(f"server did not start: {log.read()[-2000:]}")
        time.sleep(0.5)
    yield url, result["model_path"], log
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _post(url, *files, **params):
    return requests.post(url + "/api/predict", files=[("image", f) for f in files], params=params, timeout=60)


def test_binds_loopback_by_default_and_reports_model(server):
    url, model_path, log = server
    log.seek(0)
    assert "on http://127.0.0.1:" in log.read()
    info = requests.get(url + "/api/model", timeout=10).json()
    assert info["class_names"] == sorted(CLASSES) and info["backbone"] == "efficientnet_lite0"
    assert info["validation"]["accuracy"] > 0.5
    page = requests.get(url + "/", timeout=10)
    assert page.status_code == 200 and "<input id=\"file\" type=\"file\"" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN


def test_http_predictions_equal_the_cli(server, dataset):
    url, model_path, _ = server
    paths = [os.path.join(dataset[1], c, "photo_001.jpg") for c in CLASSES]
    cli = subprocess.run([sys.executable, "-m", "transferkit", "predict", model_path, *paths, "--format", "json"],
                         capture_output=True, text=True, timeout=300)
    expected = json.loads(cli.stdout)
    handles = [(os.path.basename(p), open(p, "rb").read(), "image/jpeg") for p in paths]
    body = _post(url, *handles).json()  # several files: one batched call
    assert [p["filename"] for p in body["predictions"]] == ["photo_001.jpg"] * 3
    for got, want in zip(body["predictions"], expected):
        assert got["label"] == want["label"]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]


def _jpeg(seed=0, size=(64, 64)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, size + (3,), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_uploads_get_clear_errors_and_the_server_keeps_serving(server, tmp_path):
    url, _, _ = server
    big = _post(url, ("big.jpg", b"\xff" * (MAX_UPLOAD_MB * 1024 * 1024 + 1000), "image/jpeg"))
    assert big.status_code == 413 and "limit" in big.json()["error"]
    text = _post(url, ("notes.jpg", b"this is not an image", "image/jpeg"))
    assert text.status_code == 400 and text.json()["error"].startswith("notes.jpg: not an image")
    truncated = _post(url, ("cut.jpg", _jpeg()[:400], "image/jpeg"))
    assert truncated.status_code == 400 and "truncated" in truncated.json()["error"]
    bomb = io.BytesIO()
    Image.new("1", (10000, 10000)).save(bomb, "PNG")  # 100 Mpixel in a few kB: over Pillow's limit
    assert len(bomb.getvalue()) < MAX_UPLOAD_MB * 1024 * 1024
    refused = _post(url, ("bomb.png", bomb.getvalue(), "image/png"))
    assert refused.status_code == 400 and "too large" in refused.json()["error"]
    assert "\n" not in refused.json()["error"]
    missing = requests.post(url + "/api/predict", data={"x": "1"}, timeout=10)
    assert missing.status_code == 400
    before = set(os.listdir(os.getcwd()))
    sneaky = _post(url, ("../../etc/passwd", _jpeg(), "image/jpeg"))
    assert sneaky.status_code == 200 and sneaky.json()["predictions"][0]["filename"] == "passwd"
    assert set(os.listdir(os.getcwd())) == before
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    assert _post(url, ("ok.jpg", _jpeg(1), "image/jpeg")).status_code == 200


def test_fifty_concurrent_clients_ten_requests_each_no_errors(server):
    url, _, _ = server
    payloads = [_jpeg(i) for i in range(10)]

    def client(n):
        with requests.Session() as s:
            codes = []
            for i in range(10):
                r = s.post(url + "/api/predict", files=[("image", (f"c{n}_{i}.jpg", payloads[i], "image/jpeg"))],
                           timeout=120)
                codes.append(r.status_code if r.json()["predictions"][0]["label"] in CLASSES else -1)
            return codes

    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = [c for batch in pool.map(client, range(50)) for c in batch]
    assert len(codes) == 500 and set(codes) == {200}


def test_browser_upload_shows_label_and_probability(server, dataset):
    url, _, _ = server
    photo = os.path.join(dataset[1], "pêche pourrie", "photo_002.jpg")
    expected = _post(url, ("p.jpg", open(photo, "rb").read(), "image/jpeg")).json()["predictions"][0]
    driver = chromium()
    try:
        driver.get(url + "/")
        driver.find_element("id", "file").send_keys(os.path.abspath(photo))
        deadline = time.time() + 60
        while driver.execute_script("return document.body.dataset.state") != "done":
            assert time.time() < deadline, driver.find_element("id", "error").text
            time.sleep(0.2)
        assert driver.find_element("id", "label").text == expected["label"]
        assert driver.find_element("id", "probability").text == f"probability {expected['probability']:.3f}"
        assert driver.execute_script("return document.getElementById('preview').naturalWidth") > 0
        assert len(driver.find_elements("css selector", "#bars .bar")) == len(CLASSES)
        save_screenshot(driver, "serve_page.png")
    finally:
        driver.quit()
