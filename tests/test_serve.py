import http.client
import io
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

import transferkit.apps
from browser import chromium, save_screenshot
from children import port_of, run_cli, start_server, stop_server
from children import post_images as _post
from conftest import CLASSES

MAX_UPLOAD_MB = 2
STATIC = os.path.join(os.path.dirname(transferkit.apps.__file__), "static")  # Flask's static folder of the app


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """A real `transferkit serve` process (gunicorn) on 127.0.0.1 and the port it bound (``--port 0``), started
    in a folder of its own that holds a secret file, as does the model's folder: what a path-traversal request
    would be after. Yields (url, model path, log, port, secret files, the server's working folder)."""
    result, out = trained
    home = tmp_path_factory.mktemp("serve-home")
    secret_files = {}
    for folder in (str(home), os.path.dirname(result["model_path"])):
        path = os.path.join(folder, "secret.txt")
        secret_files[path] = f"secret-{secrets.token_hex(16)}"
        with open(path, "w") as f:
            f.write(secret_files[path] + "\n")
    proc, url, log = start_server([result["model_path"], "--max-upload-mb", MAX_UPLOAD_MB],
                                  os.path.join(out, "serve.log"), cwd=home, timeout=180)
    yield url, result["model_path"], log, port_of(url), secret_files, str(home)
    stop_server(proc, log, timeout=30)
    for path in secret_files:
        os.remove(path)


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets LISTENing on TCP ``port``, from the kernel's own tables (Linux)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, local_port = local.split(":")
            if state != "0A" or int(local_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if sys.byteorder == "little":  # the table prints each 32-bit word in host order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def _own_non_loopback_addresses() -> set[str]:
    """This machine's IPv4 addresses other than loopback (its interfaces as the kernel routes to them)."""
    found = set()
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
        found |= {prev.split()[-1] for prev, line in zip(lines, lines[1:]) if line.strip() == "/32 host LOCAL"}
    except FileNotFoundError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: the kernel only picks the outgoing address
            found.add(s.getsockname()[0])
        except OSError:
            pass
    return {a for a in found if not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_unspecified}


def test_binds_loopback_by_default_and_reports_model(server):
    url, model_path, log, port, *_ = server
    # the socket itself, as the kernel has it: listening on loopback only, not on 0.0.0.0 or ::
    if sys.platform.startswith("linux"):
        assert _listening_addresses(port) == {"127.0.0.1"}
    # and not reachable on this machine's other addresses
    for address in _own_non_loopback_addresses():
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=3).close()
    log.seek(0)
    assert "on http://127.0.0.1:" in log.read()  # and it says so
    info = requests.get(url + "/api/model", timeout=10).json()
    assert info["class_names"] == sorted(CLASSES) and info["backbone"] == "efficientnet_lite0"
    assert info["validation"]["accuracy"] > 0.5
    page = requests.get(url + "/", timeout=10)
    assert page.status_code == 200 and "<input id=\"file\" type=\"file\"" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN


def test_http_predictions_equal_the_cli(server, dataset):
    url, model_path, *_ = server
    paths = [os.path.join(dataset[1], c, "photo_001.jpg") for c in CLASSES]
    cli = run_cli("predict", model_path, *paths, "--format", "json", timeout=300)
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
    url, model_path, *_, home = server
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
    # nothing written where an upload's name joined to a folder would land: the server's own working folder (not
    # this pytest process's, which the server does not run in) and the model's folder
    folders = (home, os.path.dirname(model_path))
    before = {folder: set(os.listdir(folder)) for folder in folders}
    sneaky = _post(url, ("../../etc/passwd", _jpeg(), "image/jpeg"))
    assert sneaky.status_code == 200 and sneaky.json()["predictions"][0]["filename"] == "passwd"
    assert {folder: set(os.listdir(folder)) for folder in folders} == before
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    assert _post(url, ("ok.jpg", _jpeg(1), "image/jpeg")).status_code == 200


def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written (no client-side clean-up of ../ or %2e%2e, unlike requests)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


UP = ("../", "%2e%2e/", "%2e%2e%2f", "..%2f", ".%2e/", "%2e./", "..%5c", "..\\", "%252e%252e%252f", "....//",
      "%c0%ae%c0%ae/")


def _traversal_requests(port: int, files: dict[str, str]) -> list[str]:
    """Try to read each of ``files`` (path -> a text only that file holds) through every spelling of ../ and
    absolute paths, from the static folder and the root; the requests whose reply held a file's text."""
    leaks = []
    for path, marker in files.items():
        relative = os.path.relpath(path, STATIC).replace(os.sep, "/")
        deep = "../" * 12 + path.lstrip("/")  # enough ../ whatever the static folder's depth
        for route in ("/static/", "/", "/api/"):
            targets = [route + p.replace("../", up) for up in UP for p in (relative, deep)]
            targets += [route + "/" + path.lstrip("/"), route + "%2f" + path.lstrip("/").replace("/", "%2f")]
            targets += [route + os.path.basename(path)]  # by name, as the server's own folder would have it
            for target in targets:
                status, body = _raw_get(port, target)
                if marker.encode() in body:
                    leaks.append(f"{target} -> {status}")
    return leaks


