"""``ImageClassifier``: the whole recipe as one object, shaped like scikit-learn's estimators and fastai's Learner.

    clf = ImageClassifier(backbone="efficientnet_lite0", epochs=30)     # stores options, validates nothing yet
    clf.fit("photos/", test_dir="test/", out="runs/fruit")              # -> self; learned state ends in "_"
    clf.classes_, clf.validation_["accuracy"], clf.test_["macro_f1"]
    clf.predict(["new/peach.jpg"], top_k=3)                             # rows: path, label, probability, top_k
    clf = ImageClassifier.load("runs/fruit/model.keras")                # the same object from the model file

``fit`` runs the stages in order, each a method a test can call on its own: ``_prepare`` (validate the options,
before any image is read; scan; split), ``extract_features`` (cached frozen-backbone features), ``fit_head``,
``save``, then ``fine_tune`` when asked, ``evaluate`` on the test folder, and ``_write_run`` (history, metrics,
report). A new step (say, calibration after the head fit) is one more method called from ``fit``, whose result
is stored in an attribute ending in ``_`` and written by ``_metadata``.

The classifier is itself a ``Predictor`` (class_names, image_size, metadata, path, predict_images), so
``evaluate`` and ``predict`` go through the same functions as a model file or an ONNX export. While its backbone
is the frozen one that extracted the training features, it answers files from the feature cache instead of a
second pass through the backbone.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from dataclasses import dataclass

import numpy as np

from transferkit._version import __version__
from transferkit.errors import OptionError, TransferkitError
from transferkit.log import logger
from transferkit.options import EngineOptions, TrainOptions
from transferkit import runs

ENGINE = EngineOptions()  # the one default engine
_ATTRIBUTES = ("classes_", "options_", "model_", "history_", "best_epoch_", "validation_", "test_",
               "fine_tune_", "skipped_", "timing_", "data_", "out_", "model_path_")


@dataclass
class FeatureSplit:
    """Cached features of a run: augmented training views flattened, validation images, and the validation files
    that decoded (for the report)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    val_paths: list[str]


