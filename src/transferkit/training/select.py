"""``--head auto``: heads compared on the validation split with the cached features, the best one kept.

Measured on held-out real photos far from ImageNet (issue quality; grey product photos, EfficientNet-Lite0):
the default softmax head on the final pooled features reached 0.852 test accuracy, an L2 logistic regression on
standardised features 0.860, and the same on the final features plus the pooled outputs of the last 4 blocks
0.882 (the Head2Toe result: intermediate representations transfer better when the domain is far from ImageNet).
Which wins depends on the data, and every candidate trains in a second or two on cached features, so they are all
fitted and scored on the validation split (accuracy, then log loss), and ``train`` prints the table it chose from.
The candidates: the old default (softmax on the final features, Adam epochs; training.head), and logistic regression
(scikit-learn) on {0, 2, 4 depths} x {with, without the augmented views}. ``benchmarks/quality.py`` measures the choice on the test folders of four real-photo sets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from transferkit.log import logger
from transferkit.options import TrainOptions
from transferkit.tasks import Task, get_task

DEPTH_CANDIDATES = (0, 2, 4)


@dataclass
class Candidate:
    """One head fitted on the training features and scored on the validation features."""

    head: str  # gap | logistic
    depths: int
    views: bool  # trained on the augmented views too (else on the images alone)
    val_accuracy: float = 0.0
    val_loss: float = 0.0
    seconds: float = 0.0
    predict: object = field(default=None, repr=False)  # features -> probabilities, in NumPy or Keras
    build: object = field(default=None, repr=False)  # () -> the Keras head (only the chosen one is built)
    history: dict | None = field(default=None, repr=False)
    best_epoch: int | None = None
    _model: object = field(default=None, repr=False)

    @property
    def model(self):
        """The Keras head (features -> probabilities), built at the first ask."""
        if self._model is None:
            self._model = self.build()
        return self._model

    @property
    def name(self) -> str:
        return f"{self.head} d{self.depths}" + (" +views" if self.views else "")

    def row(self) -> dict:
        return {"head": self.head, "depths": self.depths, "views": self.views, "val_accuracy": self.val_accuracy,
                "val_loss": round(self.val_loss, 4), "seconds": round(self.seconds, 2)}


def _one_point_history(predict, data: tuple, rows: slice, task: Task) -> dict:
    """A fitted (not iterated) head's curves: one point each, so history.json and the plots read as for Keras's."""
    x_train, y_train, x_val, y_val, _ = data
    history = {}
    for prefix, x, y in (("", x_train[rows], y_train[rows]), ("val_", x_val, y_val)):
        accuracy, loss = task.score(predict(x), y)
        history[prefix + "loss"], history[prefix + "accuracy"] = [loss], [accuracy]
    return history


def fit_candidate(candidate: Candidate, options: TrainOptions, data: tuple, dims: list[int], n_classes: int,
                  class_weight: dict | None, task: Task | None = None) -> Candidate:
    """Fit ``candidate`` on the training rows (all views, or the images alone) for ``task`` (default: single
    label) and score it on validation. On one BLAS thread, where the logistic regression fits in half the time
    (see ``ImageClassifier.fit_head``)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _fit_candidate(candidate, options, data, dims, n_classes, class_weight, task or get_task())


def _fit_candidate(candidate: Candidate, options: TrainOptions, data: tuple, dims: list[int], n_classes: int,
                   class_weight: dict | None, task: Task) -> Candidate:
    x_train, y_train, x_val, y_val, views = data
    rows = slice(None) if candidate.views else slice(None, None, views)
    keep = dims[candidate.depths]
    start = time.perf_counter()
    if candidate.head == "logistic":
        candidate.predict, candidate.build = task.fit_linear(x_train[rows], y_train[rows], keep, n_classes,
                                                             class_weight, options.seed, x_train.shape[1])
        candidate.history, candidate.best_epoch = _one_point_history(candidate.predict, data, rows, task), 1
    elif candidate.head == "gap":  # the task's output layer on pooled features, fitted epoch by epoch
        head, candidate.history, candidate.best_epoch = task.fit_epochs(
            options, x_train[rows], y_train[rows], x_val, y_val, n_classes, class_weight, keep=keep)
        kernel, bias = head.get_layer("probabilities").get_weights()
        candidate._model = head
        candidate.predict = lambda x: task.probabilities(x[:, :keep] @ kernel + bias)
    else:
        from transferkit.engines.keras_step import run_model
        from transferkit.training.head import train_head

        head, candidate.history, candidate.best_epoch = train_head(
            options, x_train[rows], y_train[rows], x_val, y_val, n_classes, class_weight, keep=keep, task=task)
        candidate._model, candidate.predict = head, lambda x: run_model(head, x)
    candidate.seconds = time.perf_counter() - start
    candidate.val_accuracy, candidate.val_loss = task.score(candidate.predict(x_val), y_val)
    return candidate


