"""``ImageClassifier``: the whole recipe as one object, shaped like scikit-learn's estimators and fastai's Learner.

    clf = ImageClassifier(backbone="efficientnet_lite0", epochs=30)     # stores options, validates nothing yet
    clf.fit("photos/", test_dir="test/", out="runs/fruit")              # -> self; learned state ends in "_"
    clf.classes_, clf.validation_["accuracy"], clf.test_["macro_f1"]
    clf.predict(["new/peach.jpg"], top_k=3)                             # rows: path, label, probability, top_k
    clf = ImageClassifier.load("runs/fruit/model.keras")                # the same object from the model file

``fit`` runs the stages in order, each a method a test can call on its own: ``prepare`` (validate the options,
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

import contextlib
import copy
import dataclasses
import datetime
import os
import time
from dataclasses import dataclass

import numpy as np

from transferkit._version import __version__
from transferkit.errors import NotFittedError, TransferkitError
from transferkit.log import logger
from transferkit.options import DEFAULT_ENGINE, EngineOptions, TrainOptions
from transferkit import runs

_LEARNED = ("classes_", "options_", "model_", "history_", "best_epoch_", "validation_", "test_", "fine_tune_",
            "skipped_", "timing_", "data_", "out_", "model_path_", "extractor_", "head_",
            "check_images_", "novelty_", "feature_check_", "head_choice_", "label_audit_",
            "duplicates_", "backbone_choice_")


@dataclass
class FeatureSplit:
    """Cached features of a run: augmented training views flattened, validation images, and the validation files
    that decoded (for the report)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    val_paths: list[str]
    train_paths: list[str] = dataclasses.field(default_factory=list)  # the decoded training files, in order


