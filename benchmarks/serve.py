"""Requests/second and latency of `transferkit serve` for single-image requests at 1, 4, 16 and 64 clients.

    python benchmarks/serve.py MODEL [--image PHOTO] [--seconds 10] [--rounds 5] [--workers 1] [--threads 4] [--first-use]
                              [--runtime auto] [--collect]

Starts a real server process on 127.0.0.1 (a free port), waits for /healthz (its start time is printed: on a model
file used before, the worker loads the cached engine without TensorFlow), then each client posts one image per
request, back to back, for the given time. Prints req/s, p50 and p95 latency per concurrency level, then the peak
RSS (VmHWM) of the master and of each worker. ``--first-use`` starts on an empty cache: the master converts the
model file once, in a child process, before gunicorn forks (``engines.convert``); a worker's peak, 2.9 GB when
each converted it itself, is then the cached engine's. ``--collect``: every level again with ``serve --collect``
(every answer stored in a fresh SQLite file) on a second server, the two taking turns in short rounds (a busy
spell of the machine slows both alike: one after the other, identical runs differed by 15 %), and both side by
side.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import requests
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_mb(pid: int) -> float:
    """The peak RSS (VmHWM) of the live process ``pid``, in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def workers(master: int) -> list[int]:
    """The live child processes of ``master`` (gunicorn's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == master:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


def run_level(url: str, payload: bytes, clients: int, seconds: float) -> tuple[float, float, float, int]:
    latencies, errors = [], [0]
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def client():
        with requests.Session() as s:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = s.post(url + "/api/predict", files=[("image", ("photo.jpg", payload, "image/jpeg"))], timeout=60)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    errors[0] += r.status_code != 200

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20)
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, q[18] * 1000, errors[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--image", help="a photo to send (default: a 640x480 synthetic JPEG)")
    p.add_argument("--seconds", type=float, default=10.0, help="per level and server")
    p.add_argument("--rounds", type=int, default=5, help="turns per level (the servers alternate)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--collect", action="store_true", help="also run every level with serve --collect (a fresh "
                   "SQLite store) and print both, side by side")
    p.add_argument("--runtime", default="auto", help="the server's --runtime (default: auto)")
    p.add_argument("--first-use", action="store_true", help="start on a model file never converted (an empty "
                   "cache) instead of after one `transferkit predict`")
    args = p.parse_args()
    if args.image:
        payload = open(args.image, "rb").read()
    else:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
        payload = buf.getvalue()
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    if args.first_use:  # never converted: an empty cache
        env["TRANSFERKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="tk-serve-cold-")
    if not args.first_use:  # as after any first use of the model file: its converted engine is in the cache
        photo = args.image or os.path.join(tempfile.mkdtemp(), "photo.jpg")
        if not args.image:
            open(photo, "wb").write(payload)
        subprocess.run([sys.executable, "-m", "transferkit", "predict", args.model, photo], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    modes = {"plain": []}
    if args.collect:  # the same levels on a second server with the store on (a fresh SQLite file)
        modes["collect"] = ["--collect", os.path.join(tempfile.mkdtemp(), "seen.db")]
    servers = {mode: start_server(args, env, extra) for mode, extra in modes.items()}
    try:
        for mode, (proc, url, ready) in servers.items():
            run_level(url, payload, 2, 2.0)  # warm-up
            print(f"[{mode}] server ready in {ready:.1f} s "
                  f"({'first use' if args.first_use else 'cached engine'})")
        print(f"cpu cores: {os.cpu_count()}  image: {len(payload)} bytes  workers {args.workers} x threads "
              f"{args.threads}; each level: {args.rounds} rounds of {args.seconds / args.rounds:.1f} s per server, "
              "the servers taking turns; medians")
        results = {mode: {} for mode in servers}
        for clients in LEVELS:
            rounds = {mode: [] for mode in servers}
            for _ in range(args.rounds):
                for mode, (_, url, _) in servers.items():
                    rounds[mode].append(run_level(url, payload, clients, args.seconds / args.rounds))
                    time.sleep(0.3)  # the collector's writer finishes its batch before the other server's turn
            for mode in servers:
                results[mode][clients] = tuple(statistics.median(r[i] for r in rounds[mode]) for i in range(3)) + (
                    sum(r[3] for r in rounds[mode]),)
        show(results, servers)
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)


LEVELS = (1, 4, 16, 64)


def show(results: dict, servers: dict) -> None:
    """Print each server's levels, its peak RSS, and with --collect both side by side."""
    for mode, levels in results.items():
        print(f"[{mode}]\n{'clients':>8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'errors':>7}")
        for clients, (rps, p50, p95, errors) in levels.items():
            print(f"{clients:>8} {rps:>8.1f} {p50:>8.1f} {p95:>8.1f} {errors:>7}")
        proc = servers[mode][0]
        peaks = ", ".join(f"{peak_mb(pid):.0f} MB" for pid in workers(proc.pid))
        print(f"peak RSS: master {peak_mb(proc.pid):.0f} MB, worker(s) {peaks}")
    if "collect" in results:
        print(f"{'clients':>8} {'req/s plain':>12} {'req/s collect':>14} {'slower':>7} {'p95 plain':>10} "
              f"{'p95 collect':>12}")
        for clients in LEVELS:
            (a, _, pa, _), (b, _, pb, _) = results["plain"][clients], results["collect"][clients]
            print(f"{clients:>8} {a:>12.1f} {b:>14.1f} {100 * (1 - b / a):>6.1f}% {pa:>10.1f} {pb:>12.1f}")


def start_server(args, env: dict, extra: list[str]) -> tuple:
    """A server process (``extra``: more serve flags) on a free port, ready: (process, url, seconds to ready)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", args.model, "--port", str(port),
                             "--workers", str(args.workers), "--threads", str(args.threads),
                             "--runtime", args.runtime, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    started, deadline = time.perf_counter(), time.time() + 180
    while True:
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                return proc, url, time.perf_counter() - started
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            sys.exit("server did not start")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
