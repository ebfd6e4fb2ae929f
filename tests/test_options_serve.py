"""Options of ``serve`` (``--host``, ``--threads``, ``--top-k``, ``--max-request-pixels``), the statuses of
``/api/feedback`` (404 without ``--collect``, 411, 503), and the options of the commands that read what a server
collected (``review --json --collect-files``, ``monitor --model --last --since --json``): real gunicorn servers
started as children, a real SQLite store read here with sqlite3."""

import io
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import zipfile

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from children import run_cli, start_server, stop_server
from conftest import CLASSES

THREADS = 2
PIXELS = 5000  # --max-request-pixels: one 64 x 64 photo (4,096 pixels) passes, 80 x 80 (6,400) or two do not
LINE = re.compile(r"serving .* on (http://127\.0\.0\.2:(\d+))/ \(1 worker\(s\) x (\d+) threads\)")


def _png(seed: int, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _predict(url, *photos: bytes, timeout=60):
    return requests.post(url + "/api/predict", files=[("image", (f"p{i}.png", p, "image/png"))
                                                      for i, p in enumerate(photos)], timeout=timeout)


@pytest.fixture(scope="module")
def options_server(trained, tmp_path_factory):
    """``serve --host 127.0.0.2 --threads 2 --top-k 2 --max-request-pixels 5000`` (no --collect); its URL is read
    from its serve line (children.start_server reads 127.0.0.1 lines only)."""
    tmp = tmp_path_factory.mktemp("serve-options")
    log_path = tmp / "serve.log"
    log = open(log_path, "a+", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", trained[0]["model_path"], "--host",
                             "127.0.0.2", "--threads", str(THREADS), "--top-k", "2", "--max-request-pixels",
                             str(PIXELS), "--port", "0"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                            env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    deadline, found = time.monotonic() + 180, None
    while found is None or requests.get(found.group(1) + "/healthz", timeout=5).status_code != 200:
        if found is None:
            found = LINE.search(log_path.read_text(encoding="utf-8"))
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc, log)
            pytest.fail(f"server did not start: {log_path.read_text(encoding='utf-8')[-3000:]}")
        time.sleep(0.2)
    yield found.group(1), int(found.group(2)), int(found.group(3)), proc
    stop_server(proc, log)


def test_host_is_the_address_bound(options_server):
    url, port, _, proc = options_server
    listening = {c.laddr for c in psutil.Process(proc.pid).net_connections(kind="tcp") if c.status == "LISTEN"}
    assert listening == {("127.0.0.2", port)}
    assert requests.get(url + "/healthz", timeout=10).status_code == 200


def test_top_k_is_the_number_of_classes_listed(options_server, trained):
    url = options_server[0]
    rows = _predict(url, _png(1, 64)).json()["predictions"]
    assert len(CLASSES) == 3 and [len(r["top_k"]) for r in rows] == [2]  # the default, 3, would list all three
    assert len(requests.post(url + "/api/predict?top_k=1", files=[("image", ("a.png", _png(1, 64)))],
                             timeout=60).json()["predictions"][0]["top_k"]) == 1  # a request still asks its own


def test_max_request_pixels_refuses_a_bigger_request_and_answers_a_smaller_one(options_server):
    url = options_server[0]
    assert _predict(url, _png(2, 64)).status_code == 200  # 4,096 pixels
    big = _predict(url, _png(3, 80))  # 6,400
    assert big.status_code == 413
    assert big.json() == {"error": "p0.png: image of 80x80 pixels brings the request to 6,400 pixels, over the "
                                   "limit of 5,000 pixels per request"}
    two = _predict(url, _png(4, 64), _png(5, 64))  # 8,192 over the request
    assert two.status_code == 413 and two.json()["error"].startswith("p1.png: ")
    assert _predict(url, _png(6, 64)).status_code == 200  # and the server goes on


def test_threads_is_the_number_of_requests_served_at_once(options_server):
    """THREADS connections that send their headers and half a body each hold one request thread of the one worker;
    a further request waits until one of them ends. With one thread more (the default is 4), it would be answered
    at once. Waiting is checked by polling with a deadline, in this order: not answered while they hold every
    thread, then answered once one of them completes."""
    url, port, shown, _ = options_server
    assert shown == THREADS  # the serve line
    body = _png(7, 64)
    head = ("POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            "Content-Length: {n}\r\n\r\n")
    part = (b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"h.png\"\r\nContent-Type: image/png"
            b"\r\n\r\n" + body + b"\r\n--B--\r\n")
    holders = []
    try:
        for _ in range(THREADS):
            s = socket.create_connection(("127.0.0.2", port), timeout=60)
            s.sendall(head.format(n=len(part)).encode() + part[:100])
            holders.append(s)
        waiting = socket.create_connection(("127.0.0.2", port), timeout=60)
        waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        waiting.settimeout(4.0)
        with pytest.raises(socket.timeout):  # every thread is held: the request is not answered meanwhile
            waiting.recv(1)
        holders[0].sendall(part[100:])
        waiting.settimeout(60)
        assert waiting.recv(64).startswith(b"HTTP/1.1 200")
        assert holders[0].recv(64).startswith(b"HTTP/1.1 200")
        waiting.close()
    finally:
        for s in holders:
            s.close()


def test_feedback_without_collect_is_404(options_server):
    url = options_server[0]
    reply = requests.post(url + "/api/feedback", json={"prediction_id": "0" * 32, "kind": "right"}, timeout=10)
    assert reply.status_code == 404
    assert reply.json() == {"error": "feedback needs serve --collect DB (and a store that opens)"}


# ----- a collecting server: /api/feedback's 411 and 503; then review and monitor on what it stored -----

@pytest.fixture(scope="module")
def collected(trained, dataset, tmp_path_factory):
    """``serve --collect DB --collect-files FILES``, sent the 18 test photos in 6 requests; yields (url, db, files
    folder, the first reply's rows) while it runs (stopped at the end of the module)."""
    tmp = tmp_path_factory.mktemp("collected")
    db, files = str(tmp / "seen.db"), str(tmp / "uploads")
    proc, url, log = start_server([trained[0]["model_path"], "--collect", db, "--collect-files", files],
                                  tmp / "serve.log", cwd=tmp)
    photos = sorted(os.path.join(d, f) for d, _, fs in os.walk(dataset[1]) for f in fs)
    replies = []
    for i in range(0, len(photos), 3):
        reply = requests.post(url + "/api/predict", files=[("image", (os.path.basename(p), open(p, "rb").read(),
                                                                      "image/jpeg")) for p in photos[i:i + 3]],
                              timeout=120)
        assert reply.status_code == 200
        replies.append(reply.json()["predictions"])
    deadline = time.monotonic() + 60
    while _count(db) < len(photos):
        assert time.monotonic() < deadline, "the predictions were not stored"
        time.sleep(0.2)
    yield url, db, files, replies[0], proc, log
    stop_server(proc, log)


def _count(db, where: str = "", args=()) -> int:
    if not os.path.exists(db):
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute(f"select count(*) from predictions {where}", args).fetchone()[0]
        except sqlite3.OperationalError:  # the table is not made yet
            return 0


def test_feedback_without_a_content_length_is_411(collected):
    url, *_ = collected
    rows = collected[3]
    body = json.dumps({"prediction_id": rows[0]["prediction_id"], "kind": "right"}).encode()
    reply = requests.post(url + "/api/feedback", data=iter([body]), headers={"Content-Type": "application/json"},
                          timeout=30)  # a generator: sent chunked, without Content-Length
    assert reply.status_code == 411 and reply.json() == {"error": "a Content-Length is needed"}


def test_feedback_while_the_store_is_locked_is_503_then_recorded(collected):
    url, db, *_ = collected
    uid = collected[3][1]["prediction_id"]
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("begin exclusive")  # another program holds the write lock past the store's busy timeout
    try:
        locked = requests.post(url + "/api/feedback", json={"prediction_id": uid, "kind": "none"}, timeout=60)
    finally:
        holder.execute("rollback")
        holder.close()
    assert locked.status_code == 503
    assert locked.json() == {"error": "the store is unavailable; the correction was not recorded"}
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from feedback where prediction_uid = ?", (uid,)).fetchone()[0] == 0
    ok = requests.post(url + "/api/feedback", json={"prediction_id": uid, "kind": "none"}, timeout=60)
    assert ok.status_code == 200
    with sqlite3.connect(db) as conn:
        assert conn.execute("select kind from feedback where prediction_uid = ?", (uid,)).fetchall() == [("none",)]


def test_review_json_reads_the_uploads_from_collect_files(collected, trained, tmp_path):
    _, db, files, *_ = collected
    with sqlite3.connect(db) as conn:
        distinct = conn.execute("select count(distinct image) from predictions").fetchone()[0]
    args = ("review", db, "--model", trained[0]["model_path"], "-n", 5, "--dir", tmp_path / "r")
    missing = run_cli(*args, check=False)  # the default folder, DB.files, does not exist: nothing to review
    assert missing.returncode == 2 and "no collected photo to review" in missing.stderr
    done = json.loads(run_cli(*args, "--collect-files", files, "--json").stdout)
    assert done["candidates"] == distinct == 18 and len(done["queue"]) == 5
    assert all(os.path.commonpath([r["path"], files]) == files and os.path.isfile(r["path"]) for r in done["queue"])
    assert done["written"]["queue"] == str(tmp_path / "r" / "queue.csv")


def _with_metadata(model: str, out: str, change) -> str:
    """A copy of the model file whose transferkit.json is ``change(metadata)`` (what monitor reads of --model)."""
    from transferkit.models.modelfile import METADATA_NAME

    with zipfile.ZipFile(model) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == METADATA_NAME:
                data = json.dumps(change(json.loads(data))).encode("utf-8")
            dst.writestr(item, data)
    return out


def test_monitor_model_last_since_and_json(collected, trained, tmp_path):
    _, db, _, _, proc, log = collected
    stop_server(proc, log)  # everything is stored; the rows' times are changed below
    now = time.time()
    with sqlite3.connect(db) as conn:
        ids = [r[0] for r in conn.execute("select id from predictions order by id")]
        conn.executemany("update predictions set created = ? where id = ?",
                         [(now - 48 * 3600, i) for i in ids[:7]])  # 7 of 18 sent two days ago
    recent = _count(db, "where created >= ?", (now - 24 * 3600,))
    assert (len(ids), recent) == (18, 11)

    def monitor(*extra):
        return run_cli("monitor", db, "--out", tmp_path / "m", *extra)

    plain = monitor()
    assert plain.stdout.startswith("inputs have") and "{" not in plain.stdout
    whole = json.loads(monitor("--json").stdout)
    assert whole["window"] == 18 and whole["reference"] == trained_reference(trained)["n"]
    assert json.loads(monitor("--last", 5, "--json").stdout)["window"] == 5
    assert json.loads(monitor("--since", 24, "--json").stdout)["window"] == recent

    # --model: another file's reference and keep_known (a copy whose metadata says n 999 and keep_known 0.6)
    def change(meta):
        meta["reference"]["n"] = 999
        meta["training"]["keep_known"] = 0.6
        return meta

    other = _with_metadata(trained[0]["model_path"], str(tmp_path / "other.keras"), change)
    mine = json.loads(monitor("--model", other, "--json").stdout)
    assert mine["reference"] == 999 and whole["reference"] != 999
    expected = max(float(trained_reference(trained).get("unknown_rate", 0.0)), 1 - 0.6)
    assert mine["checks"]["unknown_rate"]["reference"] == pytest.approx(expected)
    assert whole["checks"]["unknown_rate"]["reference"] != pytest.approx(expected)


def trained_reference(trained) -> dict:
    from transferkit.models.modelfile import read_metadata

    return read_metadata(trained[0]["model_path"])["reference"]
