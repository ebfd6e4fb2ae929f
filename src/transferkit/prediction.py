"""Predict labels for image files with a trained model file: label, probability and top-k per image."""

from __future__ import annotations

import glob
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.images import decode_batch
from transferkit.images import SUPPORTED_FORMATS  # noqa: F401  (documented: formats accepted)

_HIDDEN = (".", "__MACOSX")


def load_model(path: str, runtime: str = "keras", precision: str = "auto"):
    """Load a transferkit ``.keras`` model file, or an ``.onnx`` export (run by onnxruntime, without TensorFlow);
    either knows its class names, image size and metadata. ``runtime`` picks the engine of a ``.keras`` model
    (keras, onnxruntime, openvino, or auto: the fastest installed)."""
    if str(path).lower().endswith(".onnx"):
        from transferkit.onnx_model import load_onnx

        return load_onnx(str(path))
    from transferkit import modelfile

    model = modelfile.load(path)
    return model if runtime == "keras" else model.use_runtime(runtime, precision)


def expand_paths(items: list[str]) -> list[str]:
    """Files, folders (recursively, sorted) and glob patterns -> a list of file paths, in the order given."""
    paths = []
    for item in items:
        item = str(item)
        if os.path.isdir(item):
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(_HIDDEN))
                paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
        elif os.path.exists(item):
            paths.append(item)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise TransferkitError(f"{item}: no such file, folder or matching pattern")
            paths.extend(m for m in matches if os.path.isfile(m))
    return paths


def predict_proba(model, paths: list[str], batch_size: int = 32,
                  progress: bool = False) -> tuple[np.ndarray, list[int], list[dict]]:
    """Probabilities for the files that decode: (probs (n_ok, classes), indices of ``paths`` kept, skipped)."""
    probs, kept, skipped = [], [], []
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            arrays, reasons = decode_batch(chunk, model.image_size, pool)
            ok = [j for j, a in enumerate(arrays) if a is not None]
            for j, reason in enumerate(reasons):
                if reason is not None:
                    skipped.append({"path": chunk[j], "reason": reason})
                    if progress:
                        print(f"transferkit: skipped {chunk[j]}: {reason}", file=sys.stderr)
            if ok:
                probs.append(model.predict_images(np.stack([arrays[j] for j in ok])))
                kept.extend(start + j for j in ok)
    n_classes = len(model.class_names)
    return (np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32)), kept, skipped


def rows_from_probs(paths: list[str], probs: np.ndarray, class_names: list[str], top_k: int) -> list[dict]:
    """One result dict per image: path, label, probability and the top-k (label, probability)."""
    k = max(1, min(int(top_k), len(class_names)))
    rows = []
    for path, p in zip(paths, probs):
        order = np.argsort(-p, kind="stable")[:k]
        rows.append({
            "path": path,
            "label": class_names[order[0]],
            "probability": float(p[order[0]]),
            "top_k": [{"label": class_names[i], "probability": float(p[i])} for i in order],
        })
    return rows


def predict(model, paths, top_k: int = 3, batch_size: int = 32, runtime: str = "keras", precision: str = "auto") -> list[dict]:
    """Predict every image in ``paths`` (files, folders, globs). ``model`` is a path (loaded on ``runtime``) or a
    loaded model. Files that cannot be read get a row with ``error`` instead of a label, in their place."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    model = load_model(model, runtime, precision) if isinstance(model, (str, os.PathLike)) else model
    files = expand_paths(list(paths))
    probs, kept, skipped = predict_proba(model, files, batch_size=batch_size)
    rows = dict(zip(kept, rows_from_probs([files[i] for i in kept], probs, model.class_names, top_k)))
    errors = {s["path"]: s["reason"] for s in skipped}
    return [rows.get(i) or {"path": f, "label": None, "probability": None, "top_k": [], "error": errors[f]}
            for i, f in enumerate(files)]


def show_predictions(rows: list[dict], out: str) -> list[str]:
    """Draw each predicted image with 'label (probability)' and its top-k bars: ``out`` for one image,
    ``out`` with ``-1``, ``-2``, ... before the extension for several."""
    from transferkit.images import open_rgb
    from transferkit.plots import plot_prediction

    good = [r for r in rows if not r.get("error")]
    if not good:
        raise TransferkitError("no readable image to show")
    stem, ext = os.path.splitext(out)
    written = []
    for n, row in enumerate(good, start=1):
        target = out if len(good) == 1 else f"{stem}-{n}{ext or '.png'}"
        title = f"{row['label']} ({row['probability']:.3f})"
        written.append(plot_prediction(np.asarray(open_rgb(row["path"])), title, row["top_k"], target))
    return written
