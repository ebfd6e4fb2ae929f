"""The task interface (see ``transferkit.tasks``). Each method is one decision that differs between tasks; this
module imports nothing heavy, so a predictor can read a model's answers without Keras or SciPy."""

from __future__ import annotations

import numpy as np


class Task:
    """What a classifier's outputs mean. Subclasses set ``name`` and ``loss`` and implement the methods."""

    name: str = ""
    loss: str = ""  # the Keras loss of the head's fit and of fine-tuning
    activation: str = ""  # the output layer's activation

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
