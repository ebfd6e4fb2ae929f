"""Frozen-backbone features, computed once per image and view and cached on disk.

The backbone is frozen, so pushing an image through it every epoch is wasted work: each image (and each of its
augmented views) goes through once, and the head trains on the cached vectors. The cache key is the backbone,
its weights, the image size, the pooling, the augmentation recipe, the view number and the file's content hash,
so a changed file is re-extracted and a different head or epoch count reuses everything.
"""

from __future__ import annotations

import copy
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from transferkit.training import augment

from transferkit.engines import runtimes
from transferkit.models.backbones import build_feature_extractor, get_spec
from transferkit.files import cache_dir, file_digest, read_checked
from transferkit.training.cache import cache_file, store_feature
from transferkit.data.images import decode_batch
from transferkit.engines.keras_step import without_resize
from transferkit.log import logger, progress_bar, show_progress
from transferkit.models.heads import head_pooling
from transferkit.options import DEFAULT_ENGINE, TrainOptions

FEATURE_VERSION = "2"  # 2: each cached file ends in a checksum (a flipped bit is recomputed, not trained on)


def feature_depths(options: TrainOptions) -> int:
    """How many blocks' pooled outputs a run extracts beside the final features: ``depths`` (default 0), and for
    ``--head auto`` the most it compares (default 4, or the backbone's blocks below its top if fewer)."""
    if options.head != "auto":
        return int(options.depths or 0)
    wanted = 4 if options.depths is None else int(options.depths)
    return min(wanted, get_spec(options.backbone).n_blocks - 2)  # n_blocks counts the stem and the top


