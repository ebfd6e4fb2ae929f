"""A ``.keras`` model file answered by its converted engine from the cache, without importing TensorFlow.

``transferkit predict model.keras photo.jpg`` took 9.2 s and 990 MB here (TensorFlow's import, a Keras load) for
one photo, against 0.25 s for the same model exported to ONNX. The first use of a model file on an engine other
than Keras converts it once (``engines.keras_model``) and caches the conversion, with its check against Keras fp32,
under the file's content hash. Every later use finds both here by that hash, reads the class names, metadata and
check photos from the zip, and runs the converted model: one photo in 0.55 s and 195 MB from a cold process
(``benchmarks/predict_cli.py``). Nothing here imports Keras; anything missing or not certified (no conversion, a
damaged one, a verdict measured on other photos, Keras measured faster for ``auto``) returns None and the caller
loads the model file with Keras as before.
"""

from __future__ import annotations

import numpy as np

from transferkit.engines import runtimes
from transferkit.files import cache_dir, known_digest, read_checked, write_checked
from transferkit.log import logger
from transferkit.models import modelfile
from transferkit.options import DEFAULT_ENGINE, EngineOptions
from transferkit.runs import check_model_metadata


def classifier_key(path: str, image_size: int) -> str:
    """The cache name of a model file's conversion: its content hash and input size."""
    return f"classifier-{known_digest(path)[:16]}-{int(image_size)}px"


class CachedPredictor:
    """A model file's classifier on its cached, checked OpenVINO / onnxruntime engine (the ``Predictor``
    protocol, as ``KerasPredictor`` and ``OnnxPredictor``)."""

    def __init__(self, engine: runtimes.Engine, class_names: list[str], image_size: int, metadata: dict, path: str,
                 check_images: np.ndarray | None = None):
        self.engine, self.class_names, self.image_size = engine, list(class_names), int(image_size)
        self.metadata, self.path, self._check = metadata, str(path), check_images

    @property
    def check_images_(self) -> np.ndarray | None:
        """The model file's validation photos (decoded at the first ask: a prediction does not need them)."""
        if self._check is None:
            self._check = modelfile.read_check_images(self.path, self.image_size)
        return self._check

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.engine(np.asarray(images, np.float32)), np.float32)

    @classmethod
    def find(cls, path: str, engine: EngineOptions = DEFAULT_ENGINE) -> "CachedPredictor | None":
        """The cached engine of the model file ``path`` for ``engine``, or None where there is none to trust. A
        damaged or foreign file is a one-line TransferkitError, as from the Keras path."""
        where = _conversion(path, engine)
        if where is None:
            return None
        runtime, precision, metadata, names, size, key = where
        onnx = runtimes.cached_onnx(key)
        if onnx is None:
            return None
        check = modelfile.read_check_images(path, size) if precision == "int8" else None  # its calibration
        verdict = _trusted_verdict(key, runtime, precision, path, size, check, engine.runtime == "auto")
        if verdict is None:
            return None
        try:
            run = runtimes.runner(onnx, runtime, precision, key, check)
        except Exception as exc:  # a runtime that no longer takes the cached file: the Keras path converts again
            logger.warning(f"{path}: cached {runtime} {precision} engine unusable ({str(exc).splitlines()[0][:200]}); "
                           f"loading the model with Keras")
            return None
        found = runtimes.Engine(runtime, precision, run, verdict["cosine"], verdict)
        if precision != "fp32":
            logger.info(runtimes.describe_check(found))
        return cls(found, names, size, metadata, path, check)  # check: decoded only for int8 (else lazily)


def missing(path: str, engine: EngineOptions = DEFAULT_ENGINE) -> bool:
    """True where a use of the model file ``path`` on ``engine`` would convert it: a converted runtime, a file with
    check photos (one without is checked on its first real batch, where it is used), and no conversion with its
    verdict in the cache (a verdict that refused the engine counts as there: Keras answers, nothing to redo). A
    damaged or foreign file is a one-line TransferkitError, as from ``find``."""
    where = _conversion(path, engine)
    if where is None:
        return False
    runtime, precision, _, _, size, key = where
    if _check_digest(key, path, size) is None:
        return False
    check = modelfile.read_check_images(path, size) if precision == "int8" else None  # its calibration
    named = runtimes.variant_key(key, precision, check)
    verdict = runtimes.read_verdict(runtimes.verdict_path(named, runtime, precision))
    return runtimes.cached_onnx(key) is None or verdict is None


def _conversion(path: str, engine: EngineOptions) -> tuple | None:
    """(runtime, precision, metadata, class names, image size, cache key) of the model file ``path``'s conversion
    for ``engine``, or None where it has none (Keras, or a file without a usable image size). A damaged or
    foreign file is a one-line TransferkitError."""
    if engine.runtime == "keras":
        return None
    runtime, precision = runtimes.resolve(engine.runtime, engine.precision)
    if runtime == "keras":
        return None
    metadata = modelfile.read_metadata(path)
    names = check_model_metadata(path, metadata)
    size = metadata.get("image_size")
    if not isinstance(size, int) or size < 8:
        return None
    return runtime, precision, metadata, names, size, classifier_key(path, size)


def _sample_digest(check: np.ndarray) -> str:
    """The digest a verdict records of the check photos it was measured on (``runtimes.sample_id``)."""
    return runtimes.sample_id(np.asarray(check[:8], np.float32))["digest"]


def _check_digest(key: str, path: str, size: int) -> str | None:
    """The digest of the model file's check photos as a verdict records them (None: the file has none),
    remembered beside its conversion under the file's content hash: decoding the 8 photos took 35 ms of a cached
    prediction's 0.45 s."""
    memo = cache_dir("runtimes") / f"{key}.check-digest"
    found = read_checked(memo)
    if found is not None:
        return found.decode("ascii") or None
    check = modelfile.read_check_images(path, size)
    digest = None if check is None else _sample_digest(check)
    write_checked(memo, (digest or "").encode("ascii"))
    return digest


def _trusted_verdict(key: str, runtime: str, precision: str, path: str, size: int, check: np.ndarray | None,
                     auto: bool) -> dict | None:
    """The cached check of this conversion in ``precision``, if it passed on this model file's own photos (and,
    for ``auto``, found the engine faster than Keras); ``check``: the photos, decoded already (int8)."""
    named = runtimes.variant_key(key, precision, check)
    verdict = runtimes.read_verdict(runtimes.verdict_path(named, runtime, precision))
    if verdict is None or verdict["cosine"] < runtimes.min_cosine(precision):
        return None
    digest = _check_digest(key, path, size) if check is None else _sample_digest(check)
    if digest is not None and verdict.get("sample", {}).get("digest") != digest:
        return None
    if auto and runtimes.keras_faster(verdict["img_per_s"]):
        return None
    return verdict
