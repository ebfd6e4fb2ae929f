"""Inference engines for a frozen Keras model with a fixed square input (the feature extractor during training,
the whole classifier for prediction): Keras's compiled predict step, onnxruntime, or OpenVINO (fp32, bf16, int8).

``auto`` picks the fastest engine that is installed and safe here: OpenVINO (a default dependency), else
onnxruntime, else Keras; precisions below fp32 are a choice (``--precision``, and the training views'
``feature_precision``). Every engine is checked once per model against Keras fp32 on real images (the user's
own): the converted fp32 model must reach cosine 0.9999, else Keras answers (a converter bug never gives wrong
features); bf16 0.995 and int8 0.98, else fp32, with a one-line notice, and for a classifier the share of labels
and unknown verdicts that agree with fp32 is recorded and printed. Converted models and the verdicts are cached
(ONNX files keyed like the feature cache; OpenVINO's compiled blobs beside them). ``auto`` also times the engine
against Keras on those images once and keeps Keras where Keras is faster (MobileNetV3 here: its converted graph
runs slower in OpenVINO). Keras is imported only where a model is converted or run by Keras: the cached path of a
model file (``engines.cached``) reads verdicts and runs conversions without TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from transferkit.errors import OptionError, TransferkitError
from transferkit.log import logger
from transferkit.options import DEFAULT_ENGINE, EngineOptions
from transferkit.files import (atomic_path, bytes_digest, cache_dir, file_digest, known_digest, read_checked,
                              write_checked)

MIN_COSINE = 0.995  # a lower precision (bf16) vs Keras fp32
INT8_COSINE = 0.98  # int8 vs Keras fp32 (EfficientNet-Lite0 features of photos, calibrated on 64: 0.985)
FP32_COSINE = 0.9999  # a converted fp32 model vs Keras fp32: the same computation, up to rounding
MAX_CALIBRATION = 64  # images an int8 model is calibrated on (engines.quantize)
BF16_MIN_PASSES = 1000  # feature_precision auto: bf16 from this many backbone passes (a second engine, built and
# checked in 0.8 s, saves 1.9 ms a pass at 258 vs 172 img/s here: below ~420 passes fp32 alone is faster)
INT8_MIN_PASSES = 2000  # and, on a CPU without AMX, int8 from this many (its calibration, 3.5 s once
# per image set, must be earned back)
CONVERSION = "c2"  # part of the cached files' names: a fixed converter (c2: Normalization constants) redoes them


@dataclass
class Engine:
    """A callable: float32 RGB 0-255 batch (n, size, size, 3) -> model outputs (n, ...)."""

    runtime: str
    precision: str
    run: Callable[[np.ndarray], np.ndarray]
    check_cosine: float | None = None  # vs Keras fp32, where it was checked
    verdict: dict | None = None  # the check: cosine, speeds, and the images it was measured on
    respawn: Callable[[int], Callable] | None = None  # threads -> the same converted model on that many threads

    def on_threads(self, threads: int) -> "Engine":
        """The same engine (same converted file, precision and check) on ``threads`` threads: the same numbers
        (OpenVINO fp32 on 1 and 2 threads: bitwise equal features; tested). Itself where it cannot."""
        if self.respawn is None:
            return self
        return dataclasses.replace(self, run=self.respawn(threads))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run(np.asarray(images, dtype=np.float32))

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.precision}"


def installed(runtime: str) -> bool:
    name = {"onnxruntime": "onnxruntime", "openvino": "openvino", "nncf": "nncf"}.get(runtime)
    return name is None or importlib.util.find_spec(name) is not None


# oneDNN's instruction-set levels (ONEDNN_MAX_CPU_ISA), lowest first, with the /proc/cpuinfo flags chosen on here
# that each level adds: a cap below a level means its instructions go unused, whatever the CPU has
ISA_LEVELS = (("SSE41", ()), ("AVX", ()), ("AVX2", ()), ("AVX2_VNNI", ("avx_vnni",)), ("AVX2_VNNI_2", ()),
              ("AVX512_CORE", ()), ("AVX512_CORE_VNNI", ("avx512_vnni",)), ("AVX512_CORE_BF16", ("avx512_bf16",)),
              ("AVX512_CORE_FP16", ()), ("AVX10_1_512", ()), ("AVX512_CORE_AMX", ("amx_bf16", "amx_int8", "amx_tile")))


def _cpu_flags() -> set[str] | None:
    """The CPU's flags from /proc/cpuinfo (None where it cannot be read), less those of the instruction sets that
    ``ONEDNN_MAX_CPU_ISA`` (oneDNN's cap, which OpenVINO's and TensorFlow's CPU kernels obey) rules out: with
    ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` this AMX machine computes, and chooses, as one without AMX does."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = set(f.read().split())
    except OSError:
        return None
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    names = [name for name, _ in ISA_LEVELS]
    if cap.startswith("AVX512_CORE_AMX") or cap.startswith("AVX10_1_512_AMX"):
        cap = "AVX512_CORE_AMX"
    if cap in names:
        for name, gated in ISA_LEVELS[names.index(cap) + 1:]:
            flags -= set(gated)
    return flags


def cpu_has(*flags: str) -> bool:
    """True where /proc/cpuinfo lists any of ``flags``."""
    return bool(set(flags) & (_cpu_flags() or set()))


def import_openvino():
    """``import openvino`` without loading its model-conversion tools (``openvino.tools.ovc``, which OpenVINO's own
    ``__init__`` imports when it can, and its telemetry): nothing here converts through them (ONNX files are read
    by ``compile_model``), and they were most of OpenVINO's import, 0.39 s -> 0.2 s of the 0.55 s that one cached
    prediction took. ``openvino.convert_model`` stays available: it loads them at its first call."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    blocked = sys.modules.setdefault("openvino.tools.ovc", None) is None
    try:
        import openvino as ov
    except ImportError:  # an OpenVINO that needs them at import: as it comes
        sys.modules.pop("openvino.tools.ovc", None)
        import openvino as ov
    finally:
        if blocked and sys.modules.get("openvino.tools.ovc", False) is None:
            del sys.modules["openvino.tools.ovc"]
    if not hasattr(ov, "convert_model"):
        def convert_model(*args, **kwargs):
            from openvino.tools.ovc import convert_model as convert

            return convert(*args, **kwargs)

        ov.convert_model = convert_model
    return ov


def fast_bf16() -> bool:
    """True where bf16 is the fast precision: AMX-BF16 tiles. With AVX512-BF16 alone (AMX ruled out by
    ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` here; benchmarks/precision.py, Lite0, batch 32) OpenVINO's bf16 ran at
    132 img/s against 154 for fp32 and 256 for int8; with AMX, 430 against 178 and 232."""
    return cpu_has("amx_bf16")


def native_bf16() -> bool:
    """True where the CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16): bf16 can be asked for."""
    if _cpu_flags() is not None:
        return cpu_has("avx512_bf16", "amx_bf16")
    if installed("openvino"):
        ov = import_openvino()
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return False


def resolve(runtime: str = DEFAULT_ENGINE.runtime, precision: str = DEFAULT_ENGINE.precision) -> tuple[str, str]:
    """The (runtime, precision) that ``auto`` means on this machine, or a clear error for an impossible ask."""
    EngineOptions(runtime=runtime, precision=precision)  # the record's own checks: choices, bf16 needs openvino
    if runtime == "auto":
        runtime = next(r for r in ("openvino", "onnxruntime", "keras") if installed(r))
    elif not installed(runtime):
        extra = "'transferkit[fast]'" if runtime == "onnxruntime" else runtime
        raise TransferkitError(f"runtime {runtime} is not installed: pip install {extra}")
    if precision == "auto":
        precision = "bf16" if runtime == "openvino" and fast_bf16() else "fp32"
    if precision in ("bf16", "int8") and runtime != "openvino":
        raise OptionError("precision", f"{precision} needs runtime openvino (runtime is {runtime!r})", precision)
    if precision == "int8" and not installed("nncf"):
        raise OptionError("precision", "int8 needs NNCF (pip install nncf)", precision)
    return runtime, precision


def training_precision(choice: str, runtime: str, n_passes: int) -> str:
    """The precision of a run's training-view features: ``choice``, or for ``auto``: bf16 where it is the fast
    precision (AMX, ``fast_bf16``) and the run's passes earn a second engine; elsewhere, with int8 dot products
    (VNNI), int8 where the passes earn its calibration; else fp32 (the reported numerics' own extractor). Only
    OpenVINO computes bf16 and int8: with another runtime it is fp32. ``n_passes`` counts every view, cached or
    not, so a second run picks the same precision (and finds its features)."""
    if resolve(runtime, "fp32")[0] != "openvino":
        return "fp32"
    if choice != "auto":
        return choice
    if fast_bf16():  # measured here (AMX): bf16 395 img/s, int8 270 (Lite0), 195 vs 101 (Lite1, cosine 0.96)
        return "bf16" if n_passes >= BF16_MIN_PASSES else "fp32"
    if n_passes >= INT8_MIN_PASSES and installed("nncf") and cpu_has("avx512_vnni", "avx_vnni"):
        return "int8"  # without AMX, int8 dot products (VNNI) are the fast path (Lite0: 256 vs 154 img/s fp32)
    return "fp32"


def _onnx_path(key: str):
    return cache_dir("runtimes") / f"{key}-{CONVERSION}.onnx"


def _checksum_path(path):
    return path.with_name(path.name + ".blake2b")


def cached_onnx(key: str) -> str | None:
    """The cached conversion under ``key`` if its checksum holds (absent, unfinished or damaged: None)."""
    path = _onnx_path(key)
    recorded = read_checked(_checksum_path(path))
    return str(path) if recorded is not None and recorded == _digest_or_none(path) else None


@contextlib.contextmanager
def onnx_file(model: keras.Model, key: str | None, rebuild: bool = False):
    """The model as an ONNX file: converted once and cached under ``key`` (with a checksum beside it: a damaged
    or unfinished file is converted again, never used), or, for a model that has no stable identity (``key=None``:
    random weights), converted into a temporary folder that is removed afterwards."""
    from transferkit.engines.keras_onnx import save_onnx

    if key is None:
        with tempfile.TemporaryDirectory(prefix="transferkit-onnx-") as folder:
            save_onnx(model, os.path.join(folder, "model.onnx"))
            yield os.path.join(folder, "model.onnx")
        return
    path = _onnx_path(key)
    if rebuild or cached_onnx(key) is None:
        if path.exists():
            logger.warning(f"{path.name}: cached conversion missing its checksum or damaged; converting again")
        with atomic_path(path, suffix=".onnx") as tmp:
            os.unlink(tmp)  # the exporter writes the file itself
            save_onnx(model, tmp)
        write_checked(_checksum_path(path), file_digest(path).encode())
    yield str(path)


def _digest_or_none(path) -> bytes | None:
    try:
        return known_digest(path).encode()
    except OSError:
        return None


def thread_limit() -> int | None:
    """Threads an engine may use (``$TRANSFERKIT_THREADS``; None: the engine's own choice, every core). A Ray
    actor sets it to the CPUs it reserved, so two actors on a 2-core node do not each start two threads."""
    value = os.environ.get("TRANSFERKIT_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _onnxruntime(path: str, threads: int | None = None) -> Callable:
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = threads or thread_limit()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise TransferkitError(f"{path}: the ONNX graph has {len(inputs)} inputs (constants exported as inputs)")
    name = inputs[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_run(model, precision: str, cache_compiled: bool = True, threads: int | None = None) -> Callable:
    """OpenVINO on ``model`` (an ONNX path, or an ``openvino.Model`` such as an int8 one) on ``threads`` threads
    (default: ``thread_limit``). Compiled models of cached conversions are cached by OpenVINO itself
    (CACHE_DIR): a second process loads Lite0's in 0.08 s instead of 0.2 s."""
    ov = import_openvino()
    core = ov.Core()
    if cache_compiled:
        core.set_property({"CACHE_DIR": str(cache_dir("runtimes", "openvino"))})
    hint = "bf16" if precision == "bf16" else "f32"  # int8: the layers NNCF keeps in float (novelty) stay f32
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    threads = threads or thread_limit()
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, "CPU", config)
    if len(compiled.inputs) != 1:
        raise TransferkitError(f"{model}: the ONNX graph has {len(compiled.inputs)} inputs (constants exported "
                               f"as inputs)")
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return lambda x: np.asarray(request.infer({0: x})[output])


def runner(path: str, runtime: str, precision: str, key: str | None, calibration: np.ndarray | None,
           threads: int | None = None) -> Callable:
    """The function that runs the converted model at ``path`` on ``runtime`` in ``precision`` (on ``threads``
    threads; default: ``thread_limit``)."""
    if runtime == "onnxruntime":
        return _onnxruntime(path, threads)
    if precision == "int8":
        from transferkit.engines.quantize import int8_model

        if calibration is None or not len(calibration):
            raise TransferkitError("int8 needs calibration images")
        return openvino_run(int8_model(path, key, calibration), precision, key is not None, threads)
    return openvino_run(path, precision, key is not None, threads)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of corresponding rows."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float(np.mean(num / den))


def min_cosine(precision: str) -> float:
    """The least cosine vs Keras fp32 that an engine of ``precision`` must reach to be used."""
    return {"fp32": FP32_COSINE, "int8": INT8_COSINE}.get(precision, MIN_COSINE)


KERAS_MARGIN = 1.5  # auto keeps Keras only where it measured this much faster than the converted engine


def keras_faster(speed: dict) -> bool:
    """Whether ``auto`` keeps Keras for a verdict's speeds ({"engine", "keras"} img/s). The check is 3 calls on 8
    photos, once per model: on a busy machine (4 processes on 2 cores) OpenVINO measured 28 % slower than Keras
    for Lite0, which it runs 1.8x faster when the machine is idle (benchmarks/precision.py), and a model kept
    on Keras then imports TensorFlow at every later use (0.9 s -> 16 s, 140 MB -> 825 MB for one photo). So a
    margin: only a real difference (MobileNetV3 on OpenVINO) keeps Keras."""
    return speed["keras"] > KERAS_MARGIN * speed["engine"]


def _speeds(engines: dict, images: np.ndarray, repeats: int = 5) -> dict:
    """Images per second of each of ``engines`` ({name: engine}) on ``images``: the best of ``repeats`` calls,
    the engines taking turns, so that a busy spell of the machine slows each of them alike (the caller has warmed
    them up). Measured in turns, best of 5: OpenVINO 435 vs Keras 170 img/s for a Lite0 classifier; one after
    the other, best of 3, on the same busy machine: 84 vs 151."""
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine(images)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(images) / seconds for name, seconds in best.items()}


