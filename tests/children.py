"""Child processes of the tests: a prediction in a fresh Python process, and which heavy modules it imported (the
check that the cached engine's path runs without TensorFlow, Keras or SciPy); a real ``transferkit serve``.

A server is started with ``--port 0`` and its URL read from its log once it has bound the port: a port found
free by binding and releasing it could be taken by another process before the server binds it, and a test would
then ask that other process. Output goes to a log file, never to a pipe nobody reads (a child blocks on a full
pipe past 64 KiB)."""

import json
import os
import re
import subprocess
import sys
import time

import requests

SERVE_LINE = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+)/ \((\d+) worker")


def run_cli(*args, check: bool = True, timeout: float = 600, env: dict | None = None, cwd=None,
            traceback_ok: bool = False) -> subprocess.CompletedProcess:
    """``python -m transferkit ARGS`` in a child process, its output captured as text. ``check``: the exit code must
    be 0. Never a traceback in its output, unless ``traceback_ok``."""
    proc = subprocess.run([sys.executable, "-m", "transferkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8", "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
    if not traceback_ok:
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    if check:
        assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return proc


def predict_in_child(model: str, photo: str, *flags: str, then: str = "",
                     modules=("tensorflow", "keras", "scipy")) -> tuple[list, dict, subprocess.CompletedProcess]:
    """(rows, {module: imported}, the process) of ``transferkit predict MODEL PHOTO --format json FLAGS`` run by
    ``cli.main`` in a new interpreter, followed by the Python lines ``then``."""
    script = ("import json, sys\n"
              "from transferkit.apps.cli import main\n"
              f"main({['predict', model, photo, '--format', 'json', *flags]!r})\n"
              f"{then}"
              f"print(json.dumps({{m: m in sys.modules for m in {tuple(modules)!r}}}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows_text, _, found = proc.stdout.rpartition("\n{")
    return json.loads(rows_text), json.loads("{" + found), proc


def start_server(args: list[str], log_path, *, cwd=None, timeout: float = 240, command: str = "serve"):
    """``(process, URL, log file)`` of ``transferkit serve ARGS --port 0`` (``command``: another subcommand line
    ending in serve's options) once its /healthz answers; a failure to start fails the test with the log's end."""
    open(log_path, "w").close()
    # appended to (O_APPEND): the child shares this open file and its offset, so the seek(0) and read below while
    # it runs would move where it writes next ("w+": a child printing 20,000 lines while read so left none whole)
    log = open(log_path, "a+", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "transferkit", *command.split(), *map(str, args), "--port", "0"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=None if cwd is None else str(cwd),
                            env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    deadline = time.monotonic() + timeout
    while not (found := SERVE_LINE.search(_read_from_start(log))):
        if proc.poll() is not None or time.monotonic() > deadline:
            _failed_start(proc, log, log_path)
        time.sleep(0.2)
    url = found.group(1)
    if not wait_healthy(url, proc, deadline - time.monotonic()):
        _failed_start(proc, log, log_path)
    return proc, url, log


def _read_from_start(log) -> str:
    log.seek(0)
    return log.read()


def _failed_start(proc, log, log_path):
    import pytest

    stop_server(proc, log)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        pytest.fail(f"server did not start: {f.read()[-3000:]}")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> bool:
    """Whether ``URL/healthz`` answers 200 before ``timeout`` seconds pass (polled; False as soon as the server
    process ends): at start, or once gunicorn has replaced a worker."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return True
        except requests.RequestException:  # the worker still loads the model
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return False


def stop_server(proc: subprocess.Popen, log=None, timeout: float = 60) -> None:
    """Terminate ``proc`` (killed if it does not end within ``timeout``) and close its log."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    if log is not None and not log.closed:
        log.close()


def post_images(url: str, *images, timeout: float = 120, **params) -> requests.Response:
    """``POST URL/api/predict`` with ``images`` as the form's ``image`` parts, ``params`` as its query: each a file
    path (sent under its base name), the bytes of a JPEG (sent as p.jpg), or a requests file tuple
    ``(filename, bytes or file[, content type])``."""
    files = []
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as f:
                image = (os.path.basename(image), f.read(), "image/jpeg")
        elif isinstance(image, bytes):
            image = ("p.jpg", image, "image/jpeg")
        files.append(("image", image))
    return requests.post(url + "/api/predict", files=files, params=params, timeout=timeout)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])
