"""Train a classifier from a folder of photos: cached frozen-backbone features, a small head, the best epoch by
validation accuracy, and one self-contained model file with its history, plot and metrics beside it."""

from __future__ import annotations

import datetime
import os
import sys
import time

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from transferkit import modelfile
from transferkit._version import __version__
from transferkit.backbones import DEFAULT_BACKBONE, get_spec
from transferkit.dataset import check_trainable, scan_folder, stratified_split
from transferkit.errors import TransferkitError
from transferkit.features import FeatureExtractor
from transferkit.files import write_json_atomic
from transferkit.inference import run_model
from transferkit.heads import build_head, head_pooling
from transferkit.metrics import compute_metrics, text_report
from transferkit.plots import plot_history
from transferkit.report import model_summary, write_report

MONITOR = "val_accuracy"


class KeepBestEpoch(keras.callbacks.Callback):
    """Keep the weights of the best epoch by ``val_accuracy`` (ties broken by the lower ``val_loss``), stop after
    ``patience`` epochs without a better one, and restore the best weights at the end. Fails at the first epoch
    if the metric is absent, instead of silently never keeping a best epoch (the 'val_acc' trap)."""

    def __init__(self, monitor: str = MONITOR, tie_break: str = "val_loss", patience: int = 8):
        super().__init__()
        self.monitor, self.tie_break, self.patience = monitor, tie_break, patience
        self.best_epoch, self.best_key, self.best_weights, self.wait = None, None, None, 0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for name in (self.monitor, self.tie_break):
            if name not in logs:
                raise TransferkitError(f"metric '{name}' not in training logs {sorted(logs)}")
        key = (float(logs[self.monitor]), -float(logs[self.tie_break]))
        if self.best_key is None or key > self.best_key:
            self.best_epoch, self.best_key, self.wait = epoch + 1, key, 0
            self.best_weights = self.model.get_weights()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


class ProgressLine(keras.callbacks.Callback):
    """One line per epoch on stderr (Keras's own bar is per batch, noisy on cached features)."""

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if k in ("loss", "accuracy", "val_loss", "val_accuracy"))
        print(f"epoch {epoch + 1}: {parts}", file=sys.stderr, flush=True)