def candidates(options: TrainOptions, n_depths: int) -> list[Candidate]:
    """What ``--head auto`` compares: the old default first (softmax on the final features, with the views), then
    logistic regression on each depth set, with and without the views (the softmax head is not repeated on every
    depth set: it is the old default, kept as it was)."""
    depths = sorted({d for d in DEPTH_CANDIDATES if d <= n_depths} | {n_depths})
    view_choices = (True, False) if options.augment_views else (True,)
    return [Candidate("gap", 0, True)] + [Candidate("logistic", d, v) for v in view_choices for d in depths]


def choose(found: list[Candidate]) -> Candidate:
    """The best validation accuracy; on a tie the old default (the first candidate), else the lowest validation
    log loss. A saturated validation split (every candidate right on every photo) cannot tell the heads apart,
    and a lower log loss there favours the sharpest fit, not the one that generalises: on the photo set of
    benchmarks/quality.py (validation 100 % for all, test from the other half of each photograph) the old default
    kept 0.919 test accuracy where the lowest-loss candidate had 0.900."""
    return max(enumerate(found), key=lambda item: (item[1].val_accuracy, item[0] == 0,
                                                    -round(item[1].val_loss, 4), -item[0]))[1]


def table(found: list[Candidate], chosen: Candidate) -> str:
    lines = [f"{'head':<22} {'val acc':>8} {'val loss':>9} {'fit s':>6}"]
    for c in found:
        mark = "  <- chosen" if c is chosen else ""
        lines.append(f"{c.name:<22} {c.val_accuracy:>8.4f} {c.val_loss:>9.4f} {c.seconds:>6.1f}{mark}")
    return "\n".join(lines)


def select_head(options: TrainOptions, data: tuple, dims: list[int], n_classes: int,
                class_weight: dict | None, task: Task | None = None) -> tuple[Candidate, list[Candidate]]:
    """Fit every candidate and keep the best on validation; logs the table."""
    found = [fit_candidate(c, options, data, dims, n_classes, class_weight, task)
             for c in candidates(options, len(dims) - 1)]
    chosen = choose(found)
    logger.info("head chosen on the validation split (--head auto):\n" + table(found, chosen))
    return chosen, found


FOLD_HEADS = ("logistic", "gap")  # heads fitted on cached features in about a second: refitted per fold


def held_out_logits(chosen: Candidate, options: TrainOptions, data: tuple, dims: list[int], n_classes: int,
                    class_weight: dict | None, task: Task, folds: int = 5) -> tuple | None:
    """(logits, labels) of photos the chosen head never saw, for its temperature: each training image (its
    original view) predicted by ``chosen`` fitted again on the other folds (grouped by image, so its augmented
    views share its fold), then the validation images by ``chosen`` itself. With 24 validation photos alone a
    fitted T of 3.08 raised ECE 0.160 -> 0.184 (issue 30); a 180-photo set gives 5x the rows this way. None for
    a head fitted by Keras epochs (five more fits would be minutes): the temperature then uses validation."""
    import numpy as np
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    if chosen.head not in FOLD_HEADS:
        return None
    x_train, y_train, x_val, y_val, views = data
    groups = np.arange(len(y_train)) // views
    counts = np.bincount(y_train[::views], minlength=n_classes) if not task.multi_label else None
    k = int(min(folds, len(np.unique(groups)), counts.min() if counts is not None else folds))
    if k < 2:
        return None
    splitter = GroupKFold(k) if task.multi_label else StratifiedGroupKFold(k, shuffle=True, random_state=0)
    logits, labels = [], []
    for fit_rows, held in splitter.split(x_train, None if task.multi_label else y_train, groups):
        one = Candidate(chosen.head, chosen.depths, chosen.views)
        _fit_candidate(one, options, (x_train[fit_rows], y_train[fit_rows], x_val, y_val, views), dims,
                       n_classes, class_weight, task)
        held = held[held % views == 0]  # the photos themselves, not their augmented views
        logits.append(task.logits(one.predict(x_train[held])))
        labels.append(y_train[held])
    logits.append(task.logits(chosen.predict(x_val)))
    labels.append(y_val)
    return np.concatenate(logits), np.concatenate(labels)