class ImageClassifier:
    """An image classifier trained by transfer learning. Keyword-only options: every field of
    :class:`transferkit.options.TrainOptions` (``backbone``, ``epochs``, ``augment_views``, ...)."""

    def __init__(self, **options):
        TrainOptions.check_names(options)  # a misspelt name fails here; values are checked by fit
        self._params = dict(options)
        self._reset()

    def _reset(self) -> None:
        """Forget everything learned (a second ``fit`` starts from nothing)."""
        for name in _LEARNED:
            setattr(self, name, None)
        self._engine = None  # EngineOptions of predictions, set by fit or load
        self._predictor = None
        self._features_current = False  # the backbone is the frozen one that extracted the cached features
        self._views_extractor = None  # the training views' extractor (a lower precision than extractor_'s)
        self._file_metadata = {}  # what the model file last written or read says about itself
        self._saved_to = None  # the file that holds model_ as it is now, if any
        self._log_dir = None  # TensorBoard logs of fit (its log_dir), if asked
        self._test_paths = []  # the test photos prepare found (their features are computed ahead of evaluate)

    # ----- parameters (scikit-learn's protocol) -----
    def get_params(self, deep: bool = True) -> dict:
        defaults = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
        return defaults | self._params

    def set_params(self, **params) -> "ImageClassifier":
        self.__init__(**(self._params | params))
        return self

    def __repr__(self) -> str:
        return f"ImageClassifier({', '.join(f'{k}={v!r}' for k, v in self._params.items())})"

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
    def metadata(self) -> dict:
        """What the model file says about itself (as written, once saved)."""
        return self._file_metadata if self._saved_to else self._metadata()

    @property
    def path(self) -> str:
        """The model file that holds this classifier as it is now ("" after a change not yet saved)."""
        return self._saved_to or ""

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of RGB 0-255 images at ``image_size`` (n, size, size, 3)."""
        if self._predictor is None:
            from transferkit.engines.keras_model import KerasPredictor

            self._predictor = KerasPredictor(self._fitted().model_, self.classes_, self.image_size,
                                             self.metadata, self.path, self._engine or DEFAULT_ENGINE,
                                             self.check_images_)
        return self._predictor.predict_images(images)

    def probabilities_for_files(self, paths: list[str], batch_size: int | None = None):
        """(probabilities, indices of ``paths`` that decoded, skipped files); from the feature cache while the
        backbone is the frozen one that extracted it (the same function, without a second backbone pass)."""
        batch_size = batch_size or self.options_.batch_size
        if self._features_current and self.extractor_ is not None:
            from transferkit.engines.keras_step import run_model

            features, kept, skipped = self.extractor_.extract(list(paths), 0, desc="features")
            return run_model(self.head_, features[:, 0]), kept, skipped
        from transferkit.engines.predict import predict_files

        return predict_files(self, list(paths), batch_size=batch_size)

    def map_forward(self):
        """A function NumPy images -> (the backbone's last feature map, the head's input) on the extractor's
        converted fp32 engines, for heat maps (``FeatureExtractor.map_forward``); None once the backbone is no
        longer the frozen one (fine-tuning started), and where the extractor has no such engine."""
        if not self._features_current or self.extractor_ is None:
            return None
        return self.extractor_.map_forward()

    # ----- using a fitted classifier -----
    def predict(self, paths, *, top_k: int = 3, reject: bool = True) -> list[dict]:
        """A row per image file (files, folders, globs): path, label, probability, top_k, novelty, unknown; or
        path and error. A photo of none of the classes gets ``unknown`` True and label None (``reject=False``:
        the nearest class)."""
        from transferkit.engines.predict import predict_rows

        return predict_rows(self._fitted(), paths, top_k=top_k, batch_size=self.options_.batch_size, reject=reject)

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
            callbacks=(), log_dir: str | None = None, ray: str | None = None) -> "ImageClassifier":
        """Train on ``data_dir/<class>/<images>`` (or a label file: ``labels.csv``, a Hugging Face imagefolder)
        and write the run folder ``out``. ``resume`` continues the interrupted second stage of ``out`` (same
        options, same files); ``callbacks`` are Keras callbacks for the second stage; ``log_dir``: TensorBoard
        logs of both stages there (``training.tensorboard``); ``ray``: compute the features missing from the
        cache on the Ray cluster at this address ("local": a local Ray instance; see transferkit.scale)."""
        from transferkit.training.finetune import read_state

        if log_dir:
            from transferkit.training.tensorboard import check_available

            check_available()
        started = time.perf_counter()
        self.prepare(data_dir, out=out, resume=resume, test_dir=test_dir)
        self._log_dir = str(log_dir) if log_dir else None
        if not test_dir and self.data_.test_source is not None:  # a label file's test rows
            test_dir = self.data_.test_source
        if resume and os.path.exists(self.model_path_):
            self._restore()
            if "total_seconds" in (self.timing_ or {}):  # written by the last save of a complete run
                raise TransferkitError(f"{self.out_}: this run already finished; nothing to resume")
        else:  # a new run, or one killed before its first model file: the cached features make this quick
            features = self.extract_features(ray=ray)
            ahead = self._test_features_ahead(test_dir)
            try:
                self.fit_head(features)
                self.audit_labels(features)
                if self.options_.fine_tune_epochs:  # the head-only model is safe on disk before the second stage
                    # (without one, the final save below is the only one: -1.1 s; and the only one converted)
                    self.save(self.model_path_, warm=False)
                self._write_records()
            finally:
                if ahead is not None:
                    ahead.stop()
        state = read_state(self.out_) if resume else None
        if state is not None and state.get("status") != "done":
            self.fine_tune(resume=True, callbacks=callbacks)
        elif state is None and self.options_.fine_tune_epochs:
            self.fine_tune(callbacks=callbacks)
        if test_dir:
            from transferkit.reports.metrics import text_report

            self.test_ = self.evaluate(test_dir)
            logger.info(text_report(self.test_))
        self.timing_["total_seconds"] = round(time.perf_counter() - started, 2)
        self.save(self.model_path_)
        self._write_run()
        logger.info(f"val_accuracy {self.validation_['accuracy']:.4f}; model written to {self.model_path_} "
                    f"({self.timing_['total_seconds']:.1f} s)")
        return self

    def prepare(self, data_dir: str, *, out: str | None = None, resume: bool = False,
                test_dir: str | None = None) -> "ImageClassifier":
        """The first stage: validate every option (before any image is read), scan and split ``data_dir``, check
        that ``test_dir``'s classes are the training classes, and only then make the run folder ``out``."""
        import keras

        from transferkit.data.folders import scan_folder, split_training_folder
        from transferkit.data.health import run_duplicates
        from transferkit.training.finetune import STATE_NAME

        self._reset()
        params = self.get_params()
        if isinstance(params["weights"], os.PathLike):
            params["weights"] = os.fspath(params["weights"])
        self.options_ = options = TrainOptions(**params).for_training()
        if resume and not out:
            raise TransferkitError("resume needs out, the run folder to continue (--resume --out RUN)")
        keras.utils.set_random_seed(options.seed)
        self.data_ = split_training_folder(data_dir, options.val_split, options.seed)
        if options.backbone == "auto":
            self.options_ = options = self._choose_backbone(options)
        test = None
        source = test_dir or self.data_.test_source  # a label file's test rows are the test set too
        if source is not None:  # what evaluate reads of it (a label file: its test rows where it has a split column)
            from transferkit.data import labelfile

            if labelfile.is_label_source(source):
                source = labelfile.for_evaluation(source)
            test = scan_folder(source, class_names=self.data_.class_names)
        self._test_paths = list(test.paths) if test is not None else []
        self.duplicates_ = run_duplicates(self.data_, test)  # exact copies, by the hashes the split computed
        self.classes_, self.skipped_ = list(self.data_.class_names), list(self.data_.skipped)
        self.out_ = str(out or runs.default_folder())
        self.model_path_ = os.path.join(self.out_, runs.MODEL_NAME)
        self.timing_, self._engine = {}, EngineOptions(runtime=options.runtime, precision=options.precision)
        os.makedirs(self.out_, exist_ok=True)
        runs.remove_partial_writes(self.out_)  # files a killed run was writing (the complete ones are intact)
        if not resume:
            runs.remove(self.out_, STATE_NAME)  # a new run: an older run's second stage is not ours to resume
        elif not os.path.exists(self.model_path_):  # else the model's record names the difference, at _restore
            runs.check_same_split(self.out_, self.data_)
        if not resume or not runs.read_split(self.out_):
            runs.write_split(self.out_, self.data_)
        return self

    def _choose_backbone(self, options: TrainOptions) -> TrainOptions:
        """``--backbone auto``: compare the offline backbones on this split (their features cached, so the
        winner's training reuses them) and continue with the pick; the comparison goes into the metadata."""
        from transferkit.training.compare import auto_candidates, compare_backbones

        values = {k: v for k, v in options.to_dict().items() if k != "backbone"}
        found = compare_backbones(self.data_.root, auto_candidates(), data=self.data_, **values)
        self.backbone_choice_ = {k: found[k] for k in ("results", "chosen", "reason", "notes", "rule", "head")}
        return dataclasses.replace(options, backbone=found["chosen"])

    def extract_features(self, ray: str | None = None) -> FeatureSplit:
        """Features of every training view and validation image, through the frozen backbone and its cache (the
        missing ones first computed on the Ray cluster at ``ray``, when given)."""
        from transferkit.engines import runtimes
        from transferkit.training.features import FeatureExtractor
        from transferkit.training.head import flatten_views

        options, data = self.options_, self.data_
        self.extractor_ = FeatureExtractor.from_options(options)  # validation, test: the reported numerics
        n_passes = len(data.train_paths) * (options.augment_views + 1)
        precision = runtimes.training_precision(options.feature_precision, options.runtime, n_passes)
        self._views_extractor = views = self.extractor_.with_precision(precision, data.train_paths)
        logger.info(f"{len(data.train_paths) + len(data.val_paths)} images in {len(data.class_names)} classes "
                    f"({len(data.skipped)} skipped); backbone {options.backbone} at {options.size}px; "
                    f"{len(data.train_paths)} train x {options.augment_views + 1} views ({views.precision}), "
                    f"{len(data.val_paths)} validation ({self.extractor_.precision})")
        t0 = time.perf_counter()
        if ray is not None:
            from transferkit.scale.features import prefill

            prefill(views, data.train_paths, options.augment_views, data.digests, ray)
            prefill(self.extractor_, data.val_paths, 0, data.digests, ray)
        f_train, kept_t, skip_t = views.extract(data.train_paths, options.augment_views, desc="train features",
                                                digests=data.digests)
        f_val, kept_v, skip_v = self.extractor_.extract(data.val_paths, 0, desc="validation features",
                                                        digests=data.digests)
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
        self.check_images_ = _check_images([data.val_paths[i] for i in kept_v], options.size)
        return FeatureSplit(x_train, y_views, f_val[:, 0], y_val, [data.val_paths[i] for i in kept_v],
                            [data.train_paths[i] for i in kept_t])

    def _test_features_ahead(self, test_dir: str | None):
        """The test photos' features computed on one core while the head is fitted on the other
        (``training.features.Prefetch``), where the evaluation will read them from the feature cache: a cached
        run, no fine-tuning (it moves the backbone), a converted engine (Keras's predict is not run from a
        second thread). None where it does not apply."""
        from transferkit.training.features import Prefetch

        extractor = self.extractor_
        if not (test_dir and self._test_paths and extractor.cache_root is not None and extractor.engine is not None
                and extractor.engine.runtime != "keras" and not self.options_.fine_tune_epochs):
            return None
        return Prefetch(extractor, self._test_paths)

    def fit_head(self, features: FeatureSplit) -> "ImageClassifier":
        """Train the head on ``features`` (``--head auto``: the best candidate on validation; ``refit``: then again
        on training + validation); the classifier becomes backbone + head. On one BLAS thread: scikit-learn's
        logistic regression fitted in half the time on one thread as on two, here (2 cores): 0.1 vs 0.34-0.72 s
        at 320 x 2336 features, 11-12 vs 22-24 s at 5,000 x 2336 (its softmax fit: 0.04 vs 0.13-0.15 s, 0.8 vs
        0.75 s), and it leaves the other core to the test photos' extraction (``_test_features_ahead``)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            return self._fit_head(features)

    def _fit_head(self, features: FeatureSplit) -> "ImageClassifier":
        from transferkit.engines.keras_step import run_model
        from transferkit.models import modelfile
        from transferkit.models.backbones import depth_dims
        from transferkit.models.novelty import fit_trust, split_outputs, trusted_head
        from transferkit.reports.metrics import compute_metrics

        t0 = time.perf_counter()
        dims = depth_dims(self.extractor_.model)
        chosen, found = self._choose_head(features, dims)
        self.history_, self.best_epoch_ = chosen.history, chosen.best_epoch
        head = self._refit(chosen, features, dims) if self.options_.refit else chosen.model
        self.head_choice_ = {"chosen": chosen.row(), "candidates": [c.row() for c in found],
                             "refit": bool(self.options_.refit)}
        self.head_ = trusted_head(head, novelty_dim=dims[0])
        views = self.options_.augment_views + 1  # flatten_views: an image's views are consecutive rows
        self.novelty_ = fit_trust(self.head_, (features.x_train, features.y_train),
                                  (features.x_val, features.y_val), len(self.classes_), self.options_.keep_known,
                                  groups=np.arange(len(features.y_train)) // views, novelty_dim=dims[0])
        self.timing_["head_seconds"] = round(time.perf_counter() - t0, 2)
        # validation as the model answers (calibrated), or after a refit the head as chosen, before it saw them
        measured = chosen.model if self.options_.refit else self.head_
        probs, _ = split_outputs(run_model(measured, features.x_val), len(self.classes_))
        self.validation_ = compute_metrics(features.y_val, probs, self.classes_, features.val_paths, self.skipped_)
        self.feature_check_ = self._check_view_features(features)
        self._set_model(modelfile.assemble(self.extractor_.model, self.head_), features_current=True)
        return self

    def _choose_head(self, features: FeatureSplit, dims: list[int]):
        """(the head to keep, every candidate compared): ``auto`` compares them on validation; an explicit head
        is the one candidate (on every extracted depth, with the views)."""
        from transferkit.training import select

        options = self.options_
        data = (features.x_train, features.y_train, features.x_val, features.y_val, options.augment_views + 1)
        if options.head == "auto":
            return select.select_head(options, data, dims, len(self.classes_), self._class_weights(),
                                      log_dir=self._log_dir)
        one = select.Candidate(options.head, len(dims) - 1, True)
        select.fit_candidate(one, options, data, dims, len(self.classes_), self._class_weights(),
                             log_dir=self._log_dir)
        if self._log_dir:
            from transferkit.training.tensorboard import write_candidates

            write_candidates(self._log_dir, [one], one)
        return one, [one]

    def _refit(self, chosen, features: FeatureSplit, dims: list[int]):
        """The chosen head fitted again on training + validation rows (softmax heads for the chosen epoch count;
        the validation metrics, measured before, no longer measure it)."""
        from transferkit.training import select

        options = self.options_
        if chosen.head != "logistic":  # a softmax head: the chosen epoch count, no early stop on seen rows
            options = dataclasses.replace(options, epochs=max(1, chosen.best_epoch or 1), patience=10_000)
        rows = slice(None) if chosen.views else slice(None, None, options.augment_views + 1)
        x = np.concatenate([features.x_train[rows], features.x_val])
        y = np.concatenate([features.y_train[rows], features.y_val])
        data = (x, y, features.x_val, features.y_val, 1)  # validation rows now train: every row is kept
        again = select.Candidate(chosen.head, chosen.depths, True)
        select.fit_candidate(again, options, data, dims, len(self.classes_), self._class_weights())
        logger.info(f"refitted {chosen.name} on {len(y)} training + validation rows (the validation metrics "
                    f"were measured before the refit)")
        return again.model

    def audit_labels(self, features: FeatureSplit) -> "ImageClassifier":
        """The label audit of the training folder (training and validation photos, their cached features):
        ``label_audit_`` (see ``training.audit``), written to the run folder and the report. Skipped, with a
        warning, where a class has too few photos for two folds."""
        from transferkit.training.audit import audit_labels

        views = self.options_.augment_views + 1
        x = np.concatenate([features.x_train[::views], features.x_val])
        y = np.concatenate([features.y_train[::views], features.y_val])
        try:
            self.label_audit_ = audit_labels(x, y, features.train_paths + features.val_paths, self.classes_)
        except TransferkitError as exc:
            logger.warning(f"no label audit: {exc}")
        return self

    def _check_view_features(self, features: FeatureSplit) -> dict | None:
        """Where the training views were computed in a lower precision than the reported numerics: the same
        validation photos through both, and how often the trained head gives them the same label."""
        from transferkit.engines import runtimes
        from transferkit.engines.keras_step import run_model

        views = self._views_extractor
        if views is None or views is self.extractor_:
            return None
        fast, kept, _ = copy.copy(views).uncached().extract(features.val_paths, 0, desc="validation check")
        exact = features.x_val[kept]
        same = runtimes.agreement(run_model(self.head_, fast[:, 0]), run_model(self.head_, exact), len(self.classes_))
        check = {"engine": f"{views.runtime} {views.precision}", "reference": f"{self.extractor_.runtime} "
                 f"{self.extractor_.precision}", "images": len(kept), "cosine": round(runtimes.cosine(fast[:, 0], exact), 5)}
        check |= {k: round(v, 4) for k, v in same.items()}
        logger.info(f"training views on {check['engine']}: feature cosine {check['cosine']:.4f} vs "
                    f"{check['reference']}; the head gives {check['label_agreement']:.1%} of the {len(kept)} "
                    f"validation photos the same label (every reported metric is {check['reference']})")
        return check

    def fine_tune(self, epochs: int | None = None, *, unfreeze_top: int | None = None,
                  learning_rate: float | None = None, resume: bool = False, callbacks=()) -> "ImageClassifier":
        """Second stage: unfreeze the top ``unfreeze_top`` backbone blocks and train end to end on augmented
        images at ``learning_rate`` (defaults: the options'); every better epoch is saved at once, and
        ``resume`` continues the run's interrupted stage from its last saved epoch."""
        from transferkit.models.novelty import has_trust, probability_view, reset_temperature
        from transferkit.training import finetune

        self._fitted()
        if self.data_ is None:
            raise TransferkitError("fine_tune needs the training images: call fit(data_dir) first, or "
                                   "fit(data_dir, out=RUN, resume=True) to continue a run")
        changes = {k: v for k, v in (("fine_tune_epochs", epochs), ("unfreeze_top", unfreeze_top),
                                     ("fine_tune_lr", learning_rate)) if v is not None}
        self.options_ = dataclasses.replace(self.options_, **changes)  # validated like every option
        t0 = time.perf_counter()
        images = self._decode_split()
        if has_trust(self.model_):
            reset_temperature(self.model_.get_layer("head"))  # trained at T = 1, calibrated again after
        state = self._fine_tune_state(finetune, self.options_, images, resume)
        options = self.options_
        if self._log_dir:
            from transferkit.training.tensorboard import fine_tune_callback

            callbacks = [*callbacks, fine_tune_callback(self._log_dir, state["epochs_done"])]
        # from here the backbone's weights move (in place, shared with extractor_.model): the cached features,
        # the converted extractor and its feature map (map_forward) no longer describe it, even if this stops
        self._set_model(self.model_, features_current=False)
        self.fine_tune_ = finetune.fine_tune(
            probability_view(self.model_, len(self.classes_)), self._spec(), images, state,
            save=self._checkpoint, out=self.out_, batch_size=options.batch_size, seed=options.seed,
            patience=options.patience, class_weights=self._class_weights(), callbacks=callbacks)
        self._set_model(self.model_, features_current=False)
        self._refit_trust(images)
        self._validate_on_images(images)
        self.timing_["fine_tune_seconds"] = round(time.perf_counter() - t0, 2)
        return self

    def _fine_tune_state(self, finetune, options: TrainOptions, images, resume: bool) -> dict:
        from transferkit.engines.keras_step import run_model
        from transferkit.models.novelty import split_outputs
        from transferkit.training.head import mean_log_loss

        if not resume:
            probs, _ = split_outputs(run_model(self.model_, images.x_val), len(self.classes_))
            val_loss = mean_log_loss(probs, images.y_val)
            return finetune.new_state(options.fine_tune_epochs, options.unfreeze_top, options.fine_tune_lr,
                                      (self.validation_["accuracy"], -val_loss))
        state = finetune.read_state(self.out_)
        if state is None:
            raise TransferkitError(f"{self.out_}: nothing to resume (no {finetune.STATE_NAME})")
        if state.get("status") == "done":
            raise TransferkitError(f"{self.out_}: fine-tuning already finished")
        logger.info(f"resuming fine-tuning in {self.out_}: {state['epochs_done']} of {state['epochs']} epochs done")
        self.options_ = dataclasses.replace(self.options_, fine_tune_epochs=state["epochs"],
                                            unfreeze_top=state["unfreeze_top"], fine_tune_lr=state["learning_rate"])
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
        from transferkit.models.novelty import split_outputs
        from transferkit.reports.metrics import compute_metrics

        probs, _ = split_outputs(run_model(self.model_, images.x_val), len(self.classes_))
        self.validation_ = compute_metrics(images.y_val, probs, self.classes_, self._val_paths, self.skipped_)

    def _refit_trust(self, images) -> None:
        """After fine-tuning the backbone's features moved: refit the temperature and the novelty statistics on
        them (training images for the statistics, validation for the temperature and threshold)."""
        from transferkit.engines.keras_step import run_model
        from transferkit.models.novelty import feature_view, fit_trust, has_trust, novelty_dim

        if not has_trust(self.model_):
            return
        features = feature_view(self.model_)
        train = (run_model(features, images.x_train), images.y_train)
        val = (run_model(features, images.x_val), images.y_val)
        head = self.model_.get_layer("head")
        self.novelty_ = fit_trust(head, train, val, len(self.classes_), self.options_.keep_known,
                                  novelty_dim=novelty_dim(head))

    def _checkpoint(self, state: dict) -> None:
        self.fine_tune_ = state
        self.save(self.model_path_, warm=False)  # a checkpoint: the final save converts

    def _restore(self) -> None:
        """For ``resume``: adopt the run's saved model after checking it was made with the same options and the
        same training files (anything else would change the split or the features)."""
        from transferkit.models import modelfile

        if not os.path.exists(self.model_path_):
            raise TransferkitError(f"{self.out_}: nothing to resume (no {runs.MODEL_NAME})")
        loaded = modelfile.load(self.model_path_)
        self.options_ = runs.check_resumable(self.out_, loaded.metadata, self.options_)
        runs.check_same_files(self.out_, loaded.metadata, self.data_)
        self._adopt(loaded)
        self.skipped_ = runs.read_split(self.out_).get("skipped", self.skipped_)

    # ----- the model file -----
    def save(self, path: str, *, warm: bool = True) -> str:
        """Write the classifier (resize + preprocessing + backbone + head) and its metadata to ``path``
        (``.keras``), atomically; ``warm``: also leave the converted, checked engine of the default engine
        (``DEFAULT_ENGINE``) in the cache, so that the first ``predict`` or ``serve`` of the file imports no
        TensorFlow (``engines.convert.warm``); not for a classifier trained on ``runtime="keras"``."""
        from transferkit.models import modelfile

        metadata = self._metadata()
        modelfile.save(self._fitted().model_, path, metadata, self.check_images_)
        self._saved_to, self._predictor, self._file_metadata = str(path), None, metadata
        if warm and self.options_.runtime != "keras":  # a run that ruled out converted engines converts none
            from transferkit.engines.convert import warm as cache_engine

            cache_engine(str(path), self.model_)
        return str(path)

    @classmethod
    def load(cls, path: str, *, runtime: str = DEFAULT_ENGINE.runtime,
             precision: str = DEFAULT_ENGINE.precision) -> "ImageClassifier":
        """A fitted classifier from a ``.keras`` model file; predictions run on ``runtime`` / ``precision``.
        What it learned comes from the file's metadata: ``validation_`` and ``test_`` hold the summaries stored
        there (accuracy, macro F1), not the full reports of the run folder."""
        from transferkit.engines.runtimes import resolve
        from transferkit.models import modelfile

        engine = EngineOptions(runtime=runtime, precision=precision)
        resolve(engine.runtime, engine.precision)  # an impossible engine fails here, not at the first prediction
        loaded = modelfile.load(str(path))
        training = loaded.metadata.get("training")
        stored = {k: v for k, v in (training if isinstance(training, dict) else {}).items()
                  if k in TrainOptions.names()}
        clf = cls(**stored)
        clf._adopt(loaded)
        clf._engine, clf.model_path_, clf._saved_to = engine, str(path), str(path)
        clf.out_ = os.path.dirname(os.path.abspath(str(path)))
        return clf

    def _adopt(self, loaded) -> None:
        """Take the model and what its metadata says it learned."""
        meta = loaded.metadata
        if self.options_ is None:
            self.options_ = runs.options_of(loaded.metadata, loaded.image_size, self.get_params())
        self.classes_, self.model_ = list(loaded.class_names), loaded.keras_model
        if loaded.check_images is not None or self.check_images_ is None:
            self.check_images_ = loaded.check_images
        fit = meta.get("fit") if isinstance(meta.get("fit"), dict) else {}
        self.history_, self.best_epoch_ = fit.get("history"), fit.get("best_epoch")
        self.feature_check_, self.head_choice_ = fit.get("feature_check"), fit.get("head_choice")
        self.validation_, self.test_, self.fine_tune_ = meta.get("validation"), meta.get("test"), meta.get("fine_tune")
        self.novelty_ = meta.get("novelty") if isinstance(meta.get("novelty"), dict) else None
        self.timing_ = dict(fit.get("timing", {}))
        self._set_model(loaded.keras_model, features_current=False)
        self._file_metadata = dict(meta)

    def _metadata(self) -> dict:
        """Everything the model file says about itself, built in this one place from the learned state."""
        import keras

        options = self._fitted().options_
        training = runs.stored_options(options)  # hashes a local weights file once
        meta = dict(self._file_metadata) | {
            "format": runs.FORMAT, "transferkit_version": __version__,
            "keras_version": keras.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "class_names": self.classes_, "backbone": options.backbone,
            "image_size": options.size, "input": "RGB 0-255, any size (resized inside the model)",
            "training": training, "weights": training["weights"],
            "fit": {"best_epoch": self.best_epoch_, "history": copy.deepcopy(self.history_),
                    "timing": dict(self.timing_ or {}), "feature_runtime": self._feature_runtime(),
                    "feature_check": self.feature_check_, "head_choice": self.head_choice_},
        }
        if self.data_ is not None:
            meta["data"] = {"dir": os.path.abspath(self.data_.root), "fingerprint": self.data_.fingerprint,
                            "n_train": len(self.data_.train_paths), "n_val": len(self.data_.val_paths)}
            meta["data"] |= runs.data_record(self.data_, self.skipped_, self.duplicates_)
        for name in ("validation", "test"):
            metrics = getattr(self, name + "_")
            if metrics:
                meta[name] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
                meta[name] |= runs.metrics_record(metrics)
        meta |= runs.backbone_record(options)
        if self.backbone_choice_:
            meta["backbone_choice"] = self.backbone_choice_
        if self.novelty_:
            meta["novelty"] = dict(self.novelty_)
        if self.fine_tune_:
            meta["fine_tune"] = {k: self.fine_tune_.get(k) for k in
                                 ("epochs", "unfreeze_top", "learning_rate", "blocks", "best_epoch")}
        return meta

    def _feature_runtime(self) -> str | None:
        views = self._views_extractor or self.extractor_
        if views is not None and views.engine is not None:
            return views.engine.label
        return self._file_metadata.get("fit", {}).get("feature_runtime")

    # ----- the run folder -----
    def summary(self) -> dict:
        """What ``metrics.json`` holds and ``transferkit.train`` returns (a dict a notebook shows as tables)."""
        from transferkit.reports.metrics import Metrics

        result = Metrics({"model_path": self.model_path_, "validation": self.validation_,
                          "best_epoch": self.best_epoch_, "timing": self.timing_, "skipped": self.skipped_})
        if self.head_choice_:
            result["head_choice"] = self.head_choice_
        if self.fine_tune_:
            result["fine_tune"] = {k: self.fine_tune_.get(k) for k in
                                   ("epochs", "unfreeze_top", "learning_rate", "blocks", "best_epoch", "history")}
        if self.label_audit_ is not None:
            result["label_audit"] = self.label_audit_.to_json()
        if self.test_:
            result["test"] = self.test_
            result["report"] = os.path.join(self.out_, "report.html")
        return result

    def _curves(self) -> tuple[dict, dict, int | None]:
        """(history.json's record, both stages' curves end to end, the epoch where the second stage began)."""
        from transferkit.training.callbacks import MONITOR

        record = {"history": self.history_, "best_epoch": self.best_epoch_, "monitor": MONITOR}
        if not self.fine_tune_:
            return record, self.history_, None
        tuned = self.fine_tune_.get("history", {})
        boundary = len(self.history_["loss"])
        best = boundary + self.fine_tune_["best_epoch"] if self.fine_tune_.get("best_epoch") else self.best_epoch_
        record |= {"fine_tune_history": tuned, "best_epoch": best, "head_best_epoch": self.best_epoch_}
        return record, {k: self.history_[k] + tuned.get(k, []) for k in self.history_}, boundary

    def _write_records(self) -> dict:
        """history.json and metrics.json (after the head stage already, so an interrupted run has them)."""
        from transferkit.files import write_json_atomic

        record = self._curves()[0]
        write_json_atomic(os.path.join(self.out_, "history.json"), record)
        write_json_atomic(os.path.join(self.out_, "metrics.json"), self.summary())
        return record

    def _write_run(self) -> None:
        """The records, MODEL_CARD.md, history.png, and report.html when there are test metrics."""
        from transferkit.reports.card import write_model_card
        from transferkit.reports.explain import report_overlays
        from transferkit.reports.html import model_summary, write_report
        from transferkit.reports.plots import plot_history

        record = self._write_records()
        write_model_card(self.metadata, os.path.join(self.out_, runs.CARD_NAME))
        _, curves, boundary = self._curves()
        history_png = plot_history(curves, os.path.join(self.out_, "history.png"), record["best_epoch"],
                                   stage_boundary=boundary)
        section = ""
        if self.label_audit_ is not None:
            from transferkit.reports.html import label_audit_section
            from transferkit.training.audit import CSV_NAME, write_csv

            written = write_csv(self.label_audit_, os.path.join(self.out_, CSV_NAME))
            section = label_audit_section(self.label_audit_, written)
        if self.test_:
            title = f"Test report: {os.path.basename(os.path.abspath(self.out_))}"
            write_report(self.test_, self.out_, title=title, history_png=history_png,
                         model_info=model_summary(self.metadata), overlays=report_overlays(self, self.test_),
                         sections=section)

    # ----- helpers -----
    def _fitted(self) -> "ImageClassifier":
        if self.model_ is None:
            raise NotFittedError("this ImageClassifier is not fitted yet: call fit(data_dir) or "
                                   "ImageClassifier.load(path) first")
        return self

    def _set_model(self, model, *, features_current: bool) -> None:
        self.model_, self._features_current = model, features_current
        self._saved_to, self._predictor = None, None

    def _spec(self):
        from transferkit.models.backbones import get_spec

        return get_spec(self.options_.backbone)

    def _class_weights(self) -> dict | None:
        from transferkit.training.head import class_weights

        return class_weights(self.options_.class_weight, self.data_.y_train, len(self.classes_))


def _check_images(paths: list[str], size: int, limit: int = 8) -> np.ndarray | None:
    """A few validation photos at the model's size, stored in the model file: every engine that runs the model
    (OpenVINO, onnxruntime, bf16) is checked against Keras on them, never on synthetic input."""
    from transferkit.data.images import UnreadableImage, load_image

    images = []
    for path in paths[: limit * 2]:
        with contextlib.suppress(UnreadableImage):
            images.append(load_image(path, size))
        if len(images) == limit:
            break
    return np.stack(images) if images else None

