"""Stage events: hooks the trainer calls around each stage, as Keras calls a ``Callback`` around each epoch.

    prepare -> features -> head -> fine_tune -> evaluate        (``STAGES``; a resumed run skips features, head)

A plug-in subclasses ``StageCallback`` and overrides what it needs: ``on_stage_begin`` / ``on_stage_end``
(``stage``, the ``FitState``), ``keras_callbacks`` (Keras callbacks for a stage that runs Keras's ``fit``), and
``on_train_end`` (always called, after an error too). TensorBoard's logs (``training.tensorboard``) and the test
photos' features computed ahead (``training.features.Prefetch``) are such plug-ins, instead of a ``log_dir``
threaded through six modules and a prefetch started and stopped by hand in ``fit``.
"""

from __future__ import annotations

import contextlib

STAGES = ("prepare", "features", "head", "fine_tune", "evaluate")


class StageCallback:
    """Base of the plug-ins: every hook does nothing."""

    def on_stage_begin(self, stage: str, state) -> None:
        pass

    def on_stage_end(self, stage: str, state) -> None:
        pass

    def keras_callbacks(self, stage: str, state, first_epoch: int = 0) -> list:
        return []

    def on_train_end(self, state) -> None:
        pass


class StageEvents:
    """The callbacks of one fit, called in order."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    @contextlib.contextmanager
    def stage(self, name: str, state):
        """``with events.stage("head", state): ...``: begin, the stage, end (not after an error)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}")
        for callback in self.callbacks:
            callback.on_stage_begin(name, state)
        yield
        for callback in self.callbacks:
            callback.on_stage_end(name, state)

    def keras_callbacks(self, stage: str, state, first_epoch: int = 0) -> list:
        return [k for c in self.callbacks for k in c.keras_callbacks(stage, state, first_epoch)]

    def train_end(self, state) -> None:
        for callback in self.callbacks:
            callback.on_train_end(state)


class PrefetchTest(StageCallback):
    """The test photos' features computed on one core while the head is fitted on the other
    (``training.features.Prefetch``): started after the features stage, stopped before fine-tuning or the
    evaluation reads them (and at the end of the fit, whatever happened). It applies where the evaluation will
    read them from the feature cache: a cached run, no fine-tuning (it moves the backbone), a converted engine
    (Keras's predict is not run from a second thread)."""

    def __init__(self):
        self.ahead = None

    def on_stage_end(self, stage: str, state) -> None:
        from transferkit.training.features import Prefetch

        extractor = state.extractor
        if stage != "features" or not state.test_paths or extractor is None:
            return
        if (extractor.cache_root is not None and extractor.engine is not None
                and extractor.engine.runtime != "keras" and not state.options.fine_tune_epochs):
            self.ahead = Prefetch(extractor, state.test_paths)

    def on_stage_begin(self, stage: str, state) -> None:
        if stage in ("fine_tune", "evaluate"):
            self.stop()

    def on_train_end(self, state) -> None:
        self.stop()

    def stop(self) -> None:
        if self.ahead is not None:
            self.ahead.stop()
            self.ahead = None
