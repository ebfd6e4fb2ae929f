"""The task interface (see ``transferkit.tasks``). Each method is one decision that differs between tasks; this
module imports nothing heavy, so a predictor can read a model's answers without Keras or SciPy."""

from __future__ import annotations

import numpy as np


class Task:
    """What a classifier's outputs mean. Subclasses set ``name`` and ``loss`` and implement the methods."""

    name: str = ""
    loss: str = ""  # the Keras loss of the head's fit and of fine-tuning
    activation: str = ""  # the output layer's activation
    multi_label: bool = False  # labels are an indicator matrix (photos x labels), not class indices

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Task":
        """The task of a model file, with what it fitted (``record``'s ``task_params``)."""
        return cls()

    def record(self, class_names: list[str]) -> dict | None:
        """What the task fitted, stored as the model file's ``task_params`` (None: nothing)."""
        return None

    def fit_decision(self, probs: np.ndarray, y: np.ndarray) -> None:
        """Fit how probabilities become answers, on validation (single-label: the argmax, nothing to fit)."""

    def sample_weights(self, class_weights, y: np.ndarray) -> np.ndarray:
        """Per-row weights of a fit (fine-tuning, the epoch-fitted head) from ``class_weights``."""
        raise NotImplementedError

    def fit_trust(self, head, train: tuple, val: tuple, n_classes: int, keep_known: float, groups=None,
                  novelty_dim: int | None = None) -> dict:
        """The calibration and novelty statistics of a trusted head, in place; returns metadata["novelty"]."""
        raise NotImplementedError

    def audit(self, x: np.ndarray, y: np.ndarray, paths: list[str], class_names: list[str]):
        """The label audit on cached features (``training.audit``)."""
        raise NotImplementedError

    def fine_tune_key(self, validation: dict, probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(accuracy, - loss) the second stage must beat, as Keras monitors it."""
        raise NotImplementedError

    def calibration_cells(self, probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, labels) that the calibration error is measured on."""
        return probs, y

    # ----- training -----
    def build_head(self, kind: str, feature_shape: tuple, n_classes: int, dropout: float = 0.2,
                   keep: int | None = None):
        """The Keras head of ``kind`` on features of ``feature_shape``, ending in this task's output layer."""
        raise NotImplementedError

    def fit_linear(self, x: np.ndarray, y: np.ndarray, keep: int, n_classes: int, class_weight: dict | None,
                   seed: int, n_features: int) -> tuple:
        """The linear head on cached features: (features -> probabilities in NumPy, () -> the Keras head)."""
        raise NotImplementedError

    def score(self, probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(accuracy, loss) of ``probs`` against ``y``: what a head candidate and an epoch are chosen by."""
        raise NotImplementedError

    def class_weights(self, kind: str, y: np.ndarray, n_classes: int) -> dict | None:
        raise NotImplementedError

    def calibrate(self, logits: np.ndarray, y: np.ndarray) -> float:
        """The calibration parameter fitted on held-out ``logits`` (a temperature)."""
        raise NotImplementedError

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ----- answers -----
    def decide(self, paths: list[str], outputs: np.ndarray, class_names: list[str], top_k: int,
               novelty: dict | None = None, reject: bool = True, *, conformal: dict | None = None,
               coverage: float | None = None, max_error: float | None = None) -> list[dict]:
        """One result row per image from the model's outputs (with ``coverage`` / ``max_error``: the
        guarantees of ``conformal`` = metadata["conformal"], rows' ``set`` / ``abstain``)."""
        raise NotImplementedError

    # ----- evaluation -----
    def metrics(self, y_true: np.ndarray, probs: np.ndarray, class_names: list[str], paths: list[str] | None = None,
                skipped: list[dict] | None = None) -> dict:
        raise NotImplementedError

    def text_report(self, metrics: dict) -> str:
        raise NotImplementedError

    def report_parts(self, metrics: dict, out: str) -> dict:
        """The report's task-specific parts: ``cards`` (HTML), ``tables`` (HTML), ``figures`` [(title, png)]."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
