"""What a fit has learned so far, as one record (``FitState``), instead of 32 attributes of the classifier whose
meaning depended on the order its methods were called in. The trainer's stages fill it in order (prepare: the
options, split and run folder; features; head; fine-tune; evaluate); the model record (``models.record``) reads
and writes it; ``ImageClassifier``'s learned attributes (``classes_``, ``validation_``, ...) are views of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from transferkit.tasks import Task, get_task


@dataclass
class FeatureSplit:
    """Cached features of a run: augmented training views flattened, validation images, and the validation files
    that decoded (for the report)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    val_paths: list[str]
    train_paths: list[str] = field(default_factory=list)  # the decoded training files, in order
    x_negative: np.ndarray | None = None  # photos of none of the classes (train --add's unknown rows), or None


# the learned fields, each an ImageClassifier attribute with a trailing "_" (scikit-learn's convention)
LEARNED = ("classes", "options", "model", "history", "best_epoch", "validation", "test", "fine_tune", "skipped",
           "timing", "data", "out", "model_path", "extractor", "head", "check_images", "novelty", "feature_check",
           "head_choice", "label_audit", "duplicates", "backbone_choice", "conformal")


@dataclass
class FitState:
    """The learned state of one classifier. ``model_version`` counts the changes of ``model`` (a predictor
    built on an older one is stale); ``saved_to`` is the model file that holds ``model`` as it is now."""

    task: Task = field(default_factory=get_task)
    options: object = None  # TrainOptions
    data: object = None  # data.folders.TrainingData
    classes: list | None = None
    skipped: list | None = None
    duplicates: dict | None = None
    test_paths: list = field(default_factory=list)  # the test photos prepare found
    out: str | None = None
    model_path: str | None = None
    extractor: object = None  # the reported numerics' FeatureExtractor (validation, test)
    views_extractor: object = None  # the training views' (possibly a lower precision)
    candidates: list = field(default_factory=list)  # the head candidates compared (training.select.Candidate)
    chosen: object = None  # the one kept
    head: object = None
    model: object = None
    features_current: bool = False  # the backbone is the frozen one that extracted the cached features
    val_paths: list = field(default_factory=list)  # the validation files decoded for fine-tuning
    history: dict | None = None
    best_epoch: int | None = None
    head_choice: dict | None = None
    feature_check: dict | None = None
    label_audit: object = None
    novelty: dict | None = None
    reference: dict | None = None  # the validation answers' summary, monitor's drift reference (reference.py)
    conformal: dict | None = None  # models.conformal's calibration (metadata["conformal"])
    validation: dict | None = None
    test: dict | None = None
    fine_tune: dict | None = None
    backbone_choice: dict | None = None
    check_images: np.ndarray | None = None
    timing: dict | None = None
    saved_to: str | None = None
    model_version: int = 0
    file_metadata: dict = field(default_factory=dict)  # what the model file last written or read says

    def set_model(self, model, *, features_current: bool) -> None:
        """A new (or changed) Keras classifier: no model file holds it yet."""
        self.model, self.features_current = model, features_current
        self.saved_to, self.model_version = None, self.model_version + 1

    def fresh(self) -> "FitState":
        """An empty state for a new fit, with the same task."""
        return FitState(task=self.task)
