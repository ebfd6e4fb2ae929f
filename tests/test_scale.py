"""Scale-out on a real Ray instance (issue scale-out): ``predict --ray`` gives local ``predict``'s rows; a worker
process killed mid-job (SIGKILL, found in /proc as an operator would) still yields every row exactly once; a driver
killed mid-job resumes without duplicates; a cluster of two nodes started with ``ray start`` (1 CPU each) answers
like one machine; ``train --ray`` fills the same feature cache a local run reads."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import transferkit
from children import run_cli
from conftest import IMAGE_SIZE, require, write_dataset
from photos import PHOTOS, photo_crop

ray = require("ray", "the [ray] extra, part of [test]")
pq = require("pyarrow.parquet", "the [ray] extra, part of [test]")

PREDICT_ACTOR = "MapBatches(Predict)"  # in the process title of Ray Data's actors for scale.predict.Predict


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """240 photo crops of 12 photographs (3 trained, 9 the model calls unknown or places), in nested folders,
    and one unreadable file."""
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(11)
    for k, name in enumerate(PHOTOS[:12]):
        folder = root / f"camera-{k % 3}" / name
        folder.mkdir(parents=True)
        for i in range(20):
            Image.fromarray(photo_crop(k, rng)).save(folder / f"{i:02d}.jpg", quality=int(rng.integers(70, 95)))
    (root / "camera-0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return str(root)


@pytest.fixture(scope="module")
def local_rows(trained, archive):
    return {r["path"]: r for r in transferkit.predict(os.path.join(trained[1], "model.keras"), [archive])}


def _table(out: str) -> dict:
    """{path: row} of an output folder; fails on a path written twice."""
    rows = pq.read_table(out).to_pylist() if out.endswith(".parquet") else _csv_rows(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), f"{len(paths) - len(set(paths))} duplicate rows in {out}"
    return {r["path"]: r for r in rows}


def _csv_rows(out: str) -> list[dict]:
    import pyarrow.csv as pacsv

    files = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".csv"))
    options = pacsv.ConvertOptions(strings_can_be_null=True)
    return [r for f in files for r in pacsv.read_csv(f, convert_options=options).to_pylist()]


def _assert_same_as_local(rows: dict, local: dict) -> None:
    assert set(rows) == set(local)
    for path, want in local.items():
        got = rows[path]
        if want.get("error"):
            assert got["error"] and got["label"] is None, path
            continue
        assert got["error"] is None and got["label"] == want["label"] and got["unknown"] == want["unknown"], path
        for i, top in enumerate(want["top_k"]):
            assert got[f"top{i + 1}_label"] == top["label"], path
            assert abs(got[f"top{i + 1}_probability"] - top["probability"]) < 1e-5, path
        assert abs(got["novelty"] - want["novelty"]) < 1e-4, path


def test_predict_on_ray_gives_local_rows_and_skips_what_is_done(trained, archive, local_rows, ray_local, tmp_path):
    model = os.path.join(trained[1], "model.keras")
    labels = {r["label"] for r in local_rows.values()}
    assert None in labels and len(labels) >= 3  # the archive has unknown photos and photos of the classes
    out = str(tmp_path / "preds.parquet")
    done = transferkit.predict_on_ray(model, [archive], out, batch_size=8)
    assert (done["rows"], done["new"], done["errors"]) == (241, 241, 1)
    _assert_same_as_local(_table(out), local_rows)
    assert len(os.listdir(out)) > 1  # one file per block of 8 batches: the unit a resumed job skips
    first = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".parquet"))[0]
    with open(first, "rb") as f, open(os.path.join(out, "zz-cut-short.parquet"), "wb") as cut:
        cut.write(f.read()[:-100])  # what a killed writer leaves: no footer
    again = transferkit.predict_on_ray(model, [archive], out, batch_size=8)  # the unreadable one is tried again
    assert (again["rows"], again["new"], again["skipped_done"], again["errors"]) == (241, 1, 240, 1)
    assert not os.path.exists(os.path.join(out, "zz-cut-short.parquet"))
    _assert_same_as_local(_table(out), local_rows)  # its new row replaced the old one: one row a file
    with pytest.raises(transferkit.TransferkitError, match="top_k"):
        transferkit.predict_on_ray(model, [archive], out, top_k=2)  # other options: not mixed into these rows
    csv_out, camera0 = str(tmp_path / "preds.csv"), os.path.join(archive, "camera-0")
    done = transferkit.predict_on_ray(model, [camera0], csv_out)
    assert (done["new"], done["errors"]) == (81, 1)
    again = transferkit.predict_on_ray(model, [camera0], csv_out)
    assert (again["new"], again["skipped_done"], again["rows"]) == (1, 80, 81)
    _assert_same_as_local(_table(csv_out), {p: r for p, r in local_rows.items() if p.startswith(camera0)})


def test_predict_on_ray_gives_local_sets_and_abstentions(trained, archive, ray_local, tmp_path):
    model = os.path.join(trained[1], "model.keras")
    asked = {"coverage": 0.9, "max_error": 0.3}
    local = {r["path"]: r for r in transferkit.predict(model, [archive], **asked)}
    out = str(tmp_path / "sets.parquet")
    done = transferkit.predict_on_ray(model, [archive], out, batch_size=16, **asked)
    assert (done["rows"], done["errors"]) == (241, 1)
    rows = _table(out)
    _assert_same_as_local(rows, local)
    for path, want in local.items():
        got = rows[path]
        if not want.get("error"):
            assert got["set"] == "|".join(want["set"]) and got["abstain"] == want["abstain"], path
    assert {r["abstain"] for r in local.values() if "abstain" in r} == {True, False}  # both kinds of answer
    with pytest.raises(transferkit.TransferkitError, match="coverage"):  # not mixed into rows without sets
        transferkit.predict_on_ray(model, [archive], out, batch_size=16)
    with pytest.raises(transferkit.TransferkitError, match="coverage must be"):
        transferkit.predict_on_ray(model, [archive], str(tmp_path / "bad.parquet"), coverage=1.5)


def _actor_pids(marker: str = PREDICT_ACTOR) -> set[int]:
    """This test process's own Ray actors: its descendants (the Ray instances it or its ``ray start`` children
    started) whose title names ``marker`` (Ray titles its workers ``ray::<actor class>``). Never another job's:
    a machine-wide scan could find, and the kill test SIGKILL, the actors of any Ray job on the machine."""
    import psutil  # in the test extra
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def test_a_worker_killed_mid_job_still_yields_every_row_once(trained, archive, local_rows, ray_local, tmp_path):
    model, out = os.path.join(trained[1], "model.keras"), str(tmp_path / "preds.parquet")
    result, killed = {}, []

    def job():
        result["done"] = transferkit.predict_on_ray(model, [archive], out, batch_size=2)

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 120
    while thread.is_alive() and not killed and time.monotonic() < deadline:
        pids = _actor_pids()
        if pids and os.path.isdir(out) and os.listdir(out):  # an actor is at work and a block already written
            victim = min(pids)
            os.kill(victim, signal.SIGKILL)
            killed.append((victim, thread.is_alive()))
        time.sleep(0.02)
    thread.join(timeout=300)
    assert killed and killed[0][1], "no actor was killed while the job ran"
    assert result["done"]["rows"] == len(local_rows)
    _assert_same_as_local(_table(out), local_rows)


def _cli(*args: str) -> list[str]:
    """The command line of ``transferkit ARGS``, for a child the test watches or kills while it runs (one it only
    waits for: children.run_cli)."""
    return [sys.executable, "-m", "transferkit", *args]


def test_a_killed_driver_resumes_without_duplicates(trained, archive, local_rows, tmp_path):
    """The CLI starting its own local Ray instance, killed (SIGKILL, with its Ray processes) once some blocks are
    written; the same command again completes the folder."""
    model, out = os.path.join(trained[1], "model.keras"), str(tmp_path / "preds.parquet")
    args = ["predict", model, archive, "--ray", "--out", out, "--batch-size", "2"]
    log = tmp_path / "driver.log"  # a file, not a pipe: a pipe nobody reads blocks its writer past 64 KiB
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(_cli(*args, "-q"), start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.isdir(out) and len(os.listdir(out)) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be killed: " + log.read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    from transferkit.scale.predict import compact

    answered = len(compact(out, "parquet")[1])  # the rows the killed run finished (a file it was writing: removed)
    assert answered < len(local_rows) - 1
    again = run_cli(*args, timeout=300)
    _assert_same_as_local(_table(out), local_rows)
    skipped = int(re.search(r"(\d+) already in", again.stdout).group(1))
    # what the killed run had written was kept (its Ray workers may finish a block or two after its driver died)
    assert answered <= skipped < len(local_rows) - 1
    assert f"{len(local_rows)} rows in {out}" in again.stdout


def _start_head(ray_bin: str, common: list[str], env: dict, log_path) -> tuple[subprocess.Popen, str]:
    """``ray start --head --port 0``: Ray's GCS server binds port 0 itself and publishes the port the kernel gave
    it (no port chosen beforehand, none to be taken meanwhile, no retry: a taken random port cost ~40 s a try);
    (process, address) once the head's output gives the address other nodes join at ("ray start
    --address='...'", printed once the head runs)."""
    open(log_path, "w").close()
    log = open(log_path, "a+")  # O_APPEND: the seek(0) below, on the open file the head shares, moves no write
    head = subprocess.Popen([ray_bin, "start", "--head", "--port", "0", "--include-dashboard", "false", *common],
                            start_new_session=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        log.seek(0)
        text = log.read()
        found = re.search(r"ray start --address='([^']+)'", text)
        if found:
            log.close()
            return head, found.group(1)
        if head.poll() is not None or time.monotonic() > deadline:
            if head.poll() is None:
                os.killpg(head.pid, signal.SIGTERM)
                head.wait(timeout=60)
            log.close()
            pytest.fail(f"ray start --head did not start (exit {head.returncode}): {text[-2000:]}")
        time.sleep(0.1)


def test_two_nodes_started_with_ray_start_answer_like_one_machine(trained, archive, local_rows, tmp_path):
    common = ["--num-cpus", "1", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())  # as the README says
    head, address = _start_head(ray_bin, common, env, tmp_path / "head.log")
    nodes = [head]
    try:
        nodes.append(subprocess.Popen([ray_bin, "start", "--address", address, *common], start_new_session=True,
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        model, out = os.path.join(trained[1], "model.keras"), str(tmp_path / "preds.parquet")
        most = [0]

        def watch():
            while done.poll() is None:
                pids = _actor_pids() - before  # not the actors other tests' Ray instances keep
                most[0] = max(most[0], len(pids))
                time.sleep(0.05)

        for _ in range(60):  # the second node joins within seconds
            probe = subprocess.run([ray_bin, "status", "--address", address], capture_output=True, text=True,
                                   env=env)
            if probe.stdout.count("node_") >= 2:
                break
            time.sleep(0.5)
        before = _actor_pids()
        done = subprocess.Popen(_cli("predict", model, archive, "--ray", address, "--out", out, "--batch-size", "4"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        watcher = threading.Thread(target=watch)
        watcher.start()
        stdout, stderr = done.communicate(timeout=300)
        watcher.join()
        assert done.returncode == 0, stderr[-2000:]
        assert "Ray: 2 node(s), 2 CPU(s)" in stderr
        assert most[0] >= 2  # two actors of 1 CPU at once: one on each node
        _assert_same_as_local(_table(out), local_rows)
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=60)


def test_train_on_ray_fills_the_cache_a_local_run_reads(ray_local, tmp_path, caplog):
    import json

    from transferkit.files import file_digest
    from transferkit.scale.features import missing, prefill
    from transferkit.training.features import FeatureExtractor

    data = write_dataset(tmp_path / "fresh", 8, seed=23)  # photos no other test has cached
    result = transferkit.train(data, image_size=IMAGE_SIZE, augment_views=1, epochs=3, out=str(tmp_path / "run"),
                               ray="local")
    assert result["validation"]["accuracy"] >= 0.8
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    train, val = ([os.path.join(data, p) for p in split[k]] for k in ("train", "validation"))
    computed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ray computed")]
    assert computed == [f"Ray computed {2 * len(train)} of {2 * len(train)} missing feature(s)",
                        f"Ray computed {len(val)} of {len(val)} missing feature(s)"]  # the cluster did the work
    digests = {p: file_digest(p) for p in train + val}
    extractor = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE, depths=4)  # what --head auto extracts
    assert not missing(extractor, train, 1, digests) and not missing(extractor, val, 0, digests)
    cached, _, _ = extractor.extract(train, 1, digests=digests)
    fresh, _, _ = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE, depths=4).uncached().extract(train, 1)
    np.testing.assert_allclose(cached, fresh, atol=1e-4)  # the cluster computed what this machine computes
    streamed = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE, depths=1)  # another cache entry: streamed back
    assert prefill(streamed, val, 0, digests, shared=False) == len(val)
    mine, _, _ = FeatureExtractor("efficientnet_lite0", IMAGE_SIZE, depths=1).uncached().extract(val, 0)
    np.testing.assert_allclose(streamed.extract(val, 0, digests=digests)[0], mine, atol=1e-4)
