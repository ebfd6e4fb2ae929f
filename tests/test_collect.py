"""serve --collect: real gunicorn servers writing a real SQLite file (and a real PostgreSQL server), the feedback
endpoint, /metrics parsed by prometheus_client, and the page's correction buttons in headless Chromium."""

import os
import signal
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from browser import chromium, save_screenshot
from children import port_of, post_images, start_server, stop_server, wait_healthy
from conftest import CLASSES, hardware_reason, missing
from test_serve import _raw_get

TOKEN = "s3cret-token"


def _start(model_path, tmp, *extra, workers=1):
    """A real ``transferkit serve`` (``--port 0``, the port read from its log) in the folder ``tmp``."""
    log_path = os.path.join(tmp, f"serve-{uuid.uuid4().hex[:8]}.log")
    proc, url, log = start_server([model_path, "--workers", workers, *extra], log_path, cwd=tmp, timeout=180)
    return url, proc, log


def _photos(dataset, n=20):
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(dataset[0]) for f in fs)
    return [open(p, "rb").read() for p in paths[:: max(1, len(paths) // n)][:n]]


def _metrics(url) -> dict:
    """{(sample name, frozenset(labels)): value} of /metrics, read with prometheus_client's own parser."""
    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples}


def _collected(m: dict, outcome: str) -> float:
    return m.get(("transferkit_collect_total", frozenset({("outcome", outcome)})), 0.0)


def _rows(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("select uid, image, ext from predictions").fetchall()


def _wait_rows(count_rows, want, seconds=30):
    deadline = time.time() + seconds
    while (n := count_rows()) < want and time.time() < deadline:
        time.sleep(0.2)
    return n


def _wait_committed(db, uids, seconds=30):
    """Until every one of the answered uploads ``uids`` has its row in ``db`` (a writer commits its batch within
    50 ms): polled, failing past ``seconds``."""
    deadline = time.time() + seconds
    while missing_rows := set(uids) - {uid for uid, _, _ in _rows(db)}:
        assert time.time() < deadline, f"{len(missing_rows)} answered upload(s) never stored"
        time.sleep(0.1)


def _ids(replies) -> list[str]:
    return [r.json()["predictions"][0]["prediction_id"] for r in replies]


def _wait_both_workers(url, db, seconds=180):
    """/healthz answers once one worker has loaded the model: wait until rows come from both, and until every
    warm-up upload's row is committed (none left in a writer's batch to be counted by a test as its own)."""
    deadline, warm = time.time() + seconds, []
    while True:
        with sqlite3.connect(db) as conn:
            n = conn.execute("select count(distinct worker) from predictions").fetchone()[0]
        if n >= 2:
            _wait_committed(db, warm)
            return
        photo = ("warm.jpg", _jpeg_bytes(), "image/jpeg")
        with ThreadPoolExecutor(max_workers=8) as pool:
            replies = list(pool.map(lambda _: post_images(url, photo), range(8)))
        assert [r.status_code for r in replies] == [200] * 8
        warm += _ids(replies)
        assert time.time() < deadline, "the second worker never answered"


def _jpeg_bytes():
    from test_serve import _jpeg

    return _jpeg(7)


@pytest.fixture(scope="module")
def collecting(trained, tmp_path_factory):
    result, _ = trained
    tmp = str(tmp_path_factory.mktemp("collect"))
    db = os.path.join(tmp, "seen.db")
    url, proc, log = _start(result["model_path"], tmp, "--collect", db, "--feedback-token", TOKEN, workers=2)
    _wait_both_workers(url, db)
    yield url, proc, log, db
    stop_server(proc, log)


def test_200_concurrent_uploads_on_two_workers_give_one_row_each(collecting, dataset):
    url, _, _, db = collecting
    photos = _photos(dataset)
    warm = {uid for uid, _, _ in _rows(db)}  # the fixture's warm-up rows (one photo)
    with ThreadPoolExecutor(max_workers=50) as pool:
        replies = list(pool.map(lambda i: post_images(url, (f"u{i}.jpg", photos[i % len(photos)])), range(200)))
    assert [r.status_code for r in replies] == [200] * 200
    ids = _ids(replies)
    assert len(set(ids)) == 200
    assert _wait_rows(lambda: len(_rows(db)), len(warm) + 200) == len(warm) + 200
    rows = [r for r in _rows(db) if r[0] not in warm]
    assert sorted(uid for uid, _, _ in rows) == sorted(ids)  # every answered upload: exactly one row
    with sqlite3.connect(db) as conn:
        workers = conn.execute("select count(distinct worker) from predictions").fetchone()[0]
    assert workers == 2  # both workers wrote to the one file
    files = [f for d, _, fs in os.walk(db + ".files") for f in fs]
    assert len(files) == len(set(photos)) + 1 == len({image for _, image, _ in rows}) + 1  # one per content
    assert all(f.endswith(".jpg") and len(f) == 64 + 4 for f in files)
    m = _metrics(url)
    assert _collected(m, "stored") >= 200
    assert m[("transferkit_images_total", frozenset())] >= 200
    assert m[("transferkit_request_seconds_count", frozenset())] >= 200
    assert sum(v for (name, labels), v in m.items() if name == "transferkit_answers_total") >= 200


def test_feedback_is_recorded_against_the_prediction_and_refused_when_unsafe(collecting, dataset):
    url, _, _, db = collecting
    uid = _ids([post_images(url, _photos(dataset)[0])])[0]
    good = {"prediction_id": uid, "kind": "wrong", "label": CLASSES[1]}
    headers = {"X-Feedback-Token": TOKEN}
    assert requests.post(url + "/api/feedback", json=good, timeout=10).status_code == 401  # no token
    assert requests.post(url + "/api/feedback", json=good, headers={"X-Feedback-Token": "x"}, timeout=10).status_code == 401
    form = requests.post(url + "/api/feedback", data=good, headers=headers, timeout=10)  # a cross-site form's kind
    assert form.status_code == 415
    evil = requests.post(url + "/api/feedback", json=good, headers=headers | {"Origin": "http://evil.example"},
                         timeout=10)
    assert evil.status_code == 403
    big = requests.post(url + "/api/feedback", json=good | {"pad": "x" * 5000}, headers=headers, timeout=10)
    assert big.status_code == 413
    missing = requests.post(url + "/api/feedback", json=good | {"prediction_id": uuid.uuid4().hex}, headers=headers,
                            timeout=10)
    assert missing.status_code == 404
    assert requests.post(url + "/api/feedback", json=good | {"kind": "maybe"}, headers=headers,
                         timeout=10).status_code == 400
    ok = requests.post(url + "/api/feedback", json=good, headers=headers, timeout=10)
    assert ok.status_code == 200 and ok.json()["recorded"] is True
    with sqlite3.connect(db) as conn:
        assert conn.execute("select kind, label from feedback where prediction_uid = ?", (uid,)).fetchall() == [
            ("wrong", CLASSES[1])]
    # the store and its files are never served: not by name, not by hash, not through ../
    port = port_of(url)
    uid, image, ext = _rows(db)[0]
    stored = open(os.path.join(db + ".files", image[:2], f"{image}.{ext}"), "rb").read()
    for target in ("/seen.db", "/seen.db.files/" + image[:2] + "/" + image + "." + ext, "/static/../seen.db",
                   "/static/%2e%2e/seen.db", "/" + image, "/api/" + image, "/static/" + image + "." + ext):
        status, body = _raw_get(port, target)
        assert status in (400, 404, 405) and b"SQLite format" not in body and stored[:400] not in body, target
    m = _metrics(url)
    assert m[("transferkit_feedback_total", frozenset({("kind", "wrong")}))] >= 1
    assert m[("transferkit_errors_total", frozenset({("kind", "unauthorised")}))] >= 2


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason=hardware_reason("reads worker pids from /proc"))
def test_kill_9_of_a_worker_loses_no_committed_row_and_the_server_goes_on(collecting, dataset):
    url, proc, log, db = collecting
    photos = _photos(dataset)
    replies = [post_images(url, photos[i]) for i in range(10)]
    assert [r.status_code for r in replies] == [200] * 10
    _wait_committed(db, _ids(replies))  # the writers' queues drained: those rows are committed
    committed = len(_rows(db))
    victim = _children(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    assert len(_rows(db)) == committed  # nothing committed was lost
    with sqlite3.connect(db) as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    deadline = time.time() + 120
    while victim in _children(proc.pid) or len(_children(proc.pid)) < 2:  # gunicorn starts a new worker
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.5)
    assert wait_healthy(url, proc, 180), "no worker answers after the kill"
    replies = [post_images(url, photos[i]) for i in range(6)]
    assert all(r.status_code == 200 for r in replies)
    assert _wait_rows(lambda: len(_rows(db)), committed + 6) >= committed + 6


def test_a_corrupt_database_degrades_to_not_collected_never_a_failed_answer(trained, dataset, tmp_path):
    db = str(tmp_path / "corrupt.db")
    with open(db, "wb") as f:
        f.write(b"this is not a database " * 500)
    url, proc, log = _start(trained[0]["model_path"], str(tmp_path), "--collect", db)
    try:
        replies = [post_images(url, p) for p in _photos(dataset, 3)]
        assert all(r.status_code == 200 for r in replies)
        assert all("prediction_id" not in r.json()["predictions"][0] for r in replies)
        assert _collected(_metrics(url), "not_collected") >= 3
        page = requests.get(url + "/api/model", timeout=10).json()
        assert page["feedback"] == {"enabled": False, "token": False}
    finally:
        stop_server(proc, log)
    log = open(log.name).read()
    assert "not collected" in log and "Traceback" not in log


def test_a_locked_database_degrades_to_not_collected_and_recovers(trained, dataset, tmp_path):
    db = str(tmp_path / "locked.db")
    url, proc, log = _start(trained[0]["model_path"], str(tmp_path), "--collect", db)
    photos = _photos(dataset, 4)
    try:
        assert post_images(url, photos[0]).status_code == 200
        assert _wait_rows(lambda: len(_rows(db)), 1) == 1
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("begin exclusive")  # another program holds the write lock
        try:
            assert all(post_images(url, p).status_code == 200 for p in photos[1:])
            deadline = time.time() + 30
            while _collected(_metrics(url), "not_collected") < 3:
                assert time.time() < deadline
                time.sleep(0.3)
        finally:
            holder.execute("rollback")
            holder.close()
        assert post_images(url, photos[0]).status_code == 200
        assert _wait_rows(lambda: len(_rows(db)), 2) == 2  # collected again once the lock is gone
    finally:
        stop_server(proc, log)


@pytest.fixture
def postgres_url():
    """A database of its own on the PostgreSQL server of TRANSFERKIT_TEST_POSTGRES (.ci/run starts one),
    dropped after the test. Without the server: a skip, a failure under CI=true."""
    admin = os.environ.get("TRANSFERKIT_TEST_POSTGRES")
    if not admin:
        missing("TRANSFERKIT_TEST_POSTGRES is not set (.ci/run starts a PostgreSQL server: .ci/postgres.sh)")
    import sqlalchemy as sa

    from transferkit.data.collected import store_url

    name = f"transferkit_test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(store_url(admin), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield admin.rsplit("/", 1)[0] + "/" + name
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    engine.dispose()


def test_postgresql_store_with_two_workers(trained, dataset, tmp_path, postgres_url):
    from transferkit.data.collected import Store

    url, proc, log = _start(trained[0]["model_path"], str(tmp_path), "--collect", postgres_url, "--collect-files",
                            str(tmp_path / "files"), workers=2)
    try:
        photos = _photos(dataset, 10)
        with ThreadPoolExecutor(max_workers=20) as pool:
            replies = list(pool.map(lambda i: post_images(url, photos[i % 10]), range(60)))
        assert all(r.status_code == 200 for r in replies)
        ids = {r.json()["predictions"][0]["prediction_id"] for r in replies}
        store = Store(postgres_url, str(tmp_path / "files"), create=False)
        assert _wait_rows(store.count, 60) == 60
        rows, _ = store.read()
        assert {r["uid"] for r in rows} == ids
        fix = requests.post(url + "/api/feedback", json={"prediction_id": rows[0]["uid"], "kind": "none"}, timeout=10)
        assert fix.status_code == 200
        assert store.read()[1][rows[0]["uid"]]["kind"] == "none"
        store.close()
    finally:
        stop_server(proc, log)


def test_browser_correction_buttons_record_the_correction(collecting, dataset):
    url, _, _, db = collecting
    photo = os.path.join(dataset[1], CLASSES[0], "photo_001.jpg")
    driver = chromium()
    try:
        driver.get(url + "/")
        deadline = time.time() + 30
        while not driver.execute_script("return document.getElementById('fb-label').options.length"):
            assert time.time() < deadline
            time.sleep(0.2)
        driver.find_element("id", "file").send_keys(os.path.abspath(photo))
        deadline = time.time() + 60
        while driver.execute_script("return document.body.dataset.state") != "done":
            assert time.time() < deadline, driver.find_element("id", "error").text
            time.sleep(0.2)
        assert driver.find_element("id", "feedback").is_displayed()
        driver.find_element("id", "fb-token").send_keys(TOKEN)
        driver.find_element("id", "fb-other").send_keys("coing")  # a class the model does not know yet
        driver.find_element("id", "fb-wrong").click()
        while driver.execute_script("return document.body.dataset.feedback || ''") == "":
            assert time.time() < deadline
            time.sleep(0.2)
        assert driver.find_element("id", "fb-status").text == "recorded: it is coing"
        save_screenshot(driver, "serve_page_feedback.png")
    finally:
        driver.quit()
    with sqlite3.connect(db) as conn:
        assert ("wrong", "coing") in conn.execute("select kind, label from feedback").fetchall()
