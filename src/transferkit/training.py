"""Train a classifier from a folder of photos: cached frozen-backbone features, a small head, the best epoch by
validation accuracy, and one self-contained model file with its history, plot and metrics beside it."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from transferkit import finetune, modelfile
from transferkit._version import __version__
from transferkit.backbones import DEFAULT_BACKBONE, get_spec
from transferkit.dataset import check_trainable, scan_folder, stratified_split
from transferkit.errors import TransferkitError
from transferkit.features import FeatureExtractor
from transferkit.files import write_json_atomic
from transferkit.inference import run_model
from transferkit.callbacks import MONITOR, KeepBestEpoch, ProgressLine
from transferkit.heads import build_head, head_pooling
from transferkit.metrics import compute_metrics, text_report
from transferkit.plots import plot_history
from transferkit.report import model_summary, write_report

def _flatten_views(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, v = features.shape[:2]
    return features.reshape((n * v,) + features.shape[2:]), np.repeat(labels, v)


def _fit_head(head_model: keras.Model, x_train, y_train, x_val, y_val, epochs: int, batch_size: int,
              learning_rate: float, class_weight: dict | None, seed: int, callbacks: list):
    """Fit the head on in-memory features. The data is tiny, so Keras's per-step and per-epoch overheads dominate:
    a tf.data pipeline built once (seeded reshuffle every epoch) and a whole epoch per compiled call make it
    several times faster than ``fit`` on numpy arrays, with the same batches, optimiser and callbacks."""
    import tensorflow as tf

    steps = -(-len(x_train) // batch_size)
    head_model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                       metrics=["accuracy"], steps_per_execution=steps)
    train_ds = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
                .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True).batch(batch_size).prefetch(2))
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(batch_size)
    return head_model.fit(train_ds, validation_data=val_ds, epochs=epochs, class_weight=class_weight,
                          shuffle=False, callbacks=callbacks, verbose=0)  # shuffled by the dataset


def _metadata(data, data_dir, backbone, weights, size, options: dict) -> dict:
    return {
        "format": "transferkit-model/1",
        "transferkit_version": __version__,
        "keras_version": keras.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "class_names": data.class_names,
        "backbone": backbone,
        "weights": weights if weights in (None, "imagenet") else os.path.basename(str(weights)),
        "image_size": size,
        "input": "RGB 0-255, any size (resized inside the model)",
        "training": {"data_dir": os.path.abspath(data_dir), **options},
    }


def train(data_dir: str, test_dir: str | None = None, backbone: str = DEFAULT_BACKBONE, image_size: int | None = None,
          epochs: int = 30, val_split: float = 0.2, seed: int = 42, batch_size: int = 32, augment_views: int = 4,
          class_weight: str | None = "balanced", head: str = "gap", out: str | None = None, weights="imagenet",
          learning_rate: float = 1e-3, patience: int = 8, dropout: float = 0.2, cache: bool = True,
          fine_tune_epochs: int = 0, unfreeze_top: int = 2, fine_tune_lr: float = 1e-5, resume: bool = False,
          runtime: str = "auto", precision: str = "auto", callbacks=(), verbose: bool = True) -> dict:
    """Train and write ``out/model.keras``, ``history.json``, ``history.png``, ``metrics.json`` (+ test metrics and
    ``report.html`` with its confusion matrices when ``test_dir`` is given). With ``fine_tune_epochs``, a second
    stage unfreezes the top ``unfreeze_top`` backbone blocks; ``resume`` continues an interrupted second stage in
    ``out``. ``callbacks`` are extra Keras callbacks for the fine-tuning stage; ``runtime`` / ``precision`` pick the
    feature-extraction engine (see transferkit.runtimes). Returns the metrics dict."""
    started = time.perf_counter()
    if epochs < 1:
        raise TransferkitError("--epochs must be at least 1")
    if augment_views < 0 or fine_tune_epochs < 0:
        raise TransferkitError("--augment-views and --fine-tune-epochs must be 0 or more")
    if class_weight not in (None, "none", "balanced"):
        raise TransferkitError(f"--class-weight must be 'balanced' or 'none', got '{class_weight}'")
    spec = get_spec(backbone)
    size = int(image_size or spec.default_size)
    if resume and not out:
        raise TransferkitError("--resume needs --out, the run folder to continue")
    out = str(out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    os.makedirs(out, exist_ok=True)
    model_path = os.path.join(out, "model.keras")
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
    keras.utils.set_random_seed(seed)

    data = scan_folder(data_dir)
    check_trainable(data)
    train_idx, val_idx = stratified_split(data.labels, val_split, seed)
    train_paths = [data.paths[i] for i in train_idx]
    val_paths = [data.paths[i] for i in val_idx]
    weights_by_class = None
    if class_weight == "balanced":
        values = compute_class_weight("balanced", classes=np.arange(len(data.class_names)), y=data.labels[train_idx])
        weights_by_class = {i: float(w) for i, w in enumerate(values)}

    state = finetune.read_state(out) if resume else None
    if resume:
        if state is None or not os.path.exists(model_path):
            raise TransferkitError(f"{out}: nothing to resume (no {finetune.STATE_NAME} and model.keras)")
        if state.get("status") == "done":
            raise TransferkitError(f"{out}: fine-tuning already finished")
        loaded = modelfile.load(model_path)
        if loaded.class_names != data.class_names or loaded.metadata.get("backbone") != backbone:
            raise TransferkitError(f"{out}: the saved model was trained on other classes or another backbone")
        model, metadata = loaded.keras_model, loaded.metadata
        saved = json.load(open(os.path.join(out, "history.json"), encoding="utf-8"))
        history, best_epoch = saved["history"], saved["best_epoch"]
        result = json.load(open(os.path.join(out, "metrics.json"), encoding="utf-8"))
        extractor, head_model = None, None
        fine_tune_epochs = state["epochs"]
        result.pop("test", None)
        say(f"resuming fine-tuning in {out}: {state['epochs_done']} of {state['epochs']} epochs done")
    else:
        pooling = head_pooling(head)
        extractor = FeatureExtractor(backbone, size, weights=weights, pooling=pooling, batch_size=batch_size,
                                     cache=cache, verbose=verbose, runtime=runtime, precision=precision)
        say(f"{len(data.paths)} images in {len(data.class_names)} classes ({len(data.skipped)} skipped); "
            f"backbone {backbone} at {size}px; {len(train_idx)} train x {augment_views + 1} views, "
            f"{len(val_idx)} validation")
        t0 = time.perf_counter()
        f_train, kept_train, skip_train = extractor.extract(train_paths, augment_views, desc="train features")
        f_val, kept_val, skip_val = extractor.extract(val_paths, 0, desc="validation features")
        feature_seconds = time.perf_counter() - t0
        skipped = data.skipped + skip_train + skip_val
        y_train = data.labels[train_idx][kept_train]
        y_val = data.labels[val_idx][kept_val]
        if len(np.unique(y_train)) < len(data.class_names):
            missing = sorted(set(range(len(data.class_names))) - set(y_train.tolist()))
            raise TransferkitError(f"{data_dir}: class '{data.class_names[missing[0]]}' has no readable training image")
        if len(y_val) == 0:
            raise TransferkitError(f"{data_dir}: no readable validation image")
        x_train, y_train_views = _flatten_views(f_train, y_train)
        x_val = f_val[:, 0]

        keras.utils.set_random_seed(seed)
        head_model = build_head(head, x_train.shape[1:], len(data.class_names), dropout=dropout)
        keeper = KeepBestEpoch(MONITOR, "val_loss", patience)
        t0 = time.perf_counter()
        fit = _fit_head(head_model, x_train, y_train_views, x_val, y_val, epochs=epochs, batch_size=batch_size,
                        learning_rate=learning_rate, class_weight=weights_by_class, seed=seed,
                        callbacks=[keeper] + ([ProgressLine()] if verbose else []))
        head_seconds = time.perf_counter() - t0
        history = {k: [float(x) for x in v] for k, v in fit.history.items()}
        best_epoch = keeper.best_epoch
        val_metrics = compute_metrics(y_val, run_model(head_model, x_val), data.class_names,
                                      [val_paths[i] for i in kept_val], skipped)
        model = modelfile.assemble(extractor.model, head_model)
        metadata = _metadata(data, data_dir, backbone, weights, size, {
            "val_split": val_split, "seed": seed, "epochs": epochs, "batch_size": batch_size,
            "augment_views": augment_views, "class_weight": class_weight or "none", "head": head,
            "learning_rate": learning_rate, "patience": patience, "dropout": dropout, "best_epoch": best_epoch,
            "feature_runtime": extractor.engine.label if extractor.engine else extractor.runtime,
            "epochs_run": len(history["loss"]), "n_train": int(len(y_train)), "n_val": int(len(y_val))})
        metadata["validation"] = {"accuracy": val_metrics["accuracy"], "macro_f1": val_metrics["macro_f1"]}
        result = {"model_path": model_path, "validation": val_metrics, "best_epoch": best_epoch,
                  "timing": {"feature_seconds": round(feature_seconds, 2), "head_seconds": round(head_seconds, 2)},
                  "skipped": skipped}
        modelfile.save(model, model_path, metadata)  # the head-only model is safe on disk before any fine-tuning
        write_json_atomic(os.path.join(out, "history.json"), {"history": history, "best_epoch": best_epoch,
                                                              "monitor": MONITOR})
        write_json_atomic(os.path.join(out, "metrics.json"), result)

    fine_tuned = None
    if fine_tune_epochs:
        t0 = time.perf_counter()
        train_images, kept_t = finetune.decode_all(train_paths, size)
        val_images, kept_v = finetune.decode_all(val_paths, size)
        y_train_img, y_val_img = data.labels[train_idx][kept_t], data.labels[val_idx][kept_v]
        initial = (result["validation"]["accuracy"], -float(_val_loss(model, val_images, y_val_img)))

        def save_checkpoint(stage: dict):
            metadata["fine_tune"] = {k: stage[k] for k in ("epochs", "unfreeze_top", "learning_rate", "blocks")}
            modelfile.save(model, model_path, metadata)

        fine_tuned = finetune.fine_tune(
            model, spec, train_images, y_train_img, val_images, y_val_img, save=save_checkpoint, out=out,
            epochs=fine_tune_epochs, unfreeze_top=unfreeze_top, learning_rate=fine_tune_lr, batch_size=batch_size,
            seed=seed, class_weights=weights_by_class, initial_key=initial, patience=patience, state=state,
            callbacks=callbacks, verbose=verbose)
        val_probs = run_model(model, val_images)
        result["validation"] = compute_metrics(y_val_img, val_probs, data.class_names,
                                               [val_paths[i] for i in kept_v], result.get("skipped"))
        metadata["validation"] = {"accuracy": result["validation"]["accuracy"],
                                  "macro_f1": result["validation"]["macro_f1"]}
        metadata["fine_tune"] = {k: fine_tuned[k] for k in ("epochs", "unfreeze_top", "learning_rate", "blocks",
                                                              "best_epoch")}
        result["fine_tune"] = {k: fine_tuned[k] for k in ("epochs", "unfreeze_top", "learning_rate", "blocks",
                                                            "best_epoch", "history")}
        result.setdefault("timing", {})["fine_tune_seconds"] = round(time.perf_counter() - t0, 2)

    test_metrics = None
    if test_dir:
        if fine_tuned is None:  # the backbone is untouched: the cached features are the model's own
            test = scan_folder(test_dir, class_names=data.class_names)
            f_test, kept_test, skip_test = extractor.extract(test.paths, 0, desc="test features")
            test_metrics = compute_metrics(test.labels[kept_test], run_model(head_model, f_test[:, 0]),
                                           data.class_names, [test.paths[i] for i in kept_test],
                                           test.skipped + skip_test)
        else:
            from transferkit.evaluation import evaluate

            test_metrics = evaluate(modelfile.LoadedModel(model, data.class_names, size, metadata), test_dir)
        metadata["test"] = {"accuracy": test_metrics["accuracy"], "macro_f1": test_metrics["macro_f1"]}
        result["test"] = test_metrics
        say(text_report(test_metrics))

    modelfile.save(model, model_path, metadata)
    boundary = None
    if fine_tuned:
        boundary = len(history["loss"])
        combined = {k: history[k] + fine_tuned["history"].get(k, []) for k in history}
        if fine_tuned["best_epoch"]:
            best_epoch = boundary + fine_tuned["best_epoch"]
        history_png = plot_history(combined, os.path.join(out, "history.png"), best_epoch, stage_boundary=boundary)
        write_json_atomic(os.path.join(out, "history.json"),
                          {"history": history, "fine_tune_history": fine_tuned["history"], "best_epoch": best_epoch,
                           "head_best_epoch": result["best_epoch"], "monitor": MONITOR})
    else:
        history_png = plot_history(history, os.path.join(out, "history.png"), best_epoch)
    if test_metrics:
        result["report"] = write_report(test_metrics, out, title=f"Test report: {os.path.basename(os.path.abspath(out))}",
                                        history_png=history_png, model_info=model_summary(metadata))
    result.setdefault("timing", {})["total_seconds"] = round(time.perf_counter() - started, 2)
    write_json_atomic(os.path.join(out, "metrics.json"), result)
    say(f"val_accuracy {result['validation']['accuracy']:.4f}; model written to {model_path} "
        f"({result['timing']['total_seconds']:.1f} s)")
    return result


def _val_loss(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of ``model`` on a validation set (the tie-breaker of the kept epoch)."""
    probs = np.clip(run_model(model, images), 1e-7, 1.0)
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))