class FeatureExtractor:
    """Features of image files through one frozen backbone, with the on-disk cache."""

    def __init__(self, backbone: str, image_size: int | None = None, weights="imagenet", pooling: str | None = "avg",
                 batch_size: int = 32, cache: bool = True, runtime: str = DEFAULT_ENGINE.runtime,
                 precision: str = DEFAULT_ENGINE.precision, depths: int = 0):
        spec = get_spec(backbone)
        self.backbone = backbone
        self.image_size = int(image_size or spec.default_size)
        self.weights = weights
        self.pooling = pooling
        self.batch_size = batch_size
        self.depths = int(depths) if pooling == "avg" else 0
        self.model = build_feature_extractor(backbone, self.image_size, weights, pooling, self.depths)
        # random weights (weights=None, for tests) differ in every process: nothing of them is cached
        self.weights_id = "imagenet" if weights == "imagenet" else None if weights is None else \
            file_digest(weights)[:16]
        self.model_key = _model_key(backbone, self.weights_id, self.image_size, pooling, self.depths)
        self.runtime, self.precision = runtimes.resolve(runtime, precision)
        self.engine: runtimes.Engine | None = None
        self.calibration: np.ndarray | None = None  # int8: the images it is calibrated on
        self.cache = cache
        self.cache_root = self._cache_root()
        self.dtype = np.float32 if pooling else np.float16  # feature maps are large: half precision on disk

    def map_forward(self):
        """images -> (the backbone's last feature map, this extractor's features), both through converted engines
        (None where this extractor runs on Keras, or has no stable identity): what Grad-CAM needs of the frozen
        backbone without running it in TensorFlow. 12 photos at 224 px: 1.15 s for their first TensorFlow pass in
        a process (0.4-0.5 s after), 0.2 s of inference here (``train``'s gallery heat maps: 0.92 -> 0.41 s with
        the engine's compile and the head in Keras). The map's engine converts, checks and caches a view of this
        extractor's own model under the map's key (the flatten head's extractor's), as any other."""
        import keras

        if self.model_key is None or self.runtime == "keras" or getattr(self.engine, "runtime", "") == "keras" \
                or self.precision != "fp32":  # bf16 / int8: two engines would not agree on the pooled map
            return None
        if self.pooling is None:  # the features are the map
            return lambda images: (self.forward(images),) * 2
        maps = copy.copy(self)
        maps.model = keras.Model(self.model.input, self.model.get_layer("avg_pool").input,
                                 name=f"{self.model.name}_map")
        maps.pooling, maps.depths, maps.engine, maps.cache_root = None, 0, None, None
        maps.model_key = _model_key(self.backbone, self.weights_id, self.image_size, None, 0)
        return lambda images: (maps.forward(images), self.forward(images))

    def uncached(self) -> "FeatureExtractor":
        """This extractor, reading and writing no cache (a one-off measurement leaves nothing behind)."""
        self.cache_root = None
        return self

    def _cache_root(self) -> Path | None:
        named = runtimes.variant_key(self.model_key, self.precision, self.calibration)
        key = f"v{FEATURE_VERSION}-{named}-{self.precision}-{augment.RECIPE}"
        return cache_dir("features", key) if self.cache and self.model_key else None

    def with_precision(self, precision: str, paths: list[str] = ()) -> "FeatureExtractor":
        """The same backbone (one Keras model, one converted file) computing in another precision: the training
        views' extractor. Its engine is built and checked here, on photos spread over ``paths`` (the run's own
        training images, in the split's order, so a second run finds the same int8 model and features), so that
        a precision that fails its check (falling back to fp32) never labels the features it caches. int8 is
        calibrated on up to MAX_CALIBRATION of those photos and checked on 8 others."""
        if precision == self.precision or not paths:
            return self
        step = max(1, len(paths) // runtimes.MAX_CALIBRATION)
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            calibration = _decoded(paths[::step][: runtimes.MAX_CALIBRATION], self.image_size, pool)
            check = _decoded(paths[step // 2 :: step][:8] if step > 1 else paths[-8:], self.image_size, pool)
        if check is None:
            return self
        other = copy.copy(self)
        other.precision, other.calibration = precision, calibration if precision == "int8" else None
        other.engine = None
        other._build_engine(check)
        if (other.engine.runtime, other.engine.precision) == (self.runtime, self.precision) or \
                other.engine.runtime == "keras":
            return self  # it fell back to this extractor's numerics: one extractor, one cache
        other.precision = other.engine.precision
        other.cache_root = other._cache_root()
        return other

    @classmethod
    def from_options(cls, options: TrainOptions) -> "FeatureExtractor":
        """The extractor a training run with ``options`` uses (its head decides pooled vectors or feature maps)."""
        return cls(options.backbone, options.size, weights=options.weights, pooling=head_pooling(options.head),
                   batch_size=options.batch_size, cache=options.cache, runtime=options.runtime,
                   precision=options.precision, depths=feature_depths(options))

    def _cache_file(self, digest: str, view: int) -> Path:
        return cache_file(self.cache_root, digest, view)

    def _load_cached(self, digest: str, view: int) -> np.ndarray | None:
        if self.cache_root is None:
            return None
        payload = read_checked(self._cache_file(digest, view))
        if payload is None:
            return None  # absent or damaged (checksum): recompute
        try:
            return np.load(io.BytesIO(payload), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return None

    def _store(self, digest: str, view: int, feature: np.ndarray) -> None:
        if self.cache_root is not None:
            store_feature(self.cache_root, digest, view, feature, self.dtype)

    def _build_engine(self, images: np.ndarray) -> None:
        fixed = without_resize(self.model, self.image_size, call=False) if self.runtime != "keras" else self.model
        self.engine = runtimes.build_engine(fixed, self.model_key, self.runtime, self.precision,
                                            check_images=np.asarray(images, np.float32),
                                            calibration=self.calibration)
        check = getattr(self.engine, "check_cosine", None)
        logger.info(f"feature extraction on {self.engine.label}"
                    + (f" (cosine {check:.4f} vs keras fp32)" if check else ""))

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Features of a batch of square RGB 0-255 images at the extractor's size, through the chosen engine
        (picked, converted and, for bf16, checked against fp32 on these images at the first call)."""
        if self.engine is None:
            self._build_engine(images)
        return self.engine(images)

    def extract(self, paths: list[str], views: int = 0, desc: str = "features",
                digests: dict[str, str] | None = None, progress: bool = True,
                stop: threading.Event | None = None) -> tuple[np.ndarray, list[int], list[dict]] | None:
        """Features of view 0 (the image itself) to ``views`` of each path: array (n_ok, views + 1, ...), the
        indices of ``paths`` that decoded, and ``[{path, reason}]`` for those that did not. ``digests``: content
        hashes already computed (a run's fingerprint), so no file is hashed twice. ``stop``: checked before each
        batch; once set, the features computed so far stay cached and None is returned."""
        known = digests or {}
        digests = [known.get(p) or file_digest(p) for p in paths]
        table: dict[tuple[int, int], np.ndarray] = {}
        todo: list[int] = []
        for i, d in enumerate(digests):
            missing = False
            for v in range(views + 1):
                cached = self._load_cached(d, v)
                if cached is None:
                    missing = True
                else:
                    table[i, v] = cached
            if missing:
                todo.append(i)
        failed: dict[int, str] = {}
        n_passes = sum(1 for i in todo for v in range(views + 1) if (i, v) not in table)
        bar = progress_bar(n_passes, desc, disable=not (progress and show_progress()) or n_passes == 0)
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            for start in range(0, len(todo), self.batch_size):
                if stop is not None and stop.is_set():
                    bar.close()
                    return None
                chunk = todo[start : start + self.batch_size]
                arrays, reasons = decode_batch([paths[i] for i in chunk], self.image_size, pool)
                ok = []
                for i, arr, reason in zip(chunk, arrays, reasons):
                    if arr is None:
                        failed[i] = reason
                        bar.update(sum(1 for v in range(views + 1) if (i, v) not in table))
                    else:
                        ok.append((i, arr))
                for v in range(views + 1):
                    need = [(i, arr) for i, arr in ok if (i, v) not in table]
                    if not need:
                        continue
                    batch = np.stack([arr for _, arr in need])
                    if v > 0:
                        batch = augment.augment_batch(batch, [digests[i] for i, _ in need], v)
                    feats = self.forward(batch)
                    for (i, _), f in zip(need, feats):
                        table[i, v] = f
                        self._store(digests[i], v, f)
                    bar.update(len(need))
        bar.close()
        kept = [i for i in range(len(paths)) if i not in failed]
        skipped = [{"path": paths[i], "reason": failed[i]} for i in sorted(failed)]
        if not kept:
            return np.zeros((0, views + 1) + tuple(self.model.output.shape[1:]), np.float32), kept, skipped
        out = np.stack([np.stack([table[i, v] for v in range(views + 1)]) for i in kept]).astype(np.float32)
        return out, kept, skipped


class Prefetch:
    """The features of ``paths`` computed into ``extractor``'s cache on a background thread, on one engine thread,
    while the caller goes on with work that is Python on the other core (``train``: the test photos' while the
    head, the label audit and the novelty statistics are fitted). ``stop()`` when the features are wanted: the
    engine's compile or the batch under way finishes, the rest is left to the caller's own extraction on every
    core; ``computed`` counts the features this wrote, ``error`` is what stopped it early. The engine here is the
    extractor's on one thread (the same numbers: ``Engine.on_threads``), and the caller's BLAS on one thread
    meanwhile (``ImageClassifier.fit_head``). ``train`` on 400 photos with 120 test photos, no AMX, medians of 5:
    10.35 s without either, 9.94 s with the head's BLAS on one thread only, 9.24 s with both; on two engine
    threads the engine and the Python work took turns and it gained nothing. A failure here only leaves features
    uncomputed: the caller's extraction computes them and reports its own errors."""

    def __init__(self, extractor: "FeatureExtractor", paths: list[str]):
        self.computed, self.error = 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(extractor, list(paths)), daemon=True,
                                        name="transferkit-prefetch")
        self._thread.start()

    def _run(self, extractor: "FeatureExtractor", paths: list[str]) -> None:
        try:
            one = copy.copy(extractor)
            one.engine = extractor.engine.on_threads(1)
            if one.engine is extractor.engine:  # no engine of its own: one infer request is not for two threads
                return
            store = one._store

            def counted(digest: str, view: int, feature: np.ndarray) -> None:
                store(digest, view, feature)
                self.computed += 1

            one._store = counted
            one.extract(paths, 0, progress=False, stop=self._stop)
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            self.error = exc
            logger.debug(f"test features ahead of time: {exc}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _model_key(backbone: str, weights_id: str | None, size: int, pooling: str | None, depths: int) -> str | None:
    """The name of an extractor's conversions and features in the cache (None for weights without a stable
    identity: random ones)."""
    if weights_id is None:
        return None
    return f"{backbone}-{weights_id}-{size}px-{pooling or 'map'}" + (f"+d{depths}" if depths else "")


def _decoded(paths: list[str], size: int, pool) -> np.ndarray | None:
    """The images among ``paths`` that decode, stacked (None if none does)."""
    arrays = [a for a in decode_batch(list(paths), size, pool)[0] if a is not None]
    return np.stack(arrays) if arrays else None