def _flatten_views(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, v = features.shape[:2]
    return features.reshape((n * v,) + features.shape[2:]), np.repeat(labels, v)


def train(data_dir: str, test_dir: str | None = None, backbone: str = DEFAULT_BACKBONE, image_size: int | None = None,
          epochs: int = 30, val_split: float = 0.2, seed: int = 42, batch_size: int = 32, augment_views: int = 4,
          class_weight: str | None = "balanced", head: str = "gap", out: str | None = None, weights="imagenet",
          learning_rate: float = 1e-3, patience: int = 8, dropout: float = 0.2, cache: bool = True,
          verbose: bool = True) -> dict:
    """Train and write ``out/model.keras``, ``history.json``, ``history.png``, ``metrics.json`` (+ test metrics and
    ``report.html`` with its confusion matrices when ``test_dir`` is given). Returns the metrics dict (with ``model_path``)."""
    started = time.perf_counter()
    if epochs < 1:
        raise TransferkitError("--epochs must be at least 1")
    if augment_views < 0:
        raise TransferkitError("--augment-views must be 0 or more")
    if class_weight not in (None, "none", "balanced"):
        raise TransferkitError(f"--class-weight must be 'balanced' or 'none', got '{class_weight}'")
    spec = get_spec(backbone)
    size = int(image_size or spec.default_size)
    out = str(out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(seed)

    data = scan_folder(data_dir)
    check_trainable(data)
    train_idx, val_idx = stratified_split(data.labels, val_split, seed)
    pooling = head_pooling(head)
    extractor = FeatureExtractor(backbone, size, weights=weights, pooling=pooling, batch_size=batch_size,
                                 cache=cache, verbose=verbose)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
    say(f"{len(data.paths)} images in {len(data.class_names)} classes ({len(data.skipped)} skipped); "
        f"backbone {backbone} at {size}px; {len(train_idx)} train x {augment_views + 1} views, {len(val_idx)} validation")

    train_paths = [data.paths[i] for i in train_idx]
    val_paths = [data.paths[i] for i in val_idx]
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

    weights_by_class = None
    if class_weight == "balanced":
        values = compute_class_weight("balanced", classes=np.arange(len(data.class_names)), y=y_train)
        weights_by_class = {i: float(w) for i, w in enumerate(values)}

    keras.utils.set_random_seed(seed)
    head_model = build_head(head, x_train.shape[1:], len(data.class_names), dropout=dropout)
    head_model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                       metrics=["accuracy"])
    keeper = KeepBestEpoch(MONITOR, "val_loss", patience)
    callbacks = [keeper]
    if verbose:
        callbacks.append(ProgressLine())
    t0 = time.perf_counter()
    fit = head_model.fit(x_train, y_train_views, validation_data=(x_val, y_val), epochs=epochs, batch_size=batch_size,
                         class_weight=weights_by_class, shuffle=True, callbacks=callbacks, verbose=0)
    head_seconds = time.perf_counter() - t0
    history = {k: [float(x) for x in v] for k, v in fit.history.items()}
    best_epoch = keeper.best_epoch

    val_probs = run_model(head_model, x_val)
    val_metrics = compute_metrics(y_val, val_probs, data.class_names, [val_paths[i] for i in kept_val], skipped)

    model = modelfile.assemble(extractor.model, head_model)
    metadata = {
        "format": "transferkit-model/1",
        "transferkit_version": __version__,
        "keras_version": keras.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "class_names": data.class_names,
        "backbone": backbone,
        "weights": weights if weights in (None, "imagenet") else os.path.basename(str(weights)),
        "image_size": size,
        "input": "RGB 0-255, any size (resized inside the model)",
        "training": {
            "data_dir": os.path.abspath(data_dir), "val_split": val_split, "seed": seed, "epochs": epochs,
            "batch_size": batch_size, "augment_views": augment_views, "class_weight": class_weight or "none",
            "head": head, "learning_rate": learning_rate, "patience": patience, "dropout": dropout,
            "best_epoch": best_epoch, "epochs_run": len(history["loss"]),
            "n_train": int(len(y_train)), "n_val": int(len(y_val)),
        },
        "validation": {"accuracy": val_metrics["accuracy"], "macro_f1": val_metrics["macro_f1"]},
    }
    result = {"model_path": os.path.join(out, "model.keras"), "validation": val_metrics, "best_epoch": best_epoch,
              "timing": {"feature_seconds": round(feature_seconds, 2), "head_seconds": round(head_seconds, 2)},
              "skipped": skipped}

    test_metrics = None
    if test_dir:
        test = scan_folder(test_dir, class_names=data.class_names)
        f_test, kept_test, skip_test = extractor.extract(test.paths, 0, desc="test features")
        test_probs = run_model(head_model, f_test[:, 0])
        test_metrics = compute_metrics(test.labels[kept_test], test_probs, data.class_names,
                                       [test.paths[i] for i in kept_test], test.skipped + skip_test)
        metadata["test"] = {"accuracy": test_metrics["accuracy"], "macro_f1": test_metrics["macro_f1"]}
        result["test"] = test_metrics
        say(text_report(test_metrics))

    modelfile.save(model, result["model_path"], metadata)
    write_json_atomic(os.path.join(out, "history.json"), {"history": history, "best_epoch": best_epoch, "monitor": MONITOR})
    history_png = plot_history(history, os.path.join(out, "history.png"), best_epoch)
    if test_metrics:
        result["report"] = write_report(test_metrics, out, title=f"Test report: {os.path.basename(os.path.abspath(out))}",
                                        history_png=history_png, model_info=model_summary(metadata))
    result["timing"]["total_seconds"] = round(time.perf_counter() - started, 2)
    write_json_atomic(os.path.join(out, "metrics.json"), result)
    say(f"kept epoch {best_epoch} of {len(history['loss'])}: val_accuracy {val_metrics['accuracy']:.4f}; "
        f"model written to {result['model_path']} ({result['timing']['total_seconds']:.1f} s)")
    return result
