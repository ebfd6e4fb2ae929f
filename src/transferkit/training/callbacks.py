"""Training callbacks: keep the best epoch (with a loud failure on a missing metric) and a one-line progress."""

from __future__ import annotations

import keras

from transferkit.errors import TransferkitError
from transferkit.log import logger

MONITOR = "val_accuracy"


class KeepBestEpoch(keras.callbacks.Callback):
    """Keep the weights of the best epoch by ``val_accuracy`` (ties broken by the lower ``val_loss``), stop after
    ``patience`` epochs without a better one, and restore the best weights at the end. Fails at the first epoch
    if the metric is absent, instead of silently never keeping a best epoch (the 'val_acc' trap)."""

    def __init__(self, monitor: str = MONITOR, tie_break: str = "val_loss", patience: int = 8,
                 initial: tuple | None = None):
        """``initial`` = (key, weights) of an earlier stage: an epoch must beat it to be kept, so a later stage
        never lowers the kept score."""
        super().__init__()
        self.monitor, self.tie_break, self.patience = monitor, tie_break, patience
        self.best_epoch, self.best_key, self.best_weights, self.wait = None, None, None, 0
        self.improved = False
        if initial is not None:
            self.best_key, self.best_weights = tuple(initial[0]), initial[1]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for name in (self.monitor, self.tie_break):
            if name not in logs:
                raise TransferkitError(f"metric '{name}' not in training logs {sorted(logs)}")
        key = (float(logs[self.monitor]), -float(logs[self.tie_break]))
        self.improved = self.best_key is None or key > self.best_key
        if self.improved:
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
    """One log line per epoch (Keras's own bar is per batch, noisy on cached features)."""

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if k in ("loss", "accuracy", "val_loss", "val_accuracy"))
        logger.info(f"epoch {epoch + 1}: {parts}")