def sample_id(images: np.ndarray) -> dict:
    """What a verdict was measured on: the images' count, content digest and mean pixel spread (a photo has
    spread; a constant warm-up batch has none)."""
    arr = np.ascontiguousarray(images, dtype=np.float32)
    spread = float(arr.reshape(len(arr), -1).std(axis=1).mean()) if len(arr) else 0.0
    return {"images": int(len(arr)), "digest": bytes_digest(arr.tobytes())[:16], "pixel_std": round(spread, 2)}


def photo_like(images: np.ndarray | None) -> bool:
    """True for a batch of real-looking images: each has pixel spread (never zeros or one flat colour, which
    would certify an engine on inputs no user sends)."""
    if images is None or not len(images):
        return False
    arr = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    return bool((arr.std(axis=1) >= 4.0).all())


def read_verdict(path) -> dict | None:
    """A cached verdict whose checksum holds, or None (absent, damaged, or from another version)."""
    payload = read_checked(path) if path is not None else None
    try:
        cached = json.loads(payload) if payload else None
    except ValueError:
        return None
    ok = isinstance(cached, dict) and isinstance(cached.get("cosine"), float) \
        and {"engine", "keras"} <= set(cached.get("img_per_s", {}))
    return cached if ok else None


def _verdict(engine: Engine, keras_engine: Engine, sample: np.ndarray, path, n_classes: int | None = None) -> dict:
    """Cosine of ``engine`` vs Keras fp32 on ``sample``, and both speeds; measured once per model and cached in
    ``path`` (None: not cached) with a checksum and what it was measured on. For a classifier (``n_classes``)
    each output column is first scaled by its reference RMS, so that outputs of different magnitudes
    (probabilities beside a novelty score in the thousands) all count, and the share of the sample's labels (and
    unknown verdicts) that agree with fp32 is recorded."""
    cached = read_verdict(path)
    if cached is not None:
        return cached
    expected = keras_engine(sample)  # also warms up Keras's compiled step for the timing
    got = engine(sample)
    verdict = {"sample": sample_id(sample)}
    if n_classes:
        verdict |= agreement(got, expected, n_classes)
        scale = np.sqrt((np.asarray(expected, np.float64) ** 2).mean(axis=0)) + 1e-12
        got, expected = got / scale, expected / scale
    verdict |= {"cosine": cosine(got, expected),
                "img_per_s": _speeds({"engine": engine, "keras": keras_engine}, sample)}
    if path is not None:
        write_checked(path, json.dumps(verdict, indent=2).encode())
    return verdict


