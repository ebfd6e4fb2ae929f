"""Second stage: unfreeze the top blocks of the backbone and train end to end on images, at a low learning rate.

BatchNorm layers stay frozen (inference mode: their statistics never move). The best epoch by validation accuracy
is kept, and an epoch must beat the head-only model to count, so fine-tuning never lowers the kept score. Each
better epoch is written to the model file at once (atomically) with a small state file beside it, so Ctrl-C or a
kill leaves the best model so far intact and ``resume`` continues from there.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import keras
import numpy as np

from transferkit.training import augment
from transferkit.models.backbones import BackboneSpec, backbone_blocks, find_backbone
from transferkit.training.callbacks import MONITOR, KeepBestEpoch, ProgressLine
from transferkit.errors import OptionError, TransferkitError
from transferkit.files import write_json_atomic
from transferkit.data.images import decode_batch
from transferkit.log import logger, show_progress

STATE_NAME = "finetune_state.json"


def unfreeze_top_blocks(model: keras.Model, spec: BackboneSpec, k: int) -> list[str]:
    """Make the top ``k`` backbone blocks trainable (the rest, and every BatchNorm, stay frozen); their names."""
    backbone = find_backbone(model)
    blocks = [b for b in backbone_blocks(backbone, spec) if b[0] != "input"]
    if not 1 <= k <= len(blocks):
        raise OptionError("unfreeze_top", f"must be between 1 and {len(blocks)} for {spec.name}", k)
    chosen = blocks[-k:]
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = False
    for _, layers in chosen:
        for layer in layers:
            layer.trainable = True
    for layer in backbone._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return [name for name, _ in chosen]


class AugmentedImages(keras.utils.PyDataset):
    """Decoded training images, reshuffled and freshly augmented (flip, rotation, zoom) every epoch, with
    per-image sample weights. Augmentation lives here, never in the saved model."""

    def __init__(self, images, labels, sample_weights, batch_size: int, seed: int, first_epoch: int = 0):
        super().__init__()
        self.images, self.labels, self.sample_weights = images, labels, sample_weights
        self.batch_size, self.seed, self.epoch = batch_size, seed, first_epoch
        self._shuffle()

    def _shuffle(self):
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images))

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)

    def __getitem__(self, i):
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        keys = [f"finetune:{self.seed}:{self.epoch}:{j}" for j in idx]
        return augment.augment_batch(self.images[idx], keys, view=1), self.labels[idx], self.sample_weights[idx]

    def on_epoch_end(self):
        self.epoch += 1
        self._shuffle()


class Checkpoint(keras.callbacks.Callback):
    """After each epoch: save the model when the keeper found a better epoch, and record progress, including in
    ``sessions`` the epochs each process ran (pid, first epoch, epochs run): what shows a resumed run continued."""

    def __init__(self, keeper: KeepBestEpoch, save, state_path: str, state: dict):
        super().__init__()
        self.keeper, self.save, self.state_path, self.state = keeper, save, state_path, state
        self.first = state["epochs_done"]
        self.session = {"pid": os.getpid(), "first_epoch": self.first + 1, "epochs_run": 0}
        state["sessions"] = [*state.get("sessions", []), self.session]

    def on_epoch_end(self, epoch, logs=None):
        if self.keeper.improved:  # the file then names this epoch as its best
            self.state.update(best_epoch=self.first + epoch + 1, best_key=list(self.keeper.best_key))
            self.save(self.state)
        self.state["epochs_done"] = self.first + epoch + 1
        self.session["epochs_run"] = epoch + 1
        self.state["history"] = {k: self.state["history"].get(k, []) + [float(v)] for k, v in (logs or {}).items()
                                 if k in ("loss", "accuracy", "val_loss", "val_accuracy")}
        write_json_atomic(self.state_path, self.state)


def read_state(out: str) -> dict | None:
    path = os.path.join(out, STATE_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise TransferkitError(f"{path}: unreadable fine-tuning state ({exc})") from None


def decode_all(paths: list[str], size: int) -> tuple[np.ndarray, list[int]]:
    """Decode every path (uint8 arrays in memory); the indices that decoded."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        arrays, _ = decode_batch(paths, size, pool)
    kept = [i for i, a in enumerate(arrays) if a is not None]
    shape = (0, size, size, 3)
    return (np.stack([arrays[i] for i in kept]) if kept else np.zeros(shape, np.uint8)), kept


@dataclass
class ImageSplit:
    """Decoded images (uint8, at the model's size) and labels of the training and validation split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def new_state(epochs: int, unfreeze_top: int, learning_rate: float, initial_key: tuple) -> dict:
    """The progress record of a fresh second stage (written beside the model after every epoch)."""
    return {"stage": "fine-tune", "epochs": epochs, "unfreeze_top": unfreeze_top, "learning_rate": learning_rate,
            "epochs_done": 0, "best_epoch": 0, "best_key": list(initial_key), "history": {}}


def fine_tune(model: keras.Model, spec: BackboneSpec, images: ImageSplit, state: dict, *, save, out: str,
              batch_size: int, seed: int, patience: int, sample_weights: np.ndarray | None = None, callbacks=(),
              loss: str = "sparse_categorical_crossentropy") -> dict:
    """Run the epochs of ``state`` not yet done on ``model`` in place (left holding the best weights), with the
    task's Keras ``loss`` and per-photo ``sample_weights`` (default: ones); returns the finished state. ``save(state)`` writes a checkpoint whenever an epoch is better than all before it."""
    state["blocks"] = unfreeze_top_blocks(model, spec, state["unfreeze_top"])
    remaining = state["epochs"] - state["epochs_done"]
    logger.info(f"fine-tuning blocks {', '.join(state['blocks'])}: epochs {state['epochs_done'] + 1}-"
                f"{state['epochs']} at learning rate {state['learning_rate']:g}")
    if remaining > 0:
        keras.utils.set_random_seed(seed + state["epochs_done"])
        model.compile(optimizer=keras.optimizers.Adam(state["learning_rate"]),
                      loss=loss, metrics=["accuracy"])
        weights = np.ones(len(images.y_train), np.float32) if sample_weights is None else sample_weights
        data = AugmentedImages(images.x_train, images.y_train, weights, batch_size, seed,
                               first_epoch=state["epochs_done"])
        keeper = KeepBestEpoch(MONITOR, "val_loss", patience, initial=(state["best_key"], model.get_weights()))
        cbs = [keeper, Checkpoint(keeper, save, os.path.join(out, STATE_NAME), state), ProgressLine(), *callbacks]
        model.fit(data, validation_data=(images.x_val.astype("float32"), images.y_val), batch_size=batch_size,
                  epochs=remaining, callbacks=cbs, verbose=1 if show_progress() else 0)
    state["status"] = "done"
    write_json_atomic(os.path.join(out, STATE_NAME), state)
    return state
