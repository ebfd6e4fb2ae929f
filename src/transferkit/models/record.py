"""The model record: what a ``.keras`` file says about itself (``transferkit.json`` inside it), as one versioned
dataclass. It is built from a fit's state (``from_state``), written and read with the model (``save``,
``load``), and given back to a state (``to_state``): one schema, where the classifier's ``_metadata`` and
``_adopt`` used to write and read it apart. ``format`` is the layout's version (``runs.FORMAT``); keys of a
file this version does not know are kept as they were (``extra``), so loading and saving again loses nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
from dataclasses import dataclass, field

from transferkit import runs
from transferkit._version import __version__
from transferkit.tasks import DEFAULT_TASK

INPUT = "RGB 0-255, any size (resized inside the model)"
FINE_TUNE_KEYS = ("epochs", "unfreeze_top", "learning_rate", "blocks", "best_epoch")
_DERIVED = ("weights", "input")  # written from other fields, never read back


@dataclass
class ModelRecord:
    """The metadata of a model file. ``fit`` holds best_epoch, history, timing, feature_runtime, feature_check
    and head_choice; ``validation`` / ``test`` the summaries of their metrics (``runs.metrics_record``)."""

    class_names: list
    image_size: int | None = None
    backbone: str | None = None
    task: str = DEFAULT_TASK
    task_params: dict | None = None  # what the task fitted (multi-label: each label's threshold)
    training: dict = field(default_factory=dict)  # the options record (runs.stored_options)
    fit: dict = field(default_factory=dict)
    data: dict | None = None
    validation: dict | None = None
    test: dict | None = None
    novelty: dict | None = None
    reference: dict | None = None  # the validation answers' summary (training/reference.py): monitor's reference
    conformal: dict | None = None  # held-out scores for prediction sets and abstention (models.conformal)
    fine_tune: dict | None = None
    backbone_info: dict | None = None
    backbone_choice: dict | None = None
    format: str = runs.FORMAT
    transferkit_version: str = __version__
    keras_version: str | None = None
    created: str | None = None
    extra: dict = field(default_factory=dict)

    # ----- the JSON form -----
    @classmethod
    def from_metadata(cls, metadata: dict) -> "ModelRecord":
        """The record of a file's metadata (already checked by ``runs.check_model_metadata``)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in metadata.items() if k in names}
        if not isinstance(known.get("fit"), dict):
            known["fit"] = {}
        if not isinstance(known.get("training"), dict):
            known["training"] = {}
        for name in ("novelty", "conformal"):
            if not isinstance(known.get(name), dict):
                known.pop(name, None)
        extra = {k: v for k, v in metadata.items() if k not in names and k not in _DERIVED}
        return cls(**known, extra=extra)

    def to_metadata(self) -> dict:
        meta = dict(self.extra)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and (value is not None or f.name in ("image_size", "backbone")):
                meta[f.name] = value
        meta["weights"] = self.training.get("weights")
        meta["input"] = INPUT
        return meta

    # ----- from and to a fit's state -----
    @classmethod
    def from_state(cls, state, base: "ModelRecord | None" = None) -> "ModelRecord":
        """The record of ``state`` now; what the state does not know (a loaded file's data, say) comes from
        ``base``, the record of the file it was read from or last written to."""
        import keras

        options = state.options
        training = runs.stored_options(options)  # hashes a local weights file once
        changes = dict(
            format=runs.FORMAT, transferkit_version=__version__, keras_version=keras.__version__,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            class_names=list(state.classes), backbone=options.backbone, image_size=options.size,
            task=state.task.name, task_params=state.task.record(list(state.classes)), training=training,
            fit={"best_epoch": state.best_epoch, "history": copy.deepcopy(state.history),
                 "timing": dict(state.timing or {}), "feature_runtime": _feature_runtime(state, base),
                 "feature_check": state.feature_check, "head_choice": state.head_choice},
            **runs.backbone_record(options))
        if state.data is not None:
            data = state.data
            changes["data"] = {"dir": os.path.abspath(data.root), "fingerprint": data.fingerprint,
                               "n_train": len(data.train_paths), "n_val": len(data.val_paths)}
            changes["data"] |= runs.data_record(data, state.skipped, state.duplicates)
            if getattr(data, "negative_paths", None):  # train --add's unknown rows (novelty["background"]: used)
                changes["data"]["n_unknown"] = len(data.negative_paths)
        for name in ("validation", "test"):
            metrics = getattr(state, name)
            if metrics:
                changes[name] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
                changes[name] |= runs.metrics_record(metrics)
        if state.backbone_choice:
            changes["backbone_choice"] = state.backbone_choice
        if state.novelty:
            changes["novelty"] = dict(state.novelty)
        if state.reference:
            changes["reference"] = state.reference
        changes["conformal"] = state.conformal
        if state.fine_tune:
            changes["fine_tune"] = {k: state.fine_tune.get(k) for k in FINE_TUNE_KEYS}
        return dataclasses.replace(base, **changes) if base is not None else cls(**changes)

    def to_state(self, state, loaded) -> None:
        """Give ``state`` the model of ``loaded`` (a ``modelfile.ModelFile``) and what this record says it
        learned."""
        from transferkit.tasks import task_of

        state.task = task_of(self.to_metadata())
        state.classes, state.model = list(loaded.class_names), loaded.keras_model
        if loaded.check_images is not None or state.check_images is None:
            state.check_images = loaded.check_images
        fit = self.fit
        state.history, state.best_epoch = fit.get("history"), fit.get("best_epoch")
        state.feature_check, state.head_choice = fit.get("feature_check"), fit.get("head_choice")
        state.validation, state.test, state.fine_tune = self.validation, self.test, self.fine_tune
        state.novelty, state.reference, state.conformal = self.novelty, self.reference, self.conformal
        state.timing = dict(fit.get("timing", {}))
        state.set_model(loaded.keras_model, features_current=False)

    # ----- the file -----
    def save(self, model, path: str, check_images=None) -> dict:
        """Write ``model`` with this record (and the check photos) to ``path`` atomically; returns the
        metadata written."""
        from transferkit.models import modelfile

        metadata = self.to_metadata()
        modelfile.save(model, path, metadata, check_images)
        return metadata

    @classmethod
    def load(cls, path: str):
        """(the ``modelfile.ModelFile`` at ``path``, its record)."""
        from transferkit.models import modelfile

        loaded = modelfile.load(str(path))
        return loaded, cls.from_metadata(loaded.metadata)


def _feature_runtime(state, base: ModelRecord | None) -> str | None:
    views = state.views_extractor or state.extractor
    if views is not None and views.engine is not None:
        return views.engine.label
    return (base.fit if base is not None else {}).get("feature_runtime")