def test_no_file_outside_the_app_can_be_read_by_path_traversal(server):
    """Secret files beside the server (its working folder, the model's folder), the app's own source and
    /etc/passwd, asked for with ../ in every encoding: none of their content ever comes back."""
    url, _, _, port, secret_files, _ = server
    files = dict(secret_files)
    with open(os.path.join(os.path.dirname(STATIC), "serve.py"), encoding="utf-8") as f:
        assert "def create_app(" in f.read()
    files[os.path.join(os.path.dirname(STATIC), "serve.py")] = "def create_app("
    if os.path.isfile("/etc/passwd"):
        with open("/etc/passwd") as f:
            first = f.readline().strip()
        if first:
            files["/etc/passwd"] = first
    assert _traversal_requests(port, files) == []
    # the same names through the upload field are only echoed back, never opened
    for path in secret_files:
        sneaky = _post(url, (os.path.relpath(path, STATIC), _jpeg(), "image/jpeg"))
        assert sneaky.status_code == 200 and sneaky.json()["predictions"][0]["filename"] == "secret.txt"
        assert secret_files[path] not in sneaky.text
    assert requests.get(url + "/healthz", timeout=10).status_code == 200


def test_fifty_concurrent_clients_ten_requests_each_get_the_one_at_a_time_answer(server, dataset):
    """500 requests from 50 threads: each reply is the reply the same photo gets alone (label, probability and
    the file name it was sent under), so no request gets another's answer or a number from a shared batch."""
    url, *_ = server
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(dataset[1]) for f in fs)
    payloads = [open(paths[i], "rb").read() for i in np.linspace(0, len(paths) - 1, 10).astype(int)]
    alone = [_post(url, ("alone.jpg", p, "image/jpeg")).json()["predictions"][0] for p in payloads]

    def same(a, b):  # the same labels in the same order, the same probabilities and novelty up to float rounding
        return [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]] and np.allclose(
            [t["probability"] for t in a["top_k"]] + [a["novelty"]],
            [t["probability"] for t in b["top_k"]] + [b["novelty"]], rtol=1e-4, atol=1e-9)

    assert len({a["top_k"][0]["label"] for a in alone}) == len(CLASSES)  # photos of every class
    assert not any(same(a, b) for i, a in enumerate(alone) for b in alone[i + 1:])  # a mixed-up reply would show

    def client(n):
        with requests.Session() as s:
            mismatches = []
            for i in range(10):
                name = f"c{n}_{i}.jpg"
                r = s.post(url + "/api/predict", files=[("image", (name, payloads[i], "image/jpeg"))], timeout=120)
                got = r.json()["predictions"][0] if r.status_code == 200 else {}
                if got.get("filename") != name or not same(got, alone[i]):
                    mismatches.append((name, r.status_code, got))
            return mismatches

    with ThreadPoolExecutor(max_workers=50) as pool:
        mismatches = [m for batch in pool.map(client, range(50)) for m in batch]
    assert mismatches == []


def test_browser_upload_shows_label_and_probability(server, dataset):
    url, *_ = server
    photo = os.path.join(dataset[1], "pêche pourrie", "photo_002.jpg")
    expected = _post(url, ("p.jpg", open(photo, "rb").read(), "image/jpeg")).json()["predictions"][0]
    assert expected["label"] == "pêche pourrie"  # the photo's own class: the page then shows a right answer
    driver = chromium()
    try:
        driver.get(url + "/")
        driver.find_element("id", "file").send_keys(os.path.abspath(photo))
        deadline = time.time() + 60
        while driver.execute_script("return document.body.dataset.state") != "done":
            assert time.time() < deadline, driver.find_element("id", "error").text
            time.sleep(0.2)
        assert driver.find_element("id", "label").text == expected["label"]
        assert driver.find_element("id", "probability").text == (f"probability {expected['probability']:.3f} · "
                                                                 f"novelty {expected['novelty']:.2f}")
        assert driver.execute_script("return document.getElementById('preview').naturalWidth") > 0
        assert len(driver.find_elements("css selector", "#bars .bar")) == len(CLASSES)
        save_screenshot(driver, "serve_page.png")
    finally:
        driver.quit()


