"""Inference engines for a frozen Keras model with a fixed square input (the feature extractor during training,
the whole classifier for prediction): Keras's compiled predict step, onnxruntime, or OpenVINO (fp32 or bf16).

``auto`` picks the fastest engine that is installed and safe here: OpenVINO in bf16 only where the CPU computes
bf16 natively (AVX512-BF16 or AMX), else OpenVINO fp32, else onnxruntime, else Keras. A lower precision is
checked once per model against fp32 on real images (the user's own) and dropped, with a one-line notice, if the
output cosine falls below 0.995. Converted models are cached (ONNX files keyed like the feature cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np

from transferkit.errors import TransferkitError
from transferkit.files import atomic_path, cache_dir, write_json_atomic
from transferkit.inference import run_model

RUNTIMES = ("auto", "keras", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "bf16")
MIN_COSINE = 0.995


@dataclass
class Engine:
    """A callable: float32 RGB 0-255 batch (n, size, size, 3) -> model outputs (n, ...)."""

    runtime: str
    precision: str
    run: Callable[[np.ndarray], np.ndarray]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run(np.asarray(images, dtype=np.float32))

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.precision}"


def installed(runtime: str) -> bool:
    name = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(runtime)
    return name is None or importlib.util.find_spec(name) is not None


def native_bf16() -> bool:
    """True where the CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        if installed("openvino"):
            import openvino as ov

            return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return False


def resolve(runtime: str = "auto", precision: str = "auto") -> tuple[str, str]:
    """The (runtime, precision) that ``auto`` means on this machine, or a clear error for an impossible ask."""
    if runtime not in RUNTIMES:
        raise TransferkitError(f"--runtime must be one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise TransferkitError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if runtime == "auto":
        runtime = next(r for r in ("openvino", "onnxruntime", "keras") if installed(r))
    elif not installed(runtime):
        raise TransferkitError(f"runtime {runtime} is not installed: pip install 'transferkit[fast]'")
    if precision == "auto":
        precision = "bf16" if runtime == "openvino" and native_bf16() else "fp32"
    if precision == "bf16" and runtime != "openvino":
        raise TransferkitError(f"bf16 needs --runtime openvino (asked: {runtime})")
    return runtime, precision


def onnx_file(model: keras.Model, key: str) -> str:
    """The model as ONNX, converted once and cached under ``key``."""
    path = cache_dir("runtimes") / f"{key}.onnx"
    if not path.exists():
        model(np.zeros((1,) + tuple(model.input.shape[1:]), "float32"))  # Keras refuses to export a never-called model
        with atomic_path(path, suffix=".onnx") as tmp:
            os.unlink(tmp)
            model.export(str(tmp), format="onnx", verbose=False)
    return str(path)


def _onnxruntime(path: str) -> Callable:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise TransferkitError(f"{path}: the ONNX graph has {len(inputs)} inputs (constants exported as inputs)")
    name = inputs[0].name
    return lambda x: session.run(None, {name: x})[0]


def _openvino(path: str, precision: str) -> Callable:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    if len(model.inputs) != 1:
        raise TransferkitError(f"{path}: the ONNX graph has {len(model.inputs)} inputs (constants exported as inputs)")
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",  # OpenVINO picks bf16 by itself else
        "PERFORMANCE_HINT": "LATENCY",
    })
    request = compiled.create_infer_request()
    return lambda x: np.asarray(request.infer({0: x})[compiled.output(0)])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of corresponding rows."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float(np.mean(num / den))


def build_engine(model: keras.Model, key: str, runtime: str = "auto", precision: str = "auto",
                 check_images: np.ndarray | None = None, verbose: bool = True) -> Engine:
    """An engine for ``model`` (fixed input); bf16 is verified against Keras fp32 on ``check_images``."""
    runtime, precision = resolve(runtime, precision)
    keras_engine = Engine("keras", "fp32", lambda x: run_model(model, x))
    if runtime == "keras":
        return keras_engine
    try:
        path = onnx_file(model, key)
        run = _onnxruntime(path) if runtime == "onnxruntime" else _openvino(path, precision)
    except Exception as exc:  # a converter or runtime that cannot take this model: Keras still can
        _notice(verbose, f"{runtime} cannot run {key} ({str(exc).splitlines()[0] if str(exc) else exc!r}); using keras fp32")
        return keras_engine
    engine = Engine(runtime, precision, run)
    if precision != "fp32" and check_images is not None and len(check_images):
        verdict_file = cache_dir("runtimes") / f"{key}-{runtime}-{precision}.check.json"
        if verdict_file.exists():
            verdict = json.loads(verdict_file.read_text())
        else:
            sample = np.asarray(check_images[:8], dtype=np.float32)
            verdict = {"cosine": cosine(engine(sample), keras_engine(sample)), "images": int(len(sample))}
            write_json_atomic(verdict_file, verdict)
        if verdict["cosine"] < MIN_COSINE:
            _notice(verbose, f"{runtime} {precision} drifts from fp32 (cosine {verdict['cosine']:.4f} < {MIN_COSINE}); "
                             f"using {runtime} fp32")
            return Engine(runtime, "fp32", _onnxruntime(path) if runtime == "onnxruntime" else _openvino(path, "fp32"))
        engine.check_cosine = verdict["cosine"]
    return engine


def _notice(verbose: bool, message: str) -> None:
    if verbose:
        print(f"transferkit: {message}", file=sys.stderr, flush=True)
