"""Batch prediction throughput: local `predict` against `predict --ray` on one node and on two, on this machine.

    python benchmarks/ray_predict.py MODEL.keras [--images 1200] [--folder DIR]

Without --folder it writes --images JPEG crops (320x240) of the scikit-image photographs. Rows:
- local: `transferkit.predict` in this process (model loaded beforehand), img/s of the prediction alone;
- the parts of one image's cost: decode + resize and content hash (one thread), the engine (every core, batch 32);
- `predict --ray` (a local Ray instance with every core), and on a cluster of two `ray start` nodes of
  cores/2 CPUs each: wall of the command, and img/s of the job as the command reports it (Ray's start excluded);
- Ray's overhead per image: 1/ray - 1/local at the same CPU count, in ms.
Figures are printed, never asserted: they depend on the machine (its CPU flags are printed first).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
sys.path.insert(0, SRC)


def write_photos(folder: str, n: int) -> None:
    from skimage import data

    names = ["camera", "coins", "chelsea", "coffee", "rocket", "astronaut", "brick", "grass"]
    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.fromarray(getattr(data, k)()).convert("RGB")) for k in names]
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.4, 0.9) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((320, 240))
        sub = os.path.join(folder, names[i % len(names)])
        os.makedirs(sub, exist_ok=True)
        crop.save(os.path.join(sub, f"{i:05d}.jpg"), quality=90)


def local_rate(model: str, folder: str) -> tuple[float, int]:
    import transferkit

    predictor = transferkit.load_predictor(model)
    transferkit.predict(predictor, [os.path.join(folder, os.listdir(folder)[0])])  # warm
    t = time.perf_counter()
    rows = transferkit.predict(predictor, [folder])
    return len(rows) / (time.perf_counter() - t), len(rows)


def parts(model: str, folder: str) -> dict:
    """ms per image of each stage, on one thread."""
    import transferkit
    from transferkit.data.images import load_image
    from transferkit.files import file_digest

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)[:128]
    predictor = transferkit.load_predictor(model)
    t = time.perf_counter()
    images = np.stack([load_image(f, predictor.image_size) for f in files])
    decode = time.perf_counter() - t
    t = time.perf_counter()
    for f in files:
        file_digest(f)
    digest = time.perf_counter() - t
    predictor.predict_images(images[:32])
    t = time.perf_counter()
    for i in range(0, len(images), 32):
        predictor.predict_images(images[i:i + 32])
    engine = time.perf_counter() - t
    n = len(files)
    return {"decode": 1e3 * decode / n, "hash": 1e3 * digest / n, "engine": 1e3 * engine / n}


def run_ray(args: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, job img/s, stderr) of one `transferkit predict --ray ...`."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "transferkit", "predict", *args], env=env, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    rate = re.search(r"([\d.]+) img/s", p.stdout)
    return wall, float(rate.group(1)) if rate else float("nan"), p.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(env: dict, cpus: int) -> tuple[str, list[subprocess.Popen]]:
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port = free_port()
    common = ["--num-cpus", str(cpus), "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    nodes = [subprocess.Popen([ray_bin, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                               *common], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    time.sleep(3)
    nodes.append(subprocess.Popen([ray_bin, "start", "--address", f"127.0.0.1:{port}", *common], env=env,
                                  start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for _ in range(60):
        status = subprocess.run([ray_bin, "status", "--address", f"127.0.0.1:{port}"], capture_output=True,
                                text=True, env=env).stdout
        if status.count("node_") >= 2:
            break
        time.sleep(0.5)
    return f"127.0.0.1:{port}", nodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--folder")
    args = p.parse_args()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    cores = os.cpu_count() or 1
    print(f"cpu cores: {cores} ({'AMX' if 'amx_bf16' in flags else 'no AMX'}); model {args.model}")
    work = tempfile.mkdtemp(prefix="tk-ray-bench-")
    folder = args.folder or os.path.join(work, "photos")
    if not args.folder:
        write_photos(folder, args.images)
    env = dict(os.environ, PYTHONPATH=SRC, TF_CPP_MIN_LOG_LEVEL="3")
    rate, n = local_rate(args.model, folder)
    print(f"{n} images; local predict (this process, every core): {rate:.1f} img/s")
    cost = parts(args.model, folder)
    print("per image: " + ", ".join(f"{k} {v:.2f} ms" for k, v in cost.items())
          + " (decode and hash on one thread; the engine on every core, batch 32)")
    out = os.path.join(work, "one.parquet")
    wall, ray_rate, _ = run_ray([args.model, folder, "--ray", "--out", out, "-q"], env)
    print(f"--ray, 1 node x {cores} CPUs: wall {wall:.1f} s, job {ray_rate:.1f} img/s, overhead "
          f"{1e3 * (1 / ray_rate - 1 / rate):.2f} ms/image vs local")
    wall, skip_rate, _ = run_ray([args.model, folder, "--ray", "--out", out, "-q"], env)
    print(f"--ray again on the same --out (all skipped: hash only): wall {wall:.1f} s")
    env = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())  # as the README says
    address, nodes = two_nodes(env, max(1, cores // 2))
    try:
        wall, two_rate, err = run_ray([args.model, folder, "--ray", address, "--out",
                                       os.path.join(work, "two.parquet")], env)
        found = re.search(r"Ray: (\d+) node", err)
        print(f"--ray, {found.group(1) if found else '?'} nodes x {max(1, cores // 2)} CPUs (same machine): "
              f"wall {wall:.1f} s, job {two_rate:.1f} img/s")
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=60)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
