"""Paths no other test walks, each run for real in its own process: the demo (``make demo``), a server with two
gunicorn workers, a served ``.onnx`` export (and ``?explain=1`` on it), more than 64 files in one request, and
``--ray`` where no cluster answers or Ray is not installed. A user's mistake must be one line naming the option and
the reason, never a traceback; the servers are real ``transferkit serve`` processes on a port of their own choosing
(``--port 0``: the port they bound is read from their log, so no other process can take it in between)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from children import post_images, run_cli, start_server, stop_server
from conftest import CLASSES, hardware_reason


def _one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The one stderr line of a refused command (exit code 2, no traceback); it contains each of ``expected``."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
    assert err.startswith("transferkit: error: "), err
    for text in expected:
        assert text in err, err
    return err


# ----- the demo -----
def test_the_demo_trains_and_reports_a_test_accuracy_well_above_chance(tmp_path):
    """``make demo`` runs ``transferkit demo``: the 1,797 digits of scikit-learn, ten classes (chance 0.10); it
    measured 0.964 here in 38 s on 2 cores (its time: benchmarks/; the timeout only stops a hang)."""
    proc = run_cli("demo", "--data", tmp_path / "data", "--out", tmp_path / "run", timeout=600, cwd=tmp_path)
    last = proc.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"model: (.+)  test accuracy: (0\.\d{4}|1\.0000)", last)
    assert found, last
    assert os.path.samefile(found.group(1), tmp_path / "run" / "model.keras")
    accuracy = float(found.group(2))
    assert accuracy >= 0.85, accuracy  # chance is 0.10
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-4)  # the saved file's evaluation, printed
    assert len(metrics["class_names"]) == 10 and "zéro" in metrics["class_names"]
    n_written = sum(len(files) for _, _, files in os.walk(tmp_path / "data"))
    assert n_written == 1797 and metrics["n_images"] == 450  # the held-out quarter


# ----- real servers -----
@pytest.fixture(scope="module")
def servers(trained, tmp_path_factory):
    """{"keras": the trained .keras model served by 2 workers, "onnx": its ONNX export served}: (url, process,
    model path) each."""
    result, _ = trained
    home = tmp_path_factory.mktemp("paths-serve")
    onnx = str(home / "model.onnx")
    run_cli("export", result["model_path"], "--format", "onnx", "--out", onnx)
    started = {}
    try:
        started["keras"] = start_server([result["model_path"], "--workers", "2"], home / "keras.log", cwd=home) + (
            result["model_path"],)
        started["onnx"] = start_server([onnx], home / "onnx.log", cwd=home) + (onnx,)
        yield {name: (url, proc, path) for name, (proc, url, _, path) in started.items()}
    finally:
        for proc, _, log, _ in started.values():
            stop_server(proc, log)


def _photos(dataset, n_each=1) -> list[tuple[str, str]]:
    """(class, path) of test photo crops."""
    return [(c, os.path.join(dataset[1], c, f"photo_{i:03d}.jpg")) for c in CLASSES for i in range(n_each)]


def _workers(pid: int) -> list[int]:
    """The child processes of ``pid`` (gunicorn's workers), from the kernel's list of that process's children."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason=hardware_reason("reads /proc and sends SIGSTOP"))
def test_two_workers_each_answer_alone(servers, dataset):
    url, proc, _ = servers["keras"]
    deadline = time.time() + 120
    while len(_workers(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    workers = _workers(proc.pid)
    assert len(workers) == 2, workers
    paths = [p for _, p in _photos(dataset, 2)]
    answers = []
    for running in workers:  # the other one stopped: this one alone takes the connections
        (other,) = [w for w in workers if w != running]
        os.kill(other, signal.SIGSTOP)
        try:
            reply = post_images(url, *paths)
        finally:
            os.kill(other, signal.SIGCONT)
        assert reply.status_code == 200, reply.text
        answers.append(reply.json()["predictions"])
    assert [r["filename"] for r in answers[0]] == [os.path.basename(p) for p in paths]
    for a, b in zip(*answers):  # each worker loaded the same model
        assert a["label"] == b["label"] and a["probability"] == pytest.approx(b["probability"], abs=1e-6)
    assert sorted(_workers(proc.pid)) == sorted(workers)  # neither was replaced meanwhile


def test_an_onnx_export_is_served_and_explain_answers_why_not(servers, dataset):
    keras_url, _, _ = servers["keras"]
    url, _, onnx = servers["onnx"]
    info = requests.get(url + "/api/model", timeout=10).json()
    assert info["class_names"] == sorted(CLASSES) and info["backbone"] == "efficientnet_lite0"
    paths = [p for _, p in _photos(dataset, 2)]
    got, want = post_images(url, *paths), post_images(keras_url, *paths)
    assert got.status_code == 200 and want.status_code == 200, (got.text, want.text)
    for a, b in zip(got.json()["predictions"], want.json()["predictions"]):  # the export answers as the model
        assert a["label"] == b["label"] and a["probability"] == pytest.approx(b["probability"], abs=1e-4)
    reply = post_images(url, paths[0], explain=1)
    assert reply.status_code == 400
    assert reply.json() == {"error": "explain=1 needs a .keras model file; model.onnx has no gradients"}
    assert post_images(url, paths[0]).status_code == 200  # and serving goes on


@pytest.mark.parametrize("name", ["keras", "onnx"])
def test_more_than_64_files_is_one_clear_error(servers, dataset, name):
    url, proc, _ = servers[name]
    photo = _photos(dataset)[0][1]
    reply = post_images(url, *[photo] * 64)
    assert reply.status_code == 200 and len(reply.json()["predictions"]) == 64
    # 65 files: counted by the app; 2,000 (werkzeug stops reading the form past 80 parts): the same answer,
    # not "upload larger than the limit" (2,000 of these photos are 7 MB, under it)
    for n, error in ((65, "at most 64 files per request (65 sent)"), (2000, "at most 64 files per request")):
        reply = post_images(url, *[photo] * n)
        assert reply.status_code == 413 and reply.json() == {"error": error}, (n, reply.text)
    assert post_images(url, photo).status_code == 200 and proc.poll() is None  # serving goes on


# ----- --ray -----
@pytest.fixture
def closed_port():
    """127.0.0.1:PORT where nothing listens, for the test's whole length: a TCP socket bound but not listening
    (a connection to it is refused), so no other process can take the port meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_ray_address_where_no_cluster_answers_is_one_line_in_bounded_time(trained, dataset, tmp_path, closed_port):
    result, _ = trained
    photo = _photos(dataset)[0][1]
    for address in (closed_port, f"ray://{closed_port}"):
        # bounded: the timeout fails a command still retrying (Ray 2.60 alone was, after 5 minutes)
        proc = run_cli("predict", result["model_path"], photo, "--ray", address, "--out", tmp_path / "p.parquet",
                       timeout=120, check=False)
        _one_line_error(proc, f"--ray {address}: cannot reach a Ray cluster there (Connection refused)")
        assert not (tmp_path / "p.parquet").exists()
    proc = run_cli("train", dataset[0], "--ray", closed_port, "--out", tmp_path / "run", timeout=120, check=False)
    _one_line_error(proc, f"--ray {closed_port}: cannot reach a Ray cluster there")
    assert not (tmp_path / "run").exists()  # refused before any image is read


def test_ray_not_installed_is_one_line_naming_the_extra(trained, dataset, tmp_path):
    shim = tmp_path / "no-ray"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None  # import ray fails\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    check = subprocess.run([sys.executable, "-c", "import ray"], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, **env))
    assert check.returncode != 0 and "ModuleNotFoundError" in check.stderr  # the shim works
    result, _ = trained
    photo = _photos(dataset)[0][1]
    wanted = "--ray needs Ray Data (ray is not installed): pip install 'transferkit[ray]'"
    proc = run_cli("predict", result["model_path"], photo, "--ray", "--out", tmp_path / "p.parquet", env=env,
                   timeout=300, check=False)
    assert _one_line_error(proc) == f"transferkit: error: {wanted}"
    assert not (tmp_path / "p.parquet").exists()
    proc = run_cli("train", dataset[0], "--ray", "--out", tmp_path / "run", env=env, timeout=300, check=False)
    assert _one_line_error(proc) == f"transferkit: error: {wanted}"
    assert not (tmp_path / "run").exists()
