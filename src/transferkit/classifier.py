"""``ImageClassifier``: the whole recipe as one object, shaped like scikit-learn's estimators and fastai's Learner.

    clf = ImageClassifier(backbone="efficientnet_lite0", epochs=30)     # stores options, validates nothing yet
    clf.fit("photos/", test_dir="test/", out="runs/fruit")              # -> self; learned state ends in "_"
    clf.classes_, clf.validation_["accuracy"], clf.test_["macro_f1"]
    clf.predict(["new/peach.jpg"], top_k=3)                             # rows: path, label, probability, top_k
    clf = ImageClassifier.load("runs/fruit/model.keras")                # the same object from the model file

A thin facade over explicit parts, each readable alone: the fit's state (``training.state.FitState``: what has
been learned; the attributes ending in ``_`` are views of it), the trainer that runs the stages in order
(``training.trainer``: prepare, features, head, fine-tune, evaluate, with stage events that TensorBoard and the
test features' prefetch plug into), the task (``tasks``: the head's output, loss, metrics, answers), the model
record (``models.record``: the model file's metadata, written and read in one place) and the run writer
(``reports.run``). ``__init__``'s keyword-only signature is generated from ``TrainOptions``, so
``inspect.signature``, IDE help and scikit-learn's ``clone`` see every option with its default.

The classifier is itself a ``Predictor`` (class_names, image_size, metadata, path, predict_images), so
``evaluate`` and ``predict`` go through the same functions as a model file or an ONNX export. While its backbone
is the frozen one that extracted the training features, it answers files from the feature cache instead of a
second pass through the backbone.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time

import numpy as np

from transferkit.errors import NotFittedError, TransferkitError
from transferkit.log import logger
from transferkit.options import DEFAULT_ENGINE, DEFAULT_PREDICT, EngineOptions, PredictOptions, TrainOptions
from transferkit.training.state import LEARNED, FeatureSplit, FitState

__all__ = ["ImageClassifier", "FeatureSplit"]


class ImageClassifier:
    """An image classifier trained by transfer learning. Keyword-only options: every field of
    ``transferkit.options.TrainOptions`` (``backbone``, ``epochs``, ``augment_views``, ...)."""

    def _setup(self, params: dict, unknown: dict) -> None:
        TrainOptions.check_names(unknown)  # a misspelt name fails here; values are checked by fit
        self._params = params
        self._state = FitState()
        self._trainer = None
        self.engine = None  # EngineOptions of predictions, set by fit or load
        self._predictor, self._predictor_key = None, None

    # ----- parameters (scikit-learn's protocol) -----
    def get_params(self, deep: bool = True) -> dict:
        return dict(self._params)

    def set_params(self, **params) -> "ImageClassifier":
        """Change options for the next ``fit``; what was learned stays until then (scikit-learn's rule)."""
        TrainOptions.check_names(params)
        self._params = self._params | params
        return self

    def __repr__(self) -> str:
        given = {k: v for k, v in self._params.items() if not _is_default(k, v)}
        return f"ImageClassifier({', '.join(f'{k}={v!r}' for k, v in given.items())})"

    def _repr_html_(self) -> str:
        """A notebook's view: the options (not fitted), or the classes, figures and confusion matrix."""
        from transferkit.reports.notebook import classifier_html

        return classifier_html(self)

    # ----- the Predictor protocol -----
    @property
    def class_names(self) -> list[str]:
        return self._fitted().classes_

    @property
    def image_size(self) -> int:
        return int(self._fitted().options_.size)

    @property
    def task(self):
        """What the outputs mean (``tasks``): single-label for every model so far."""
        return self._state.task

    @property
    def metadata(self) -> dict:
        """What the model file says about itself (as written, once saved)."""
        return self._state.file_metadata if self._state.saved_to else self._record().to_metadata()

    @property
    def path(self) -> str:
        """The model file that holds this classifier as it is now ("" after a change not yet saved)."""
        return self._state.saved_to or ""

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of RGB 0-255 images at ``image_size`` (n, size, size, 3)."""
        st = self._fitted()._state
        key = (st.model_version, st.saved_to)
        if self._predictor is None or self._predictor_key != key:
            from transferkit.engines.keras_model import KerasPredictor

            self._predictor = KerasPredictor(st.model, st.classes, self.image_size, self.metadata, self.path,
                                             self.engine or DEFAULT_ENGINE, st.check_images)
            self._predictor_key = key
        return self._predictor.predict_images(images)

    def probabilities_for_files(self, paths: list[str], batch_size: int | None = None):
        """(probabilities, indices of ``paths`` that decoded, skipped files); from the feature cache while the
        backbone is the frozen one that extracted it (the same function, without a second backbone pass)."""
        st = self._state
        batch_size = batch_size or st.options.batch_size
        if st.features_current and st.extractor is not None:
            from transferkit.engines.keras_step import run_model

            features, kept, skipped = st.extractor.extract(list(paths), 0, desc="features")
            return run_model(st.head, features[:, 0]), kept, skipped
        from transferkit.engines.predict import predict_files

        return predict_files(self, list(paths), batch_size=batch_size)

    def map_forward(self):
        """A function NumPy images -> (the backbone's last feature map, the head's input) on the extractor's
        converted fp32 engines, for heat maps (``FeatureExtractor.map_forward``); None once the backbone is no
        longer the frozen one (fine-tuning started), and where the extractor has no such engine."""
        st = self._state
        if not st.features_current or st.extractor is None:
            return None
        return st.extractor.map_forward()

    # ----- using a fitted classifier -----
    def predict(self, paths, *, top_k: int = DEFAULT_PREDICT.top_k, reject: bool = DEFAULT_PREDICT.reject,
                batch_size: int | None = None, coverage: float | None = None,
                max_error: float | None = None, expected_error: float | None = None,
                class_coverage: float | None = None) -> list[dict]:
        """A row per image file (files, folders, globs): path, label, probability, top_k, novelty, unknown; or
        path and error. A photo of none of the classes gets ``unknown`` True and label None (``reject=False``:
        the nearest class). ``batch_size``: default, the training option's. ``coverage`` / ``class_coverage`` /
        ``max_error`` / ``expected_error``: rows get ``set`` / ``abstain`` (``models.conformal``)."""
        from transferkit.engines.predict import predict_rows

        self._fitted()
        options = PredictOptions(top_k=top_k, reject=reject, batch_size=batch_size or self.options_.batch_size,
                                 coverage=coverage, max_error=max_error, expected_error=expected_error,
                                 class_coverage=class_coverage)
        return predict_rows(self, paths, options)

    def predict_proba(self, images) -> np.ndarray:
        """Calibrated probabilities (n, classes) for images given as an array (n, h, w, 3), or a list of paths,
        bytes, Pillow images or arrays of any size (resized to the model's input as files are)."""
        from transferkit.data.images import to_model_input
        from transferkit.models.novelty import split_outputs

        self._fitted()
        if isinstance(images, np.ndarray) and images.ndim != 4:
            raise TransferkitError(f"predict_proba takes a batch of images: an array (n, height, width, 3) or a "
                                   f"list; got an array of shape {images.shape}")
        batch = np.stack([to_model_input(image, self.image_size) for image in images])
        return split_outputs(self.predict_images(batch), len(self.classes_))[0]

    def evaluate(self, test_dir: str, *, out: str | None = None, unknown_dir: str | None = None) -> dict:
        """Metrics on ``test_dir/<class>/`` (the same evaluation as ``transferkit evaluate``); with ``out``,
        metrics.json and report.html there; ``unknown_dir``: photos of none of the classes."""
        from transferkit.reports.evaluation import evaluate_predictor

        return evaluate_predictor(self._fitted(), test_dir, out=out, batch_size=self.options_.batch_size,
                                  unknown_dir=unknown_dir)

    # ----- training -----
    def fit(self, data_dir: str, *, test_dir: str | None = None, out: str | None = None, resume: bool = False,
            callbacks=(), log_dir: str | None = None, ray: str | None = None, add=()) -> "ImageClassifier":
        """Train on ``data_dir/<class>/<images>`` (or a label file: ``labels.csv``, a Hugging Face imagefolder)
        and write the run folder ``out``. ``resume`` continues the interrupted second stage of ``out`` (same
        options, same files); ``callbacks``: Keras callbacks for the second stage, and stage callbacks
        (``training.events.StageCallback``) for every stage; ``log_dir``: TensorBoard logs of both stages there
        (``training.tensorboard``); ``ray``: compute the features missing from the cache on the Ray cluster at
        this address ("local": a local Ray instance; see transferkit.scale); ``add``: label files whose rows
        join the training split only (data/added.py)."""
        from transferkit.reports.run import RunWriter
        from transferkit.training.events import PrefetchTest, StageCallback, StageEvents

        if ray is not None:  # Ray installed and the cluster reachable, before any image is read
            from transferkit.scale.cluster import preflight

            preflight(ray)
        plugins = [PrefetchTest()] + [c for c in callbacks if isinstance(c, StageCallback)]
        if log_dir:
            from transferkit.training.tensorboard import TensorBoardLogs

            plugins.append(TensorBoardLogs(log_dir))  # the tensorboard package is checked here, first
        started = time.perf_counter()
        self.prepare(data_dir, out=out, resume=resume, test_dir=test_dir, events=StageEvents(plugins), add=add)
        test_dir = test_dir or self.data_.test_source  # a label file's test rows
        keras_callbacks = [c for c in callbacks if not isinstance(c, StageCallback)]
        self._trainer.run(test_dir, resume, ray, keras_callbacks)
        self.timing_["total_seconds"] = round(time.perf_counter() - started, 2)
        self.save(self.model_path_)
        RunWriter(self._state).write_run(self, self.metadata)
        logger.info(f"val_accuracy {self.validation_['accuracy']:.4f}; model written to {self.model_path_} "
                    f"({self.timing_['total_seconds']:.1f} s)")
        return self

    def prepare(self, data_dir: str, *, out: str | None = None, resume: bool = False,
                test_dir: str | None = None, events=None, add=()) -> "ImageClassifier":
        """The first stage (``Trainer.prepare``): validate every option before any image is read, scan and split
        ``data_dir``, check ``test_dir``'s classes, then make the run folder ``out``. Forgets what an earlier
        fit learned. ``events``: the stage events (``training.events.StageEvents``) of the stages that follow."""
        from transferkit.training.trainer import Trainer

        self._state = self._state.fresh()
        self._trainer = Trainer(self._state, self, events)
        self._trainer.prepare(self.get_params(), data_dir, out=out, resume=resume, test_dir=test_dir, add=add)
        return self

    def extract_features(self, ray: str | None = None) -> FeatureSplit:
        """Features of every training view and validation image (``Trainer.extract_features``)."""
        return self._prepared().extract_features(ray=ray)

    def fit_head(self, features: FeatureSplit) -> "ImageClassifier":
        """Train the head on ``features`` and fit the trust statistics (``Trainer.fit_head``)."""
        self._prepared().fit_head(features)
        return self

    def audit_labels(self, features: FeatureSplit) -> "ImageClassifier":
        """The label audit of the training folder (``Trainer.audit_labels``): ``label_audit_``."""
        self._prepared().audit_labels(features)
        return self

    def fine_tune(self, epochs: int | None = None, *, unfreeze_top: int | None = None,
                  learning_rate: float | None = None, resume: bool = False, callbacks=()) -> "ImageClassifier":
        """Second stage (``Trainer.fine_tune``): unfreeze the top ``unfreeze_top`` backbone blocks and train end
        to end on augmented images at ``learning_rate`` (defaults: the options'); every better epoch is saved
        at once, and ``resume`` continues the run's interrupted stage from its last saved epoch."""
        from transferkit.training.trainer import Trainer

        self._fitted()
        if self._trainer is None:  # a loaded classifier: its trainer says what it lacks
            self._trainer = Trainer(self._state, self)
        self._trainer.fine_tune(epochs, unfreeze_top=unfreeze_top, learning_rate=learning_rate, resume=resume,
                                callbacks=callbacks)
        return self

    # ----- the model file -----
    def save(self, path: str, *, warm: bool = True) -> str:
        """Write the classifier (resize + preprocessing + backbone + head) and its metadata to ``path``
        (``.keras``), atomically; ``warm``: also leave the converted, checked engine of the default engine
        (``DEFAULT_ENGINE``) in the cache, so that the first ``predict`` or ``serve`` of the file imports no
        TensorFlow (``engines.convert.warm``); not for a classifier trained on ``runtime="keras"``."""
        st = self._fitted()._state
        metadata = self._record().save(st.model, path, st.check_images)
        st.saved_to, st.file_metadata = str(path), metadata
        if warm and st.options.runtime != "keras":  # a run that ruled out converted engines converts none
            from transferkit.engines.convert import warm as cache_engine

            cache_engine(str(path), st.model)
        return str(path)

    @classmethod
    def load(cls, path: str, *, runtime: str = DEFAULT_ENGINE.runtime,
             precision: str = DEFAULT_ENGINE.precision) -> "ImageClassifier":
        """A fitted classifier from a ``.keras`` model file; predictions run on ``runtime`` / ``precision``.
        What it learned comes from the file's metadata: ``validation_`` and ``test_`` hold the summaries stored
        there (accuracy, macro F1), not the full reports of the run folder."""
        from transferkit.engines.runtimes import resolve
        from transferkit.models.record import ModelRecord

        engine = EngineOptions(runtime=runtime, precision=precision)
        resolve(engine.runtime, engine.precision)  # an impossible engine fails here, not at the first prediction
        loaded, record = ModelRecord.load(str(path))
        clf = cls(**{k: v for k, v in record.training.items() if k in TrainOptions.names()})
        clf.adopt(loaded, record)
        st = clf._state
        clf.engine, st.model_path, st.saved_to = engine, str(path), str(path)
        st.out = os.path.dirname(os.path.abspath(str(path)))
        return clf

    def adopt(self, loaded, record) -> None:
        """Take the model of ``loaded`` (``modelfile.ModelFile``) and what its ``record`` says it learned."""
        from transferkit import runs

        st = self._state
        if st.options is None:
            st.options = runs.options_of(loaded.metadata, loaded.image_size, self.get_params())
        record.to_state(st, loaded)
        st.file_metadata = dict(loaded.metadata)

    def _record(self):
        """The model record of the state now, over the record of the file last read or written."""
        from transferkit.models.record import ModelRecord

        st = self._fitted()._state
        base = ModelRecord.from_metadata(st.file_metadata) if st.file_metadata else None
        return ModelRecord.from_state(st, base)

    # ----- the run folder -----
    def summary(self) -> dict:
        """What ``metrics.json`` holds and ``transferkit.train`` returns (a dict a notebook shows as tables)."""
        from transferkit.reports.run import summary

        return summary(self._state)

    # ----- helpers -----
    def _fitted(self) -> "ImageClassifier":
        if self._state.model is None:
            raise NotFittedError("this ImageClassifier is not fitted yet: call fit(data_dir) or "
                                 "ImageClassifier.load(path) first")
        return self

    def _prepared(self):
        if self._trainer is None or self._state.data is None:
            raise NotFittedError("this ImageClassifier has no training data yet: call prepare(data_dir) first")
        return self._trainer


def _is_default(name: str, value) -> bool:
    default = TrainOptions.__dataclass_fields__[name].default
    return value is default or (type(value) is type(default) and value == default)


def _learned(name: str) -> property:
    def get(self):
        return getattr(self._state, name)

    def put(self, value):
        setattr(self._state, name, value)

    return property(get, put, doc=f"Learned by fit or load: the fit state's ``{name}`` (None before).")


def _generated_init():
    """``__init__(self, *, backbone=..., epochs=..., ...)``: one keyword-only parameter per ``TrainOptions``
    field, with its default (a real signature: ``inspect.signature``, IDE help and scikit-learn's ``clone`` read
    it). A name that is not an option is a one-line error listing the known ones."""
    fields = dataclasses.fields(TrainOptions)
    defaults = {f.name: f.default for f in fields}
    source = (f"def __init__(self, *, {', '.join(f'{f.name}=_defaults[{f.name!r}]' for f in fields)}, **unknown):\n"
              f"    self._setup({{{', '.join(f'{f.name!r}: {f.name}' for f in fields)}}}, unknown)\n")
    namespace = {"_defaults": defaults}
    exec(compile(source, "<transferkit.ImageClassifier.__init__>", "exec"), namespace)  # noqa: S102 - our source
    init = namespace["__init__"]
    init.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                             annotation=f.type) for f in fields])
    init.__doc__ = ("Keyword-only options, one per field of TrainOptions (checked by fit):\n"
                    + "\n".join(f"    {f.name} = {f.default!r}: {f.metadata['help']}" for f in fields))
    init.__qualname__ = "ImageClassifier.__init__"
    return init


ImageClassifier.__init__ = _generated_init()
for _name in LEARNED:
    setattr(ImageClassifier, _name + "_", _learned(_name))
