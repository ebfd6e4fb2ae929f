"""The drift reference stored in a model file (``metadata["reference"]``): a bounded summary of how the model
answered its own validation photos, what ``transferkit monitor`` compares a served window with. 101 quantiles of
the top-1 probability and of the novelty, the class mix of the answers and the unknown rate: about 2.5 kB of JSON
whatever the validation set's size. A multi-label model adds ``label_rates``: the share of validation photos
each label is given to (over its threshold, an unknown photo given none, as the server answers), what monitor
compares a window's per-label answer rates with.
"""

from __future__ import annotations

import numpy as np

QUANTILES = np.linspace(0.0, 1.0, 101)


def summary(probs: np.ndarray, scores: np.ndarray | None, class_names: list[str], task=None) -> dict | None:
    """The reference of validation outputs ``probs`` (n, classes) and novelty ``scores`` (n,) or None
    (``task``: the run's; a multi-label one's fitted thresholds give ``label_rates``)."""
    if probs is None or len(probs) == 0:
        return None
    top = probs.max(axis=1)
    answers = np.bincount(probs.argmax(axis=1), minlength=len(class_names))
    found = {"n": int(len(probs)), "confidence": _quantiles(top),
             "class_mix": {name: round(float(c) / len(probs), 6) for name, c in zip(class_names, answers)}}
    if scores is not None:
        scores = np.asarray(scores, dtype=float).reshape(-1)
        found |= {"novelty": _quantiles(scores), "unknown_rate": round(float((scores > 1.0).mean()), 6)}
    if getattr(task, "multi_label", False):
        given = probs >= task.decision_thresholds(len(class_names))[None, :]
        if scores is not None:
            given &= (scores <= 1.0)[:, None]  # an unknown photo is given no label
        found["label_rates"] = {name: round(float(r), 6) for name, r in zip(class_names, given.mean(axis=0))}
    return found


def _quantiles(values: np.ndarray) -> list[float]:
    return [round(float(q), 6) for q in np.quantile(np.asarray(values, dtype=float), QUANTILES)]
