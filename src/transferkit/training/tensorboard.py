"""``--log-dir DIR``: the training curves for TensorBoard, with the names and layout of Keras's own ``TensorBoard``
callback so they read as any Keras run's do (``tensorboard --logdir DIR``).

    DIR/head/train, DIR/head/validation            the softmax head's epochs: epoch_loss, epoch_accuracy,
                                                   epoch_learning_rate (train only, as Keras logs it); written
                                                   here for the scikit-learn-fitted softmax head (training.head),
                                                   by Keras's callback for the flatten head
    DIR/fine_tune/train, DIR/fine_tune/validation  the second stage's epochs (a resumed stage continues the steps)
    DIR/head_choice                                every head candidate's validation accuracy and loss, the chosen
                                                   one's, and the table (text)

One step per epoch. ``--head auto`` also fits scikit-learn logistic heads, which have no epochs: they appear only
in ``head_choice`` (a single point each), beside the softmax candidate whose curves are in ``head``. A
refitted head (``--refit``) is not logged. Nor is the graph (``write_graph=False``: Keras 3 documents it as not
supported, and the fine-tuning graph would be the whole backbone's). ``TensorBoardLogs`` is the stage plug-in
(``training.events``) that writes all of it: the head's curves and the table at the end of the head stage, the
second stage's through Keras's callback. Cost: the tests' tiny run (12 photos, 4 head
epochs) took 9.9 s in its head stage with ``--log-dir``, 9.4 s without (one run each, on 2 busy cores).
"""

from __future__ import annotations

import importlib.util
import os

import keras

from transferkit.errors import TransferkitError
from transferkit.training.events import StageCallback

HEAD, FINE_TUNE, CHOICE = "head", "fine_tune", "head_choice"


def check_available() -> None:
    """TensorFlow writes the event files; the ``tensorboard`` package (an extra) provides the summary API."""
    if importlib.util.find_spec("tensorboard") is None:
        raise TransferkitError("--log-dir needs the tensorboard package: pip install 'transferkit[tensorboard]' "
                               "(or pip install tensorboard)")


class EpochBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard callback, per epoch, its steps starting at ``first_epoch`` (a resumed stage
    continues where the interrupted one stopped)."""

    def __init__(self, log_dir: str, first_epoch: int = 0):
        super().__init__(log_dir=log_dir, write_graph=False, update_freq="epoch")
        self.first_epoch = int(first_epoch)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(self.first_epoch + epoch, logs)


def write_epochs(log_dir: str, history: dict, learning_rate: float) -> None:
    """A head's per-epoch ``history`` (loss, accuracy, val_loss, val_accuracy) as Keras's callback writes it,
    into ``DIR/head/train`` and ``DIR/head/validation``."""
    import tensorflow as tf

    for split, prefix in (("train", ""), ("validation", "val_")):
        writer = tf.summary.create_file_writer(os.path.join(log_dir, HEAD, split))
        with writer.as_default():
            for step in range(len(history["loss"])):
                for name in ("loss", "accuracy"):
                    tf.summary.scalar(f"epoch_{name}", history[prefix + name][step], step=step)
                if not prefix:
                    tf.summary.scalar("epoch_learning_rate", learning_rate, step=step)
        writer.close()


def fine_tune_callback(log_dir: str, epochs_done: int = 0) -> EpochBoard:
    return EpochBoard(os.path.join(log_dir, FINE_TUNE), epochs_done)


def write_candidates(log_dir: str, found: list, chosen) -> str:
    """``head_choice``: per candidate ``candidates/<name>/val_accuracy`` and ``/val_loss`` (step 0), the chosen
    one's as ``chosen/val_accuracy``, and the table as text; returns the folder."""
    import tensorflow as tf

    from transferkit.training.select import table

    folder = os.path.join(log_dir, CHOICE)
    writer = tf.summary.create_file_writer(folder)
    with writer.as_default():
        for c in found:
            name = c.name.replace(" ", "_").replace("+", "")
            tf.summary.scalar(f"candidates/{name}/val_accuracy", c.val_accuracy, step=0)
            tf.summary.scalar(f"candidates/{name}/val_loss", c.val_loss, step=0)
        tf.summary.scalar("chosen/val_accuracy", chosen.val_accuracy, step=0)
        rows = table(found, chosen).splitlines()
        tf.summary.text("head_choice", "\n".join(f"    {line}" for line in rows), step=0)  # markdown: code
    writer.close()
    return folder


class TensorBoardLogs(StageCallback):
    """``--log-dir DIR`` as a stage plug-in: after the head stage, the curves of the candidate fitted in epochs
    (the softmax or flatten head; the logistic ones have none) and the candidates' table; during fine-tuning,
    Keras's callback, its steps continuing a resumed stage's."""

    def __init__(self, log_dir: str):
        check_available()
        self.log_dir = str(log_dir)

    def on_stage_end(self, stage: str, state) -> None:
        if stage != "head" or not state.candidates:
            return
        epochs = [c for c in state.candidates if c.head != "logistic" and c.history]
        if epochs:
            write_epochs(self.log_dir, epochs[0].history, state.options.learning_rate)
        write_candidates(self.log_dir, state.candidates, state.chosen)

    def keras_callbacks(self, stage: str, state, first_epoch: int = 0) -> list:
        return [fine_tune_callback(self.log_dir, first_epoch)] if stage == "fine_tune" else []
