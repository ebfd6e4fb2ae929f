"""The head fit: a small classifier trained on cached backbone features, best epoch kept by validation accuracy.

The softmax head (``gap``: softmax on pooled features) is a multinomial logistic regression trained by Adam, so it
is fitted by scikit-learn's ``MLPClassifier`` without hidden layers, epoch by epoch (``partial_fit``), keeping the
best epoch by validation accuracy (ties: lower loss) with the same learning rate, batch size, epochs and patience
as Keras's ``fit`` had, then written into the Keras head's Dense layer. Keras spent its time tracing and on
per-epoch overhead, not on the arithmetic, and every ``train`` fits one. Measured on the cached Lite0 features of
benchmarks/datasets.py's four real-photo sets (test accuracy, fit seconds; 2 cores, AMX): photos 0.919 in 1.89 s
with Keras -> 0.925 in 0.18 s; textures 0.992 -> 0.992 (1.59 -> 0.14 s); faces 1.000 -> 1.000 (1.45 -> 0.10 s);
digits 0.892 -> 0.887 (2.13 -> 0.36 s; the standard error there is 0.012). Input dropout has no scikit-learn
counterpart: MLPClassifier's L2 penalty (``SOFTMAX_L2``, its default) is the only regulariser of this fit, and the
head keeps its Dropout layer for the second stage. (On synthetic Gaussian classes with far more dimensions than
samples, dropout did matter: 0.60 with it, 0.40 without, 0.475 here; on the real features above it did not.)
The seed's ``flatten-256-128`` head is still trained by Keras: a tf.data pipeline built once (seeded reshuffle
every epoch) and a whole epoch per compiled call (head time 4.1 s -> 2.4 s on 1,600 features).
"""

from __future__ import annotations

import keras
import numpy as np

from transferkit.log import logger
from transferkit.options import TrainOptions
from transferkit.tasks import Task, get_task
from transferkit.training.callbacks import MONITOR, KeepBestEpoch, ProgressLine


def flatten_views(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, views, ...) features and n labels (or an (n, labels) indicator matrix) -> (n * views, ...) samples and
    their labels."""
    n, v = features.shape[:2]
    return features.reshape((n * v,) + features.shape[2:]), np.repeat(labels, v, axis=0)


def fit_head(head_model: keras.Model, x_train, y_train, x_val, y_val, epochs: int, batch_size: int,
             learning_rate: float, class_weight: dict | None, seed: int, callbacks: list, loss: str | None = None):
    """Fit ``head_model`` on in-memory features with the task's Keras ``loss`` (default: single-label's);
    returns Keras's History."""
    import tensorflow as tf

    loss = loss or get_task().loss
    steps = -(-len(x_train) // batch_size)
    head_model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                       metrics=["accuracy"], steps_per_execution=steps)
    train_ds = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
                .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True).batch(batch_size).prefetch(2))
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(batch_size)
    return head_model.fit(train_ds, validation_data=val_ds, epochs=epochs, class_weight=class_weight,
                          shuffle=False, callbacks=callbacks, verbose=0)  # shuffled by the dataset


SOFTMAX_L2 = 1e-4  # MLPClassifier's alpha (its default): the weight decay of the softmax head's fit


def _dense_weights(model, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """An MLPClassifier without hidden layers as softmax Dense weights (features, classes), (classes,); a binary
    one has a single logistic output: sigmoid(z) = softmax([0, z])[1]."""
    coef, intercept = model.coefs_[0], model.intercepts_[0]
    if coef.shape[1] == 1 and n_classes == 2:
        coef, intercept = np.concatenate([np.zeros_like(coef), coef], 1), np.concatenate([[0.0], intercept])
    return coef.astype(np.float32), intercept.astype(np.float32)


def train_softmax(options: TrainOptions, x_train, y_train, x_val, y_val, n_classes: int, weights: dict | None,
                  keep: int | None = None, task: Task | None = None) -> tuple[keras.Model, dict, int]:
    """The ``gap`` head fitted by scikit-learn (see the module docstring): (Keras head with the best epoch's
    weights, history as plain lists, best epoch from 1), as ``train_head`` returns them."""
    from sklearn.neural_network import MLPClassifier

    keep, task = keep or x_train.shape[1], task or get_task()
    x, xv = np.asarray(x_train[:, :keep], np.float32), np.asarray(x_val[:, :keep], np.float32)
    model = MLPClassifier(hidden_layer_sizes=(), solver="adam", alpha=SOFTMAX_L2,
                          batch_size=min(options.batch_size, len(x)), learning_rate_init=options.learning_rate,
                          shuffle=True, random_state=options.seed)
    sample_weight = None if weights is None else task.sample_weights(weights, y_train).astype(np.float64)
    history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    best, wait = None, 0
    for epoch in range(options.epochs):
        model.partial_fit(x, y_train, sample_weight=sample_weight, classes=np.arange(n_classes))
        dense = _dense_weights(model, n_classes)
        for prefix, features, labels in (("", x, y_train), ("val_", xv, y_val)):
            accuracy, loss = task.score(task.probabilities(features @ dense[0] + dense[1]), labels)
            history[prefix + "loss"].append(loss)
            history[prefix + "accuracy"].append(accuracy)
        logger.info(f"epoch {epoch + 1}: " + " ".join(f"{k}={v[-1]:.4f}" for k, v in history.items()))
        score = (history["val_accuracy"][-1], -history["val_loss"][-1])
        if best is None or score > best[0]:
            best, wait = (score, epoch + 1, dense), 0
        else:
            wait += 1
            if wait >= options.patience:
                break
    head = task.build_head("gap", x_train.shape[1:], n_classes, dropout=options.dropout, keep=keep)
    head.get_layer("probabilities").set_weights(list(best[2]))
    return head, history, best[1]


def train_head(options: TrainOptions, x_train, y_train, x_val, y_val, n_classes: int,
               weights: dict | None, keep: int | None = None, task: Task | None = None) -> tuple[keras.Model, dict, int]:
    """Build and fit the head of ``options`` (seeded; ``keep``: on the first ``keep`` features) with the
    best-epoch keeper; returns (head with the best epoch's weights, history as plain lists, best epoch from 1)."""
    task = task or get_task()
    keras.utils.set_random_seed(options.seed)
    head = task.build_head(options.head, x_train.shape[1:], n_classes, dropout=options.dropout, keep=keep)
    keeper = KeepBestEpoch(MONITOR, "val_loss", options.patience)
    fit = fit_head(head, x_train, y_train, x_val, y_val, epochs=options.epochs, batch_size=options.batch_size,
                   learning_rate=options.learning_rate, class_weight=weights, seed=options.seed,
                   callbacks=[keeper, ProgressLine()], loss=task.loss)
    history = {k: [float(x) for x in v] for k, v in fit.history.items()}
    return head, history, keeper.best_epoch