def test_browser_says_none_of_these_for_a_photo_of_something_else(server, tmp_path):
    """A photo of none of the classes (a cat, for a model of camera/coins/page crops): the page says so, with the
    nearest classes still drawn as bars."""
    from skimage import data as skdata
    from PIL import Image

    url, *_ = server
    photo = str(tmp_path / "chat.jpg")
    Image.fromarray(skdata.chelsea()).save(photo)
    expected = _post(url, ("chat.jpg", open(photo, "rb").read(), "image/jpeg")).json()["predictions"][0]
    assert expected["unknown"] is True and expected["label"] is None
    driver = chromium()
    try:
        driver.get(url + "/")
        driver.find_element("id", "file").send_keys(photo)
        deadline = time.time() + 60
        while driver.execute_script("return document.body.dataset.state") != "done":
            assert time.time() < deadline, driver.find_element("id", "error").text
            time.sleep(0.2)
        assert driver.find_element("id", "label").text == "none of: " + ", ".join(sorted(CLASSES))
        assert driver.find_element("id", "probability").text.startswith("unknown (novelty ")
        assert len(driver.find_elements("css selector", "#bars .bar")) == len(CLASSES)
        save_screenshot(driver, "serve_page_unknown.png")
    finally:
        driver.quit()


def _data_uri_image(uri: str) -> Image.Image:
    import base64

    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_explain_adds_a_heat_map_and_ordinary_answers_stay_as_they_were(server, dataset):
    url, *_ = server
    photo = ("p.jpg", open(os.path.join(dataset[1], "grenade", "photo_003.jpg"), "rb").read(), "image/jpeg")
    plain = _post(url, photo).json()["predictions"][0]
    assert "explanation" not in plain
    explained = _post(url, photo, photo, explain=1).json()["predictions"]
    for row in explained:
        assert row["label"] == plain["label"] and row["unknown"] == plain["unknown"]
        assert row["probability"] == pytest.approx(plain["probability"], abs=1e-5)
        with _data_uri_image(row["explanation"]) as img:
            assert img.format == "PNG" and img.size == (80, 64)  # drawn over the upload itself (80 x 64 crops)
            pixels = np.asarray(img.convert("RGB"), float)
    assert np.abs(pixels - np.asarray(Image.open(io.BytesIO(photo[1])).convert("RGB"), float)).mean() > 10
    assert "explanation" not in _post(url, photo, explain=0).json()["predictions"][0]


CACHED_SERVER = """
import sys, json
from transferkit.apps.serve import create_app
from transferkit.options import ServeOptions
app = create_app(sys.argv[1], ServeOptions(runtime="openvino"))
client = app.test_client()
photo = open(sys.argv[2], "rb").read()
import io
seen = {"start": "tensorflow" in sys.modules}
plain = client.post("/api/predict", data={"image": (io.BytesIO(photo), "p.jpg")}).get_json()["predictions"][0]
seen["after_plain"] = "tensorflow" in sys.modules
explained = client.post("/api/predict?explain=1", data={"image": (io.BytesIO(photo), "p.jpg")}).get_json()
seen["after_explain"] = "tensorflow" in sys.modules
seen["same_label"] = explained["predictions"][0]["label"] == plain["label"]
seen["has_heat_map"] = explained["predictions"][0]["explanation"].startswith("data:image/png;base64,")
print(json.dumps(seen))
"""


def test_cached_engine_server_loads_tensorflow_at_the_first_explain_request_only(trained, dataset):
    """The server on a converted engine (no TensorFlow): an ordinary request still imports none; the first
    ?explain=1 loads the Keras model for its gradients."""
    import transferkit

    result, _ = trained
    photo = os.path.join(dataset[1], "grenade", "photo_004.jpg")
    transferkit.predict(result["model_path"], [photo], runtime="openvino")  # leaves the checked conversion cached
    proc = subprocess.run([sys.executable, "-c", CACHED_SERVER, result["model_path"], photo], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"start": False, "after_plain": False, "after_explain": True, "same_label": True,
                    "has_heat_map": True}


def test_browser_toggle_shows_the_heat_map(server, dataset):
    url, *_ = server
    photo = os.path.join(dataset[1], "fraise fraîche", "photo_001.jpg")
    driver = chromium()
    try:
        driver.get(url + "/")
        driver.find_element("id", "file").send_keys(os.path.abspath(photo))
        _wait_done(driver)
        assert driver.execute_script("return document.getElementById('heatmap').hidden") is True  # off by default
        assert driver.find_element("id", "label").text == "fraise fraîche"  # the photo's own class
        driver.find_element("id", "explain").click()  # on: the same photo again, with its heat map
        deadline = time.time() + 120
        while not driver.execute_script("const h = document.getElementById('heatmap');"
                                        "return !h.hidden && h.complete && h.naturalWidth > 0"):
            assert time.time() < deadline, driver.find_element("id", "error").text
            time.sleep(0.2)
        assert driver.find_element("id", "label").text == "fraise fraîche"  # the same answer, now explained
        save_screenshot(driver, "serve_page_heatmap.png")
        driver.find_element("id", "explain").click()
        assert driver.execute_script("return document.getElementById('heatmap').hidden") is True
    finally:
        driver.quit()


def _wait_done(driver, seconds: int = 60) -> None:
    deadline = time.time() + seconds
    while driver.execute_script("return document.body.dataset.state") != "done":
        assert time.time() < deadline, driver.find_element("id", "error").text
        time.sleep(0.2)
