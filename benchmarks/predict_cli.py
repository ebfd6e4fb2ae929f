"""Wall time and peak memory of `transferkit predict` for one photo, from a cold process, as a user runs it.

    python benchmarks/predict_cli.py MODEL.keras PHOTO [--repeats 3] [--train-data DATA_DIR]

Rows: with ``--train-data``, `transferkit train` on it (an empty cache) and the first predict of the model it has
just written (train left its converted engine in the cache: no TensorFlow import); the `.keras` file from
elsewhere on its first use (an empty cache: a child process loads it with TensorFlow, converts it to OpenVINO and
checks it, then the predict runs on the cached engine), the same file once cached, the same file on
`--runtime keras`, and its ONNX export on OpenVINO and on onnxruntime. Each figure is the median of the repeats;
peak memory is the maximum RSS of the largest process (on a first use, the conversion's child).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
CHILD = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
         "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
         "print(p.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def once(args: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one `transferkit ...` process."""
    out = subprocess.run([sys.executable, "-c", CHILD, sys.executable, "-m", "transferkit", *args], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "0":
        raise SystemExit(f"transferkit {' '.join(args)} failed")
    return float(out[1]), float(out[2]) / 1024


def measure(label: str, args: list[str], env: dict, repeats: int, fresh_cache: bool = False) -> None:
    runs = []
    for _ in range(repeats):
        if fresh_cache:
            env = dict(env, TRANSFERKIT_CACHE_DIR=tempfile.mkdtemp(prefix="tk-cold-"))
        runs.append(once(args, env))
    show(label, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))


def show(label: str, wall: float, rss: float) -> None:
    print(f"{label:<52} {wall:>7.2f} s {rss:>8.0f} MB", flush=True)


def just_trained(data: str, photo: str, env: dict) -> None:
    """`train` on ``data`` in an empty cache, then the first `predict` of the model it wrote (one run each)."""
    env = dict(env, TRANSFERKIT_CACHE_DIR=tempfile.mkdtemp(prefix="tk-train-"))
    out = tempfile.mkdtemp(prefix="tk-run-")
    show("train (empty cache)", *once(["train", data, "--out", out], env))
    show(".keras just trained: first predict", *once(["predict", os.path.join(out, "model.keras"), photo], env))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("photo")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-data", help="a class folder to train on first: the rows of a model just trained")
    args = p.parse_args()
    cache = tempfile.mkdtemp(prefix="tk-bench-cache-")
    env = dict(os.environ, PYTHONPATH=SRC, TRANSFERKIT_CACHE_DIR=cache, TF_CPP_MIN_LOG_LEVEL="3")
    onnx = os.path.join(cache, "model.onnx")
    subprocess.run([sys.executable, "-m", "transferkit", "export", args.model, "--format", "onnx", "--out", onnx],
                   env=env, check=True, capture_output=True)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    amx = "AMX" if "amx_bf16" in flags else "no AMX"
    print(f"cpu cores: {os.cpu_count()} ({amx}); one photo, `transferkit predict`, median of {args.repeats}")
    print(f"{'':<52} {'wall':>9} {'peak RSS':>11}")
    if args.train_data:
        just_trained(args.train_data, args.photo, env)
    predict = ["predict", args.model, args.photo]
    measure(".keras from elsewhere, first use (empty cache)", predict, env, 1, fresh_cache=True)
    once(predict, env)  # leaves the conversion in this cache
    measure(".keras, cached engine (default)", predict, env, args.repeats)
    measure(".keras, --runtime keras", predict + ["--runtime", "keras"], env, args.repeats)
    measure(".onnx export, openvino", ["predict", onnx, args.photo, "--runtime", "openvino"], env, args.repeats)
    try:
        import onnxruntime  # noqa: F401

        measure(".onnx export, onnxruntime", ["predict", onnx, args.photo, "--runtime", "onnxruntime"], env,
                args.repeats)
    except ImportError:
        print(".onnx export, onnxruntime: not installed (pip install 'transferkit[fast]')")
    print(json.dumps({"peak_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