def agreement(got: np.ndarray, expected: np.ndarray, n_classes: int) -> dict:
    """The share of images whose label (and, with a novelty column, unknown verdict) two engines agree on."""
    got, expected = np.asarray(got), np.asarray(expected)
    same = {"label_agreement": float(np.mean(got[:, :n_classes].argmax(1) == expected[:, :n_classes].argmax(1)))}
    if got.shape[-1] == n_classes + 1:
        same["unknown_agreement"] = float(np.mean((got[:, -1] > 1.0) == (expected[:, -1] > 1.0)))
    return same


def verdict_path(key: str, runtime: str, precision: str):
    return cache_dir("runtimes") / f"{key}-{CONVERSION}-{runtime}-{precision}.check.json"


def build_engine(model: keras.Model, key: str | None, runtime: str = DEFAULT_ENGINE.runtime,
                 precision: str = DEFAULT_ENGINE.precision, check_images: np.ndarray | None = None,
                 n_classes: int | None = None, calibration: np.ndarray | None = None) -> Engine:
    """An engine for ``model`` (fixed input); ``key`` names its cached conversion (None: not cached, for models
    without a stable identity such as random weights). With ``check_images``, its outputs are compared once with
    Keras fp32 on them: a lower precision that drifts falls back to fp32, a conversion that disagrees falls back
    to Keras, and ``auto`` keeps Keras where it measured faster for this model. A cached conversion that fails
    to load is converted again once before Keras is used. ``n_classes``: the model is a classifier (its label
    agreement is measured); ``calibration``: the images int8 is calibrated on (default: ``check_images``)."""
    from transferkit.engines.keras_step import run_model

    asked_auto = runtime == "auto"
    runtime, precision = resolve(runtime, precision)
    keras_engine = Engine("keras", "fp32", lambda x: run_model(model, x))
    if runtime == "keras":
        return keras_engine
    sample = None if check_images is None or not len(check_images) else np.asarray(check_images[:8], np.float32)
    calibration = check_images if calibration is None else calibration
    for attempt in range(2 if key else 1):
        try:
            with onnx_file(model, key, rebuild=attempt > 0) as path:
                return _checked_engine(path, key, runtime, precision, keras_engine, sample, asked_auto,
                                       n_classes, calibration)
        except Exception as exc:  # a converter or runtime that cannot take this model: Keras still can
            reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
            again = attempt == 0 and key is not None
            logger.warning(f"{runtime} cannot run {key or 'this model'} ({reason}); "
                           + ("converting it again" if again else "using keras fp32"))
    return keras_engine


