"""Peak memory of the real server (`transferkit serve`, gunicorn) under the hostile corpus: decompression bombs and
the largest images the limits allow, posted by attacker threads while clients post good photos.

    python benchmarks/hostile_serve.py [--model MODEL.keras] [--corpus DIR] [--seconds 20] [--also-unlimited]

Without --model, a tiny model is trained on the corpus first (image size 64, 2 epochs); without --corpus, the corpus
is generated (benchmarks/make_hostile_corpus.py) in a temporary folder. --also-unlimited runs a second server with
the pixel budgets lifted to Pillow's own limit (TRANSFERKIT_MAX_PIXELS and --max-request-pixels huge), as before
the budgets existed. Prints the figures (peak RSS of the server's process tree, sampled, and each process's
high-water mark from /proc; request counts by status; good-request latency); it never asserts anything.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import requests
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from make_hostile_corpus import make_corpus, png_file, zero_rows_zlib  # noqa: E402

try:
    import psutil
except ImportError:  # /proc is read instead
    psutil = None


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants."""
    if psutil:
        try:
            proc = psutil.Process(root)
            return [root] + [c.pid for c in proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(p for p, parent in parents.items() if parent == pid)
    return found


def status_kb(pid: int, key: str) -> int:
    """A field of /proc/PID/status in kB (VmRSS: now, VmHWM: the process's peak); 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Samples the summed RSS of a process tree every 20 ms and remembers each process's high-water mark."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peak_kb, self.hwm_kb, self.stop = root, 0, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            pids = tree_pids(self.root)
            self.peak_kb = max(self.peak_kb, sum(status_kb(p, "VmRSS") for p in pids))
            for p in pids:
                self.hwm_kb[p] = max(self.hwm_kb.get(p, 0), status_kb(p, "VmHWM"))
            time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, log_path: str, unlimited: bool, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    args = [sys.executable, "-m", "transferkit", "serve", model, "--port", str(port), "--runtime", "keras",
            "--threads", str(threads)]
    if unlimited:
        env["TRANSFERKIT_MAX_PIXELS"] = str(10**12)  # Pillow's own limit (89 Mpx) is then the only one
        args += ["--max-request-pixels", str(10**15)]
    log = open(log_path, "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server did not start; see {log_path}")


def attack_requests(corpus: str, manifest: dict) -> list[list[tuple[str, bytes]]]:
    """The hostile requests: each bomb alone, all bombs in one request, the corpus in requests of 64 files, and
    requests of the largest PNGs the per-image limit lets through (36 Mpx each, tiny payloads)."""

    def read(rel):
        with open(os.path.join(corpus, rel), "rb") as f:
            return os.path.basename(rel), f.read()

    bombs = [read(rel) for rel, e in sorted(manifest.items()) if e["category"] == "decompression bomb"]
    everything = [read(rel) for rel in sorted(manifest)]
    big = png_file(6000, 6000, 1, 0, zero_rows_zlib(750, 6000))
    big_rgb = png_file(5000, 5000, 8, 2, zero_rows_zlib(15000, 5000))  # 25 Mpx RGB: 75 MB decoded
    out = [[b] for b in bombs] + [bombs]
    out += [everything[i : i + 64] for i in range(0, len(everything), 64)]
    out += [[("big_1.png", big), ("big_2.png", big)], [("big_rgb_1.png", big_rgb), ("big_rgb_2.png", big_rgb)],
            [(f"big_{i}.png", big) for i in range(4)]]
    return out


def post(url: str, files: list[tuple[str, bytes]]) -> tuple[int, float]:
    start = time.perf_counter()
    try:
        r = requests.post(url + "/api/predict", files=[("image", (n, d, "application/octet-stream")) for n, d in files],
                          timeout=300)
        return r.status_code, time.perf_counter() - start
    except requests.RequestException:
        return -1, time.perf_counter() - start


def run_load(url: str, attacks: list, good: bytes, seconds: float, attackers: int, clients: int) -> dict:
    """Attacker threads cycle through ``attacks`` and clients post one good photo, for ``seconds``."""
    stop, lock = time.time() + seconds, threading.Lock()
    stats = {"attack": {}, "good": {}, "good_latency": []}

    def worker(kind: str, offset: int):
        i = offset
        while time.time() < stop:
            files = attacks[i % len(attacks)] if kind == "attack" else [("good.jpg", good)]
            code, took = post(url, files)
            with lock:
                stats[kind][code] = stats[kind].get(code, 0) + 1
                if kind == "good":
                    stats["good_latency"].append(took)
            i += 1

    threads = [threading.Thread(target=worker, args=("attack", k * 7)) for k in range(attackers)]
    threads += [threading.Thread(target=worker, args=("good", 0)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats


def measure(model: str, corpus: str, manifest: dict, args, unlimited: bool, work: str) -> None:
    log_path = os.path.join(work, f"serve{'_unlimited' if unlimited else ''}.log")
    proc, url = start_server(model, log_path, unlimited, args.threads)
    try:
        sampler = Sampler(proc.pid)
        sampler.start()
        time.sleep(0.5)
        idle_kb = sampler.peak_kb
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
        stats = run_load(url, attack_requests(corpus, manifest), buf.getvalue(), args.seconds, args.attackers,
                         args.clients)
        alive = requests.get(url + "/healthz", timeout=10).status_code == 200
        time.sleep(0.3)
        sampler.stop.set()
        sampler.join()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        tracebacks = f.read().count("Traceback")
    lat = np.array(stats["good_latency"] or [0.0])
    label = "limits lifted to Pillow's (as before)" if unlimited else "default budgets (40 Mpx/image, 100 Mpx/request)"
    print(f"\n== server with {label}")
    print(f"  server tree RSS: idle {idle_kb / 1024:.0f} MB, peak {sampler.peak_kb / 1024:.0f} MB (sampled every 20 ms)")
    print("  per-process peak (VmHWM): " + ", ".join(f"pid {p} {kb / 1024:.0f} MB" for p, kb in sampler.hwm_kb.items()))
    print(f"  attack requests by status: {dict(sorted(stats['attack'].items()))}")
    print(f"  good requests by status: {dict(sorted(stats['good'].items()))}; latency median "
          f"{np.median(lat) * 1000:.0f} ms, p95 {np.percentile(lat, 95) * 1000:.0f} ms, max {lat.max() * 1000:.0f} ms")
    print(f"  still healthy after the attack: {alive}; tracebacks in the server log: {tracebacks}")


def train_model(corpus: str, work: str) -> str:
    out = os.path.join(work, "run")
    subprocess.run([sys.executable, "-m", "transferkit", "train", corpus, "--image-size", "64", "--epochs", "2",
                    "--augment-views", "1", "--runtime", "keras", "--out", out, "-q"], check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return os.path.join(out, "model.keras")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", help="a .keras model (default: train a tiny one on the corpus)")
    p.add_argument("--corpus", help="a corpus made by make_hostile_corpus.py (default: generate one)")
    p.add_argument("--seconds", type=float, default=20.0, help="duration of the load")
    p.add_argument("--attackers", type=int, default=3, help="threads posting hostile requests")
    p.add_argument("--clients", type=int, default=2, help="threads posting a good photo")
    p.add_argument("--threads", type=int, default=4, help="server request threads (gunicorn gthread)")
    p.add_argument("--also-unlimited", action="store_true", help="also measure with the pixel budgets lifted")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hostile-serve-") as work:
        corpus = args.corpus or os.path.join(work, "corpus")
        if not args.corpus:
            make_corpus(corpus)
        with open(os.path.join(corpus, ".manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        model = args.model or train_model(corpus, work)
        print(f"corpus {corpus} ({len(manifest)} files), model {model}, {args.seconds:g} s of load, "
              f"{args.attackers} attacker(s) + {args.clients} client(s), psutil {'yes' if psutil else 'no (/proc)'}")
        measure(model, corpus, manifest, args, False, work)
        if args.also_unlimited:
            measure(model, corpus, manifest, args, True, work)


if __name__ == "__main__":
    main()