class ImageClassifier:
    """An image classifier trained by transfer learning. Keyword-only options: every field of
    :class:`transferkit.options.TrainOptions` (``backbone``, ``epochs``, ``augment_views``, ...)."""

    def __init__(self, **options):
        unknown = sorted(set(options) - set(TrainOptions.names()))
        if unknown:
            raise TransferkitError(f"unknown option {unknown[0]!r}; known: {', '.join(TrainOptions.names())}")
        self._params = dict(options)
        for name in _ATTRIBUTES:
            setattr(self, name, None)
        self.extractor_ = self.head_ = None
        self._engine = None  # EngineOptions of predictions, set by fit or load
        self._predictor = None
        self._features_current = False  # the backbone is the frozen one that extracted the cached features
        self._file_metadata = {}  # what a loaded model file said about itself (kept where not recomputed)
        self._saved = False  # model_ is what model_path_ holds

    # ----- parameters (scikit-learn's protocol) -----
    def get_params(self, deep: bool = True) -> dict:
        defaults = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
        return defaults | self._params

    def set_params(self, **params) -> "ImageClassifier":
        self.__init__(**(self._params | params))
        return self

    def __repr__(self) -> str:
        return f"ImageClassifier({', '.join(f'{k}={v!r}' for k, v in self._params.items())})"

    # ----- the Predictor protocol -----
    @property
    def class_names(self) -> list[str]:
        return self._fitted().classes_

    @property
    def image_size(self) -> int:
        return int(self._fitted().options_.size)

    @property
    def metadata(self) -> dict:
        """What the model file says about itself (as written, once saved)."""
        return self._file_metadata if self._saved else self._metadata()

    @property
    def path(self) -> str:
        return self.model_path_ if self._saved else ""

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of RGB 0-255 images at ``image_size`` (n, size, size, 3)."""
        if self._predictor is None:
            from transferkit.engines.keras_model import KerasPredictor

            self._predictor = KerasPredictor(self._fitted().model_, self.classes_, self.image_size,
                                             self._metadata(), self.path, self._engine or ENGINE)
        return self._predictor.predict_images(images)

    def predict_files(self, paths: list[str], batch_size: int | None = None):
        """(probabilities, indices of ``paths`` that decoded, skipped files); from the feature cache while the
        backbone is the frozen one that extracted it (the same function, without a second backbone pass)."""
        batch_size = batch_size or self.options_.batch_size
        if self._features_current and self.extractor_ is not None:
            from transferkit.engines.keras_step import run_model

            features, kept, skipped = self.extractor_.extract(list(paths), 0, desc="features")
            return run_model(self.head_, features[:, 0]), kept, skipped
        from transferkit.engines.predict import predict_files

        return predict_files(self, list(paths), batch_size=batch_size)

    # ----- using a fitted classifier -----
    def predict(self, paths, *, top_k: int = 3) -> list[dict]:
        """A row per image file (files, folders, globs): path, label, probability, top_k; or path and error."""
        from transferkit.engines.predict import predict_rows

        return predict_rows(self._fitted(), paths, top_k=top_k, batch_size=self.options_.batch_size)

    def predict_proba(self, images) -> np.ndarray:
        """Probabilities (n, classes) for images given as an array (n, h, w, 3), or a list of paths, bytes, Pillow
        images or arrays of any size (resized to the model's input as files are)."""
        from transferkit.data.images import to_model_input

        self._fitted()
        batch = np.stack([to_model_input(image, self.image_size) for image in images])
        return self.predict_images(batch)

    def evaluate(self, test_dir: str, *, out: str | None = None) -> dict:
        """Metrics on ``test_dir/<class>/`` (the same evaluation as ``transferkit evaluate``); with ``out``,
        metrics.json and report.html there."""
        from transferkit.reports.evaluation import evaluate_predictor

        return evaluate_predictor(self._fitted(), test_dir, out=out, batch_size=self.options_.batch_size)

    # ----- training -----
    def fit(self, data_dir: str, *, test_dir: str | None = None, out: str | None = None, resume: bool = False,
            callbacks=()) -> "ImageClassifier":
        """Train on ``data_dir/<class>/<images>`` and write the run folder ``out``. ``resume`` continues the
        interrupted second stage of ``out`` (same options, same files); ``callbacks`` are Keras callbacks for
        the second stage."""
        started = time.perf_counter()
        self._prepare(data_dir, out, resume)
        if resume:
            self._restore()
        else:
            self.fit_head(self.extract_features())
            self.save(self.model_path_)  # the head-only model is safe on disk before any fine-tuning
        if resume or self.options_.fine_tune_epochs:
            self.fine_tune(resume=resume, callbacks=callbacks)
        if test_dir:
            from transferkit.reports.metrics import text_report

            self.test_ = self.evaluate(test_dir)
            logger.info(text_report(self.test_))
        self.save(self.model_path_)
        self.timing_["total_seconds"] = round(time.perf_counter() - started, 2)
        self._write_run()
        logger.info(f"val_accuracy {self.validation_['accuracy']:.4f}; model written to {self.model_path_} "
                    f"({self.timing_['total_seconds']:.1f} s)")
        return self

    def _prepare(self, data_dir: str, out: str | None, resume: bool) -> None:
        """Validate every option (before any image is read), then scan and split ``data_dir``."""
        import keras

        from transferkit.data.folders import split_training_folder

        params = self.get_params()
        if isinstance(params["weights"], os.PathLike):
            params["weights"] = os.fspath(params["weights"])
        self.options_ = options = TrainOptions(**params)
        if options.weights not in (None, "imagenet") and not os.path.isfile(options.weights):
            raise OptionError("weights", "must be 'imagenet' or an existing weights file", options.weights)
        if resume and not out:
            raise TransferkitError("resume needs out, the run folder to continue (--resume --out RUN)")
        self.out_ = str(out or runs.default_folder())
        self.model_path_ = os.path.join(self.out_, runs.MODEL_NAME)
        os.makedirs(self.out_, exist_ok=True)
        self.timing_, self._engine = {}, EngineOptions(runtime=options.runtime, precision=options.precision)
        keras.utils.set_random_seed(options.seed)
        self.data_ = split_training_folder(data_dir, options.val_split, options.seed)
        self.classes_, self.skipped_ = list(self.data_.class_names), list(self.data_.skipped)
        if not resume:
            runs.write_split(self.out_, self.data_)

    def extract_features(self) -> FeatureSplit:
        """Features of every training view and validation image, through the frozen backbone and its cache."""
        from transferkit.training.features import FeatureExtractor
        from transferkit.training.head import flatten_views

        options, data = self.options_, self.data_
        self.extractor_ = FeatureExtractor.from_options(options)
        logger.info(f"{len(data.train_paths) + len(data.val_paths)} images in {len(data.class_names)} classes "
                    f"({len(data.skipped)} skipped); backbone {options.backbone} at {options.size}px; "
                    f"{len(data.train_paths)} train x {options.augment_views + 1} views, "
                    f"{len(data.val_paths)} validation")
        t0 = time.perf_counter()
        f_train, kept_t, skip_t = self.extractor_.extract(data.train_paths, options.augment_views,
                                                          desc="train features")
        f_val, kept_v, skip_v = self.extractor_.extract(data.val_paths, 0, desc="validation features")
        self.timing_["feature_seconds"] = round(time.perf_counter() - t0, 2)
        self.skipped_ = data.skipped + skip_t + skip_v
        y_train, y_val = data.y_train[kept_t], data.y_val[kept_v]
        missing = sorted(set(range(len(data.class_names))) - set(y_train.tolist()))
        if missing:
            raise TransferkitError(f"{data.root}: class '{data.class_names[missing[0]]}' has no readable "
                                   f"training image")
        if len(y_val) == 0:
            raise TransferkitError(f"{data.root}: no readable validation image")
        x_train, y_views = flatten_views(f_train, y_train)
        return FeatureSplit(x_train, y_views, f_val[:, 0], y_val, [data.val_paths[i] for i in kept_v])

    def fit_head(self, features: FeatureSplit) -> "ImageClassifier":
        """Train the head on ``features``; the classifier becomes backbone + best head."""
        from transferkit.engines.keras_step import run_model
        from transferkit.models import modelfile
        from transferkit.reports.metrics import compute_metrics
        from transferkit.training.head import class_weights, train_head

        t0 = time.perf_counter()
        weights = class_weights(self.options_.class_weight, self.data_.y_train, len(self.classes_))
        self.head_, self.history_, self.best_epoch_ = train_head(
            self.options_, features.x_train, features.y_train, features.x_val, features.y_val,
            len(self.classes_), weights)
        self.timing_["head_seconds"] = round(time.perf_counter() - t0, 2)
        self.validation_ = compute_metrics(features.y_val, run_model(self.head_, features.x_val), self.classes_,
                                           features.val_paths, self.skipped_)
        self._set_model(modelfile.assemble(self.extractor_.model, self.head_), features_current=True)
        return self

    def fine_tune(self, epochs: int | None = None, *, unfreeze_top: int | None = None,
                  learning_rate: float | None = None, resume: bool = False, callbacks=()) -> "ImageClassifier":
        """Second stage: unfreeze the top ``unfreeze_top`` backbone blocks and train end to end on augmented
        images at ``learning_rate`` (defaults: the options'); every better epoch is saved at once, and
        ``resume`` continues the run's interrupted stage from its last saved epoch."""
        from transferkit.training import finetune

        self._fitted()
        changes = {k: v for k, v in (("fine_tune_epochs", epochs), ("unfreeze_top", unfreeze_top),
                                     ("fine_tune_lr", learning_rate)) if v is not None}
        options = dataclasses.replace(self.options_, **changes)  # validated like every option
        t0 = time.perf_counter()
        images = self._decode_split()
        state = self._fine_tune_state(finetune, options, images, resume)
        self.fine_tune_ = finetune.fine_tune(
            self.model_, self._spec(), images, state, save=self._checkpoint, out=self.out_,
            batch_size=options.batch_size, seed=options.seed, patience=options.patience,
            class_weights=self._class_weights(), callbacks=callbacks)
        self._set_model(self.model_, features_current=False)
        self._validate_on_images(images)
        self.timing_["fine_tune_seconds"] = round(time.perf_counter() - t0, 2)
        return self

    def _fine_tune_state(self, finetune, options: TrainOptions, images, resume: bool) -> dict:
        from transferkit.training.head import mean_log_loss
        from transferkit.engines.keras_step import run_model

        if not resume:
            val_loss = mean_log_loss(run_model(self.model_, images.x_val), images.y_val)
            return finetune.new_state(options.fine_tune_epochs, options.unfreeze_top, options.fine_tune_lr,
                                      (self.validation_["accuracy"], -val_loss))
        state = finetune.read_state(self.out_)
        if state is None:
            raise TransferkitError(f"{self.out_}: nothing to resume (no {finetune.STATE_NAME})")
        if state.get("status") == "done":
            raise TransferkitError(f"{self.out_}: fine-tuning already finished")
        logger.info(f"resuming fine-tuning in {self.out_}: {state['epochs_done']} of {state['epochs']} epochs done")
        return state

    def _decode_split(self):
        from transferkit.training.finetune import ImageSplit, decode_all

        data, size = self.data_, self.options_.size
        x_train, kept_t = decode_all(data.train_paths, size)
        x_val, kept_v = decode_all(data.val_paths, size)
        self._val_paths = [data.val_paths[i] for i in kept_v]
        return ImageSplit(x_train, data.y_train[kept_t], x_val, data.y_val[kept_v])

    def _validate_on_images(self, images) -> None:
        from transferkit.engines.keras_step import run_model
        from transferkit.reports.metrics import compute_metrics

        self.validation_ = compute_metrics(images.y_val, run_model(self.model_, images.x_val), self.classes_,
                                           self._val_paths, self.skipped_)

    def _checkpoint(self, state: dict) -> None:
        self.fine_tune_ = state
        self.save(self.model_path_)

    def _restore(self) -> None:
        """For ``resume``: adopt the run's saved model after checking it was made with the same options and the
        same training files (anything else would change the split or the features)."""
        from transferkit.models import modelfile

        if not os.path.exists(self.model_path_):
            raise TransferkitError(f"{self.out_}: nothing to resume (no {runs.MODEL_NAME})")
        loaded = modelfile.load(self.model_path_)
        runs.check_resumable(self.out_, loaded.metadata, self.options_)
        runs.check_same_files(self.out_, loaded.metadata, self.data_)
        self._adopt(loaded)
        self.skipped_ = runs.read_split(self.out_).get("skipped", self.skipped_)

    # ----- the model file -----
    def save(self, path: str) -> str:
        """Write the classifier (resize + preprocessing + backbone + head) and its metadata to ``path``
        (``.keras``), atomically."""
        from transferkit.models import modelfile

        metadata = self._metadata()
        modelfile.save(self._fitted().model_, path, metadata)
        self.model_path_, self._saved, self._predictor, self._file_metadata = str(path), True, None, metadata
        return str(path)

    @classmethod
    def load(cls, path: str, *, runtime: str = ENGINE.runtime, precision: str = ENGINE.precision) -> "ImageClassifier":
        """A fitted classifier from a ``.keras`` model file; predictions run on ``runtime`` / ``precision``."""
        from transferkit.models import modelfile

        loaded = modelfile.load(str(path))
        stored = {k: v for k, v in loaded.metadata.get("training", {}).items() if k in TrainOptions.names()}
        clf = cls(**(stored | {"runtime": runtime, "precision": precision}))
        clf._adopt(loaded)
        clf._engine = EngineOptions(runtime=runtime, precision=precision)
        clf.out_, clf.model_path_, clf._saved = os.path.dirname(os.path.abspath(str(path))), str(path), True
        return clf

    def _adopt(self, loaded) -> None:
        """Take the model and what its metadata says it learned."""
        meta = loaded.metadata
        if self.options_ is None:
            try:
                self.options_ = TrainOptions(**self.get_params())
            except TransferkitError:  # a file from an older version: its record no longer validates
                self.options_ = TrainOptions(image_size=loaded.image_size)
        self.classes_, self.model_ = list(loaded.class_names), loaded.keras_model
        fit = meta.get("fit", {})
        self.history_, self.best_epoch_ = fit.get("history"), fit.get("best_epoch")
        self.validation_, self.test_, self.fine_tune_ = meta.get("validation"), meta.get("test"), meta.get("fine_tune")
        self._file_metadata = dict(meta)
        self.timing_ = dict(fit.get("timing", {}))
        self._set_model(loaded.keras_model, features_current=False)

    def _metadata(self) -> dict:
        """Everything the model file says about itself, built in this one place from the learned state."""
        import keras

        options = self._fitted().options_
        meta = dict(self._file_metadata) | {
            "format": "transferkit-model/2", "transferkit_version": __version__,
            "keras_version": keras.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "class_names": self.classes_, "backbone": options.backbone,
            "weights": runs.weights_id(options.weights), "image_size": options.size,
            "input": "RGB 0-255, any size (resized inside the model)",
            "training": runs.stored_options(options),
            "fit": {"best_epoch": self.best_epoch_, "history": self.history_, "timing": self.timing_,
                    "feature_runtime": self.extractor_.engine.label if self.extractor_ and self.extractor_.engine
                    else None},
        }
        if self.data_ is not None:
            meta["data"] = {"dir": os.path.abspath(self.data_.root), "fingerprint": self.data_.fingerprint,
                            "n_train": len(self.data_.train_paths), "n_val": len(self.data_.val_paths)}
        for name in ("validation", "test"):
            metrics = getattr(self, name + "_")
            if metrics:
                meta[name] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
        if self.fine_tune_:
            meta["fine_tune"] = {k: self.fine_tune_.get(k) for k in
                                 ("epochs", "unfreeze_top", "learning_rate", "blocks", "best_epoch")}
        return meta

    # ----- the run folder -----
    def summary(self) -> dict:
        """What ``metrics.json`` holds and ``transferkit.train`` returns."""
        result = {"model_path": self.model_path_, "validation": self.validation_, "best_epoch": self.best_epoch_,
                  "timing": self.timing_, "skipped": self.skipped_}
        if self.fine_tune_:
            result["fine_tune"] = {k: self.fine_tune_.get(k) for k in
                                   ("epochs", "unfreeze_top", "learning_rate", "blocks", "best_epoch", "history")}
        if self.test_:
            result["test"] = self.test_
            result["report"] = os.path.join(self.out_, "report.html")
        return result

    def _write_run(self) -> None:
        """history.json + history.png, metrics.json, and report.html when there are test metrics."""
        from transferkit.files import write_json_atomic
        from transferkit.reports.html import model_summary, write_report
        from transferkit.reports.plots import plot_history
        from transferkit.training.callbacks import MONITOR

        record = {"history": self.history_, "best_epoch": self.best_epoch_, "monitor": MONITOR}
        curves, best, boundary = self.history_, self.best_epoch_, None
        if self.fine_tune_:
            tuned = self.fine_tune_.get("history", {})
            boundary = len(self.history_["loss"])
            curves = {k: self.history_[k] + tuned.get(k, []) for k in self.history_}
            best = boundary + self.fine_tune_["best_epoch"] if self.fine_tune_.get("best_epoch") else best
            record |= {"fine_tune_history": tuned, "best_epoch": best, "head_best_epoch": self.best_epoch_}
        write_json_atomic(os.path.join(self.out_, "history.json"), record)
        history_png = plot_history(curves, os.path.join(self.out_, "history.png"), best, stage_boundary=boundary)
        if self.test_:
            title = f"Test report: {os.path.basename(os.path.abspath(self.out_))}"
            write_report(self.test_, self.out_, title=title, history_png=history_png,
                         model_info=model_summary(self._metadata()))
        write_json_atomic(os.path.join(self.out_, "metrics.json"), self.summary())

    # ----- helpers -----
    def _fitted(self) -> "ImageClassifier":
        if self.model_ is None:
            raise TransferkitError("this ImageClassifier is not fitted yet: call fit(data_dir) or "
                                   "ImageClassifier.load(path) first")
        return self

    def _set_model(self, model, *, features_current: bool) -> None:
        self.model_, self._features_current = model, features_current
        self._saved, self._predictor = False, None

    def _spec(self):
        from transferkit.models.backbones import get_spec

        return get_spec(self.options_.backbone)

    def _class_weights(self) -> dict | None:
        from transferkit.training.head import class_weights

        return class_weights(self.options_.class_weight, self.data_.y_train, len(self.classes_))