def variant_key(key: str | None, precision: str, calibration: np.ndarray | None) -> str | None:
    """The cache name of one precision of a converted model: int8 ones also by what they were calibrated on."""
    if key is None or precision != "int8" or calibration is None:
        return key
    from transferkit.engines.quantize import calibration_id

    return f"{key}-int8-{calibration_id(calibration)}"


def _checked_engine(path: str, key: str | None, runtime: str, precision: str, keras_engine: Engine,
                    sample: np.ndarray | None, asked_auto: bool, n_classes: int | None,
                    calibration: np.ndarray | None) -> Engine:
    """The engine on the converted file at ``path``, in ``precision`` or, where that drifts, fp32; Keras where
    the conversion disagrees with it (or, for ``auto``, where Keras measured faster)."""
    for candidate in dict.fromkeys((precision, "fp32")):
        engine = Engine(runtime, candidate, runner(path, runtime, candidate, key, calibration))
        if key is not None:  # a cached file (a temporary one is gone after build_engine)
            engine.respawn = lambda threads, c=candidate: runner(path, runtime, c, key, calibration, threads)
        if sample is None:
            return engine
        named = variant_key(key, candidate, calibration)
        verdict = _verdict(engine, keras_engine, sample, None if key is None else
                           verdict_path(named, runtime, candidate), n_classes)
        bound = min_cosine(candidate)
        if verdict["cosine"] >= bound:
            speed = verdict["img_per_s"]
            if asked_auto and keras_faster(speed):
                logger.info(f"keras fp32 is faster than {engine.label} for this model "
                            f"({speed['keras']:.0f} vs {speed['engine']:.0f} img/s); using keras fp32")
                return keras_engine
            engine.check_cosine, engine.verdict = verdict["cosine"], verdict
            if candidate != "fp32":
                logger.info(describe_check(engine))
            return engine
        fallback = f"{runtime} fp32" if candidate != "fp32" else "keras fp32"
        what = "drifts from fp32" if candidate != "fp32" else "disagrees with keras"
        logger.warning(f"{runtime} {candidate} {what} (cosine {verdict['cosine']:.4f} < {bound}); "
                       f"using {fallback}")
    return keras_engine


def describe_check(engine: Engine) -> str:
    """One line on what a lower precision was measured to change, on the images it was checked on."""
    verdict = engine.verdict or {}
    n = verdict.get("sample", {}).get("images", 0)
    text = f"{engine.label}: cosine {verdict.get('cosine', float('nan')):.4f} vs fp32 on {n} of your images"
    if "label_agreement" in verdict:
        text += f", the same label on {verdict['label_agreement']:.0%}"
    if "unknown_agreement" in verdict:
        text += f" and the same unknown verdict on {verdict['unknown_agreement']:.0%}"
    if "label_agreement" in verdict:
        text += " (--precision fp32 gives the exact answer of the model file and its exports)"
    return text
