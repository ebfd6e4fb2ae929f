"""Where a model file's conversion spends its memory: RSS and peak after each step, in one cold process.

    python benchmarks/conversion_memory.py MODEL.keras

Steps, as the first use of a model file takes them (``engines.convert.warm``): TensorFlow's import, the Keras load,
the frozen fixed-size model, tf2onnx (Keras's ONNX export), OpenVINO's compile, and the check against Keras fp32
on the model file's photos. Peak memory is the process's maximum RSS (``resource.getrusage``), as
``benchmarks/predict_cli.py`` measures it. Measured here (2 cores, no AMX, the Lite0 classifier at 224 px): before
the tf2onnx fix the export alone went from 780 MB to a 2,737 MB peak; after it, to 1,267 MB.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
sys.path.insert(0, SRC)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
START = time.perf_counter()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def step(name: str) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{name:<34} {time.perf_counter() - START:7.2f} s {_rss_mb():8.0f} MB {peak:8.0f} MB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    args = p.parse_args()
    print(f"{'step':<34} {'elapsed':>9} {'RSS':>11} {'peak':>11}")
    import numpy as np

    import transferkit  # noqa: F401

    step("python, numpy, transferkit")
    import tensorflow  # noqa: F401

    step("import tensorflow")
    from transferkit.engines.keras_step import run_model, without_resize
    from transferkit.models import modelfile

    loaded = modelfile.load(args.model)
    step("keras load")
    fixed = without_resize(loaded.keras_model, loaded.image_size, call=False)
    from transferkit.engines.keras_onnx import save_onnx

    onnx = os.path.join(tempfile.mkdtemp(prefix="tk-conv-"), "model.onnx")
    save_onnx(fixed, onnx)
    step("tf2onnx (Keras's ONNX export)")
    from transferkit.engines import runtimes

    run = runtimes.openvino_run(onnx, "fp32", cache_compiled=False)
    step("openvino compile")
    check = np.asarray(loaded.check_images, np.float32)
    cosine = runtimes.cosine(run(check), run_model(fixed, check))
    step(f"check on {len(check)} photos (cos {cosine:.6f})")


if __name__ == "__main__":
    main()
