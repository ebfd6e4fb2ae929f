"""``transferkit train DATA --ray [ADDRESS]``: the backbone passes of a training run spread over a Ray cluster.

Feature extraction is the whole cost of a run (one backbone pass per image and view; the head fit on the cached
vectors takes seconds), and every pass is independent. So before the run reads its features, the (image, view)
pairs missing from the feature cache become a Ray Dataset mapped by an actor pool, and the results land in the
same content-hash cache, in the same format, under the same key: the run then reads them as cache hits, and a
second run on one machine (with or without Ray) reuses them.

The actors run the engine the driver built and checked, not one of their own: the driver sends the bytes of its
converted ONNX file (and, for int8, its calibration photos), so the workers need no TensorFlow, load in about a
second, and compute the numbers the driver would (a Keras engine, where the driver fell back to it, is rebuilt
by each actor). Where the workers see the driver's cache folder (a shared file system: checked with a token
file the driver writes), they store the features there themselves; otherwise the features are streamed back to
the driver, which stores them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.log import logger
from transferkit.scale.cluster import LOCAL, cluster_cpus, connect


class Extract:
    """Ray actor: the driver's feature engine, answering batches of (path, digest, view) with features, or, on a
    shared cache folder, storing them there."""

    def __init__(self, spec: dict, onnx: bytes | None, calibration: np.ndarray | None, threads: int):
        os.environ["TRANSFERKIT_THREADS"] = str(threads)  # the CPUs Ray reserved for this actor
        logging.getLogger("transferkit").setLevel(logging.WARNING)
        from pathlib import Path

        from transferkit.engines import runtimes

        self.size, self.dtype = spec["image_size"], np.dtype(spec["dtype"])
        root = spec["cache_root"]
        self.shared = Path(root, spec["token"]).is_file()
        self.cache_root = Path(root) if self.shared else None
        if onnx is None:  # the driver runs Keras: so does each actor
            from transferkit.training.features import FeatureExtractor

            extractor = FeatureExtractor(spec["backbone"], spec["image_size"], weights=spec["weights"],
                                         pooling=spec["pooling"], cache=False, runtime="keras",
                                         depths=spec["depths"])
            self.run = extractor.forward
            return
        self._folder = tempfile.TemporaryDirectory(prefix="transferkit-ray-")
        path = os.path.join(self._folder.name, "features.onnx")
        with open(path, "wb") as f:
            f.write(onnx)
        self.run = runtimes.runner(path, spec["runtime"], spec["precision"], None, calibration)

    def __call__(self, batch: dict) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        from transferkit.data.images import decode_batch
        from transferkit.training import augment
        from transferkit.training.cache import store_feature

        paths, digests, views = list(map(str, batch["path"])), list(map(str, batch["digest"])), batch["view"]
        with ThreadPoolExecutor(max_workers=2) as pool:
            arrays, _ = decode_batch(paths, self.size, pool)
        ok = [i for i, a in enumerate(arrays) if a is not None]  # an unreadable file: the run reports it
        out_digest, out_view, out_feature = [], [], []
        for v in sorted({int(views[i]) for i in ok}):
            rows = [i for i in ok if int(views[i]) == v]
            images = np.stack([arrays[i] for i in rows])
            if v > 0:
                images = augment.augment_batch(images, [digests[i] for i in rows], v)
            feats = np.asarray(self.run(np.asarray(images, np.float32)))
            for i, f in zip(rows, feats):
                if self.shared:
                    store_feature(self.cache_root, digests[i], v, f, self.dtype)
                else:
                    out_feature.append(f.astype(self.dtype))
                out_digest.append(digests[i])
                out_view.append(v)
        result = {"digest": np.array(out_digest, dtype=object), "view": np.array(out_view, dtype=np.int64)}
        if not self.shared:
            result["feature"] = np.stack(out_feature) if out_feature else np.zeros((0, 1), self.dtype)
        return result


def missing(extractor, paths: list[str], views: int, digests: dict[str, str]) -> list[dict]:
    """The (path, digest, view) whose feature is not in ``extractor``'s cache, view by view."""
    from transferkit.training.cache import cache_file

    return [{"path": os.path.abspath(p), "digest": digests[p], "view": v} for v in range(views + 1) for p in paths
            if not cache_file(extractor.cache_root, digests[p], v).is_file()]


def prefill(extractor, paths: list[str], views: int, digests: dict[str, str], address: str | None = LOCAL,
            shared: bool | None = None) -> int:
    """Compute on the Ray cluster at ``address`` every feature of ``paths`` (views 0 to ``views``) missing from
    ``extractor``'s cache, and store it there; returns how many were computed. ``shared``: whether the workers
    store into the driver's cache folder (None: when they can see it)."""
    if extractor.cache_root is None:
        raise TransferkitError("--ray fills the feature cache: it needs the cache (not --no-cache) and pretrained "
                               "or file weights (random weights are never cached)")
    todo = missing(extractor, paths, views, digests)
    if not todo:
        return 0
    ray = connect(address)
    spec, onnx = _engine_spec(extractor, paths)
    token = f".ray-{uuid.uuid4().hex}"
    if shared is not False:
        (extractor.cache_root / token).write_text("transferkit --ray: the workers see this cache folder\n")
    try:
        stored = _run(ray, extractor, todo, spec | {"token": token}, onnx)
    finally:
        (extractor.cache_root / token).unlink(missing_ok=True)
    lost = len(todo) - stored
    unreadable = f" ({lost} of unreadable files: reported with the skipped)" if lost else ""
    logger.info(f"Ray computed {stored} of {len(todo)} missing feature(s){unreadable}")
    return stored


def _engine_spec(extractor, paths: list[str]) -> tuple[dict, bytes | None]:
    """What an actor needs to compute the driver's numbers: the engine, built and checked here on a few of the
    run's photos if it is not yet, and its converted file's bytes (None: the driver runs Keras)."""
    from transferkit.engines import runtimes
    from transferkit.training.features import _decoded

    if extractor.engine is None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2) as pool:
            check = _decoded(paths[:: max(1, len(paths) // 8)][:8], extractor.image_size, pool)
        if check is None:
            raise TransferkitError("no readable training image to check the feature engine on")
        extractor.forward(check)
    engine = extractor.engine
    spec = dict(backbone=extractor.backbone, image_size=extractor.image_size, weights=extractor.weights,
                pooling=extractor.pooling, depths=extractor.depths, runtime=engine.runtime,
                precision=engine.precision, dtype=np.dtype(extractor.dtype).name,
                cache_root=str(extractor.cache_root))
    if engine.runtime == "keras":
        return spec, None
    path = runtimes.cached_onnx(extractor.model_key)
    if path is None:
        raise TransferkitError(f"{extractor.model_key}: the converted feature model is not in the cache")
    with open(path, "rb") as f:
        return spec, f.read()


def _run(ray, extractor, todo: list[dict], spec: dict, onnx: bytes | None) -> int:
    """The actor pool over ``todo``; features streamed back are stored here. Returns the features computed."""
    calibration = extractor.calibration if spec["precision"] == "int8" else None
    ds = ray.data.from_items(todo)
    ds = ds.map_batches(Extract, batch_size=extractor.batch_size, batch_format="numpy", num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=min(cluster_cpus(), len(todo))),
                        fn_constructor_kwargs=dict(spec=spec, onnx=onnx, calibration=calibration, threads=1))
    stored = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if "feature" in batch:
            for digest, view, feature in zip(batch["digest"], batch["view"], batch["feature"]):
                extractor._store(str(digest), int(view), feature)
        stored += len(batch["digest"])
    return stored
