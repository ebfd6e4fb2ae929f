"""The trainer: the stages of a fit, in order, on one ``FitState`` (fastai's Learner without the model zoo).

    prepare   validate the options (before any image is read), scan, split, make the run folder
    features  cached frozen-backbone features of every training view and validation photo
    head      the head chosen on validation (``--head auto``), the trust statistics, the label audit
    fine_tune the second stage, when asked (every better epoch saved at once; ``--resume`` continues it)
    evaluate  the test photos, through the one evaluation

Each stage is a method a test can call on its own and runs inside ``events.stage(name, state)``, where the
plug-ins (``training.events``: TensorBoard, the test photos' features computed ahead) hook in. What depends on
the task (the head's output, loss, linear fit, calibration, metrics) is asked of ``state.task``. The trainer
saves and evaluates through its ``owner`` (``ImageClassifier``): the model file and the predictor are the
facade's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import numpy as np

from transferkit import runs
from transferkit.errors import TransferkitError
from transferkit.log import logger
from transferkit.options import EngineOptions, TrainOptions
from transferkit.training import reference
from transferkit.training.events import StageEvents
from transferkit.training.state import FeatureSplit, FitState


class Trainer:
    """Runs the stages of a fit on ``state`` for ``owner`` (what it saves with and evaluates through)."""

    def __init__(self, state: FitState, owner, events: StageEvents | None = None):
        self.state, self.owner, self.events = state, owner, events or StageEvents()

    # ----- prepare -----
    def prepare(self, params: dict, data_dir: str, *, out: str | None = None, resume: bool = False,
                test_dir: str | None = None, add=()) -> FitState:
        """The first stage: validate every option (before any image is read), scan and split ``data_dir``, check
        that ``test_dir``'s classes are the training classes, and only then make the run folder ``out``."""
        import keras

        from transferkit.data.folders import split_training_folder
        from transferkit.data.health import run_duplicates
        from transferkit.tasks import task_for

        st = self.state
        if isinstance(params["weights"], os.PathLike):
            params = params | {"weights": os.fspath(params["weights"])}
        st.options = options = TrainOptions(**params).for_training()
        st.task = task_for(options)
        if resume and not out:
            raise TransferkitError("resume needs out, the run folder to continue (--resume --out RUN)")
        with self.events.stage("prepare", st):
            keras.utils.set_random_seed(options.seed)
            st.data = split_training_folder(data_dir, options.val_split, options.seed,
                                            multi_label=options.multi_label, label_sep=options.label_sep)
            if add:  # label files joined to the training side only (data/added.py)
                from transferkit.data.added import add_training_rows

                st.data = add_training_rows(st.data, list(add))
            if options.backbone == "auto":
                st.options = self._choose_backbone(options)
            test = self._scan_test(test_dir)
            st.test_paths = list(test.paths) if test is not None else []
            st.duplicates = run_duplicates(st.data, test)  # exact copies, by the hashes the split computed
            st.classes, st.skipped = list(st.data.class_names), list(st.data.skipped)
            st.out = str(out or runs.default_folder())
            st.model_path = os.path.join(st.out, runs.MODEL_NAME)
            st.timing = {}
            self.owner.engine = EngineOptions(runtime=st.options.runtime, precision=st.options.precision)
            self._make_run_folder(resume)
        return st

    def _scan_test(self, test_dir: str | None):
        """The test set's scan (a label file: its test rows where it has a split column), or None."""
        from transferkit.data.folders import scan_folder

        source = test_dir or self.state.data.test_source  # a label file's test rows are the test set too
        if source is None:
            return None
        from transferkit.data import labelfile

        if labelfile.is_label_source(source):
            source = labelfile.for_evaluation(labelfile.for_task(source, self.state.options))
        return scan_folder(source, class_names=self.state.data.class_names)

    def _make_run_folder(self, resume: bool) -> None:
        from transferkit.training.finetune import STATE_NAME

        st = self.state
        os.makedirs(st.out, exist_ok=True)
        runs.remove_partial_writes(st.out)  # files a killed run was writing (the complete ones are intact)
        if not resume:
            runs.remove(st.out, STATE_NAME)  # a new run: an older run's second stage is not ours to resume
        elif not os.path.exists(st.model_path):  # else the model's record names the difference, at restore
            runs.check_same_split(st.out, st.data)
        if not resume or not runs.read_split(st.out):
            runs.write_split(st.out, st.data)

    def _choose_backbone(self, options: TrainOptions) -> TrainOptions:
        """``--backbone auto``: compare the offline backbones on this split (their features cached, so the
        winner's training reuses them) and continue with the pick; the comparison goes into the metadata."""
        from transferkit.training.compare import auto_candidates, compare_backbones

        values = {k: v for k, v in options.to_dict().items() if k != "backbone"}
        found = compare_backbones(self.state.data.root, auto_candidates(), data=self.state.data, **values)
        self.state.backbone_choice = {k: found[k] for k in ("results", "chosen", "reason", "notes", "rule", "head")}
        return dataclasses.replace(options, backbone=found["chosen"])

    # ----- the whole fit -----
    def run(self, test_dir: str | None, resume: bool, ray: str | None, callbacks=()) -> FitState:
        """Every stage after ``prepare``: features and head (or, resuming, the run's saved model), fine-tuning
        when asked or interrupted, the test evaluation."""
        from transferkit.training.finetune import read_state

        st = self.state
        try:
            if resume and os.path.exists(st.model_path):
                self.restore()
                if "total_seconds" in (st.timing or {}):  # written by the last save of a complete run
                    raise TransferkitError(f"{st.out}: this run already finished; nothing to resume")
            else:  # a new run, or one killed before its first model file: the cached features make this quick
                self.first_stage(ray)
            state = read_state(st.out) if resume else None
            if state is not None and state.get("status") != "done":
                self.fine_tune(resume=True, callbacks=callbacks)
            elif state is None and st.options.fine_tune_epochs:
                self.fine_tune(callbacks=callbacks)
            if test_dir:
                self.evaluate(test_dir)
        finally:
            self.events.train_end(st)
        return st

    def first_stage(self, ray: str | None) -> None:
        """Features, head, label audit; the head-only model saved before a second stage; the records."""
        from transferkit.reports.run import RunWriter

        features = self.extract_features(ray=ray)
        self.fit_head(features)
        self.audit_labels(features)
        if self.state.options.fine_tune_epochs:  # the head-only model is safe on disk before the second stage
            # (without one, the final save is the only one: -1.1 s; and the only one converted)
            self.owner.save(self.state.model_path, warm=False)
        RunWriter(self.state).write_records()

    def evaluate(self, test_dir: str) -> dict:
        with self.events.stage("evaluate", self.state):
            self.state.test = self.owner.evaluate(test_dir)
            logger.info(self.state.task.text_report(self.state.test))
        return self.state.test

    # ----- features -----
    def extract_features(self, ray: str | None = None) -> FeatureSplit:
        """Features of every training view and validation image, through the frozen backbone and its cache (the
        missing ones first computed on the Ray cluster at ``ray``, when given)."""
        with self.events.stage("features", self.state):
            return self._extract_features(ray)

    def _extract_features(self, ray: str | None) -> FeatureSplit:
        from transferkit.engines import runtimes
        from transferkit.training.features import FeatureExtractor
        from transferkit.training.head import flatten_views

        st, options, data = self.state, self.state.options, self.state.data
        st.extractor = extractor = FeatureExtractor.from_options(options)  # validation, test: the reported numerics
        n_passes = len(data.train_paths) * (options.augment_views + 1)
        precision = runtimes.training_precision(options.feature_precision, options.runtime, n_passes)
        st.views_extractor = views = extractor.with_precision(precision, data.train_paths)
        logger.info(f"{len(data.train_paths) + len(data.val_paths)} images in {len(data.class_names)} classes "
                    f"({len(data.skipped)} skipped); backbone {options.backbone} at {options.size}px; "
                    f"{len(data.train_paths)} train x {options.augment_views + 1} views ({views.precision}), "
                    f"{len(data.val_paths)} validation ({extractor.precision})")
        t0 = time.perf_counter()
        if ray is not None:
            from transferkit.scale.features import prefill

            prefill(views, data.train_paths, options.augment_views, data.digests, ray)
            prefill(extractor, data.val_paths + data.negative_paths, 0, data.digests, ray)
        f_train, kept_t, skip_t = views.extract(data.train_paths, options.augment_views, desc="train features",
                                                digests=data.digests)
        f_val, kept_v, skip_v = extractor.extract(data.val_paths, 0, desc="validation features",
                                                  digests=data.digests)
        x_negative, skip_n = self._negative_features(extractor)
        st.timing["feature_seconds"] = round(time.perf_counter() - t0, 2)
        st.skipped = data.skipped + skip_t + skip_v + skip_n
        y_train, y_val = data.y_train[kept_t], data.y_val[kept_v]
        self._check_every_class(y_train, y_val)
        x_train, y_views = flatten_views(f_train, y_train)
        val_paths = [data.val_paths[i] for i in kept_v]
        st.check_images = _check_images(val_paths, options.size)
        return FeatureSplit(x_train, y_views, f_val[:, 0], y_val, val_paths, [data.train_paths[i] for i in kept_t],
                            x_negative)

    def _negative_features(self, extractor) -> tuple[np.ndarray | None, list[dict]]:
        """(features, skipped) of the photos labelled unknown (``train --add``, data/added.py), through the
        validation extractor and its cache; None without any: the novelty score's "none of these" examples."""
        paths = self.state.data.negative_paths
        if not paths:
            return None, []
        found, kept, skipped = extractor.extract(paths, 0, desc="unknown features", digests=self.state.data.digests)
        logger.info(f"{len(kept)} photo(s) labelled unknown: the unknown score's 'none of these' examples")
        return (found[:, 0] if len(kept) else None), skipped

    def _check_every_class(self, y_train: np.ndarray, y_val: np.ndarray) -> None:
        data = self.state.data
        present = np.flatnonzero(y_train.any(axis=0)) if y_train.ndim == 2 else y_train
        missing = sorted(set(range(len(data.class_names))) - set(present.tolist()))
        if missing:
            raise TransferkitError(f"{data.root}: class '{data.class_names[missing[0]]}' has no readable "
                                   f"training image")
        if len(y_val) == 0:
            raise TransferkitError(f"{data.root}: no readable validation image")

    # ----- head -----
    def fit_head(self, features: FeatureSplit) -> FitState:
        """Train the head on ``features`` (``--head auto``: the best candidate on validation; ``refit``: then
        again on training + validation) and fit the trust statistics; the classifier becomes
        backbone + head. On one BLAS thread: scikit-learn's logistic regression fitted in half the time on one
        thread as on two, here (2 cores): 0.1 vs 0.34-0.72 s at 320 x 2336 features, 11-12 vs 22-24 s at 5,000
        x 2336 (its softmax fit: 0.04 vs 0.13-0.15 s, 0.8 vs 0.75 s), and it leaves the other core to the test
        photos' extraction (``events.PrefetchTest``)."""
        from threadpoolctl import threadpool_limits

        with self.events.stage("head", self.state), threadpool_limits(1):
            self._fit_head(features)
        return self.state

    def _fit_head(self, features: FeatureSplit) -> None:
        from transferkit.engines.keras_step import run_model
        from transferkit.models import modelfile
        from transferkit.models.backbones import depth_dims
        from transferkit.models.novelty import split_outputs, trusted_head

        st, t0 = self.state, time.perf_counter()
        dims = depth_dims(st.extractor.model)
        chosen, found = self._choose_head(features, dims)
        st.candidates, st.chosen = found, chosen
        st.history, st.best_epoch = chosen.history, chosen.best_epoch
        head = self._refit(chosen, features, dims) if st.options.refit else chosen.model
        st.head_choice = {"chosen": chosen.row(), "candidates": [c.row() for c in found],
                          "refit": bool(st.options.refit)}
        st.head = trusted_head(head, novelty_dim=dims[0], activation=st.task.activation)
        views = st.options.augment_views + 1  # flatten_views: an image's views are consecutive rows
        held_out = self._held_out_logits(chosen, features, dims)
        st.novelty = st.task.fit_trust(st.head, (features.x_train, features.y_train),
                                       (features.x_val, features.y_val), len(st.classes), st.options.keep_known,
                                       groups=np.arange(len(features.y_train)) // views, novelty_dim=dims[0],
                                       held_out=held_out, **_negatives(features.x_negative))
        st.timing["head_seconds"] = round(time.perf_counter() - t0, 2)
        # validation as the model answers (calibrated), or after a refit the head as chosen, before it saw them
        measured = chosen.model if st.options.refit else st.head
        probs, scores = split_outputs(run_model(measured, features.x_val), len(st.classes))
        st.task.fit_decision(probs, features.y_val)  # multi-label: each label's threshold
        st.validation = st.task.metrics(features.y_val, probs, st.classes, features.val_paths, st.skipped)
        st.reference = reference.summary(probs, scores, st.classes, st.task)
        self._fit_conformal(None if st.options.refit else (probs, features.y_val),
                            (features.x_train[::views], features.y_train[::views]),
                            None if held_out is None else tuple(a[: len(a) - len(features.y_val)] for a in held_out))
        st.feature_check = self._check_view_features(features)
        st.set_model(modelfile.assemble(st.extractor.model, st.head), features_current=True)

    def _fit_conformal(self, val: tuple | None, train: tuple, out_of_fold: tuple | None = None) -> None:
        """The conformal calibration (``models.conformal``) on the held-out calibrated probabilities ``val`` of
        the model (None: the validation photos trained it) and out-of-fold ones of the training ``features``;
        multi-label (``models.conformal_labels``): ``val`` and ``out_of_fold``, the out-of-fold training rows of
        the temperature's held-out (logits, labels), through the model's per-label temperatures."""
        from transferkit.models.conformal import fit_held_out

        st = self.state
        st.conformal = (self._fit_label_conformal(val, out_of_fold) if st.task.multi_label
                        else fit_held_out(val, train, len(st.classes)))
        if st.conformal:
            logger.info(f"conformal calibration on {st.conformal['n']} held-out photos ({st.conformal['fitted_on']})")

    def _fit_label_conformal(self, val: tuple | None, out_of_fold: tuple | None) -> dict | None:
        """The multi-label calibration (``models.conformal_labels``) on validation ``val`` (probs, y) and
        ``out_of_fold`` (logits, y) of the training photos through the model's per-label temperatures."""
        from transferkit.models.conformal_labels import fit_label_conformal
        from transferkit.tasks.multi_label import sigmoid

        st, parts = self.state, [] if val is None else [(np.asarray(val[0], np.float64), np.asarray(val[1]))]
        if out_of_fold is not None and len(out_of_fold[1]):
            logits = np.asarray(out_of_fold[0], np.float64)
            temperatures = np.asarray((st.novelty or {}).get("temperatures") or np.ones(logits.shape[1]), np.float64)
            parts.append((sigmoid(logits / temperatures), np.asarray(out_of_fold[1])))
        if not parts:
            return None
        fitted_on = {"validation": 0 if val is None else int(len(val[1])),
                     "out_of_fold": 0 if out_of_fold is None else int(len(out_of_fold[1]))}
        return fit_label_conformal(np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts]),
                                   list(st.classes), st.task.decision_thresholds(len(st.classes)), fitted_on)

    def _held_out_logits(self, chosen, features: FeatureSplit, dims: list[int]):
        """The temperature's held-out (logits, labels): out-of-fold training photos and validation."""
        from transferkit.training import select

        st = self.state
        data = (features.x_train, features.y_train, features.x_val, features.y_val, st.options.augment_views + 1)
        return select.held_out_logits(chosen, st.options, data, dims, len(st.classes), self.class_weights(), st.task)

    def _choose_head(self, features: FeatureSplit, dims: list[int]):
        """(the head to keep, every candidate compared): ``auto`` compares them on validation; an explicit head
        is the one candidate (on every extracted depth, with the views)."""
        from transferkit.training import select

        st, options = self.state, self.state.options
        data = (features.x_train, features.y_train, features.x_val, features.y_val, options.augment_views + 1)
        if options.head == "auto":
            return select.select_head(options, data, dims, len(st.classes), self.class_weights(), st.task)
        one = select.Candidate(options.head, len(dims) - 1, True)
        select.fit_candidate(one, options, data, dims, len(st.classes), self.class_weights(), st.task)
        return one, [one]

    def _refit(self, chosen, features: FeatureSplit, dims: list[int]):
        """The chosen head fitted again on training + validation rows (softmax heads for the chosen epoch count;
        the validation metrics, measured before, no longer measure it)."""
        from transferkit.training import select

        st, options = self.state, self.state.options
        if chosen.head != "logistic":  # a softmax head: the chosen epoch count, no early stop on seen rows
            options = dataclasses.replace(options, epochs=max(1, chosen.best_epoch or 1), patience=10_000)
        rows = slice(None) if chosen.views else slice(None, None, options.augment_views + 1)
        x = np.concatenate([features.x_train[rows], features.x_val])
        y = np.concatenate([features.y_train[rows], features.y_val])
        data = (x, y, features.x_val, features.y_val, 1)  # validation rows now train: every row is kept
        again = select.Candidate(chosen.head, chosen.depths, True)
        select.fit_candidate(again, options, data, dims, len(st.classes), self.class_weights(), st.task)
        logger.info(f"refitted {chosen.name} on {len(y)} training + validation rows (the validation metrics "
                    f"were measured before the refit)")
        return again.model

    def audit_labels(self, features: FeatureSplit) -> FitState:
        """The label audit of the training folder (training and validation photos, their cached features):
        ``label_audit`` (see ``training.audit``), written to the run folder and the report. Skipped, with a
        warning, where a class has too few photos for two folds."""
        st = self.state
        views = st.options.augment_views + 1
        x = np.concatenate([features.x_train[::views], features.x_val])
        y = np.concatenate([features.y_train[::views], features.y_val])
        try:
            st.label_audit = st.task.audit(x, y, features.train_paths + features.val_paths, st.classes)
        except TransferkitError as exc:
            logger.warning(f"no label audit: {exc}")
        return st

    def _check_view_features(self, features: FeatureSplit) -> dict | None:
        """Where the training views were computed in a lower precision than the reported numerics: the same
        validation photos through both, and how often the trained head gives them the same label."""
        import copy

        from transferkit.engines import runtimes
        from transferkit.engines.keras_step import run_model

        st, views = self.state, self.state.views_extractor
        if views is None or views is st.extractor:
            return None
        fast, kept, _ = copy.copy(views).uncached().extract(features.val_paths, 0, desc="validation check")
        exact = features.x_val[kept]
        same = runtimes.agreement(run_model(st.head, fast[:, 0]), run_model(st.head, exact), len(st.classes))
        check = {"engine": f"{views.runtime} {views.precision}", "reference": f"{st.extractor.runtime} "
                 f"{st.extractor.precision}", "images": len(kept), "cosine": round(runtimes.cosine(fast[:, 0], exact), 5)}
        check |= {k: round(v, 4) for k, v in same.items()}
        logger.info(f"training views on {check['engine']}: feature cosine {check['cosine']:.4f} vs "
                    f"{check['reference']}; the head gives {check['label_agreement']:.1%} of the {len(kept)} "
                    f"validation photos the same label (every reported metric is {check['reference']})")
        return check

    def class_weights(self) -> dict | None:
        st = self.state
        return st.task.class_weights(st.options.class_weight, st.data.y_train, len(st.classes))

    # ----- fine-tune -----
    def fine_tune(self, epochs: int | None = None, *, unfreeze_top: int | None = None,
                  learning_rate: float | None = None, resume: bool = False, callbacks=()) -> FitState:
        """Second stage: unfreeze the top ``unfreeze_top`` backbone blocks and train end to end on augmented
        images at ``learning_rate`` (defaults: the options'); every better epoch is saved at once, and
        ``resume`` continues the run's interrupted stage from its last saved epoch."""
        from transferkit.models.novelty import has_trust, reset_temperature
        from transferkit.training import finetune

        st = self.state
        if st.data is None:
            raise TransferkitError("fine_tune needs the training images: call fit(data_dir) first, or "
                                   "fit(data_dir, out=RUN, resume=True) to continue a run")
        changes = {k: v for k, v in (("fine_tune_epochs", epochs), ("unfreeze_top", unfreeze_top),
                                     ("fine_tune_lr", learning_rate)) if v is not None}
        st.options = dataclasses.replace(st.options, **changes)  # validated like every option
        with self.events.stage("fine_tune", st):
            t0 = time.perf_counter()
            images = self._decode_split()
            if has_trust(st.model):
                reset_temperature(st.model.get_layer("head"))  # trained at T = 1, calibrated again after
            state = self._fine_tune_state(finetune, images, resume)
            self._run_fine_tune(finetune, images, state, callbacks)
            st.timing["fine_tune_seconds"] = round(time.perf_counter() - t0, 2)
        return st

    def _run_fine_tune(self, finetune, images, state: dict, callbacks) -> None:
        from transferkit.models.novelty import probability_view

        st, options = self.state, self.state.options
        callbacks = [*callbacks, *self.events.keras_callbacks("fine_tune", st, state["epochs_done"])]
        # from here the backbone's weights move (in place, shared with extractor.model): the cached features,
        # the converted extractor and its feature map (map_forward) no longer describe it, even if this stops
        st.set_model(st.model, features_current=False)
        st.fine_tune = finetune.fine_tune(
            probability_view(st.model, len(st.classes)), self._spec(), images, state,
            save=self._checkpoint, out=st.out, batch_size=options.batch_size, seed=options.seed,
            patience=options.patience, sample_weights=st.task.sample_weights(self.class_weights(), images.y_train),
            callbacks=callbacks, loss=st.task.loss)
        st.set_model(st.model, features_current=False)
        self._refit_trust(images)
        self._validate_on_images(images)

    def _fine_tune_state(self, finetune, images, resume: bool) -> dict:
        from transferkit.engines.keras_step import run_model
        from transferkit.models.novelty import split_outputs

        st, options = self.state, self.state.options
        if not resume:
            probs, _ = split_outputs(run_model(st.model, images.x_val), len(st.classes))
            return finetune.new_state(options.fine_tune_epochs, options.unfreeze_top, options.fine_tune_lr,
                                      st.task.fine_tune_key(st.validation, probs, images.y_val))
        state = finetune.read_state(st.out)
        if state is None:
            raise TransferkitError(f"{st.out}: nothing to resume (no {finetune.STATE_NAME})")
        if state.get("status") == "done":
            raise TransferkitError(f"{st.out}: fine-tuning already finished")
        logger.info(f"resuming fine-tuning in {st.out}: {state['epochs_done']} of {state['epochs']} epochs done")
        st.options = dataclasses.replace(st.options, fine_tune_epochs=state["epochs"],
                                         unfreeze_top=state["unfreeze_top"], fine_tune_lr=state["learning_rate"])
        return state

    def _decode_split(self):
        from transferkit.training.finetune import ImageSplit, decode_all

        st = self.state
        data, size = st.data, st.options.size
        x_train, kept_t = decode_all(data.train_paths, size)
        x_val, kept_v = decode_all(data.val_paths, size)
        st.val_paths = [data.val_paths[i] for i in kept_v]
        return ImageSplit(x_train, data.y_train[kept_t], x_val, data.y_val[kept_v])

    def _validate_on_images(self, images) -> None:
        from transferkit.engines.keras_step import run_model
        from transferkit.models.novelty import split_outputs

        st = self.state
        probs, scores = split_outputs(run_model(st.model, images.x_val), len(st.classes))
        st.task.fit_decision(probs, images.y_val)
        st.validation = st.task.metrics(images.y_val, probs, st.classes, st.val_paths, st.skipped)
        st.reference = reference.summary(probs, scores, st.classes, st.task)

    def _refit_trust(self, images) -> None:
        """After fine-tuning the backbone's features moved: refit the temperature and the novelty statistics on
        them (training images for the statistics, validation for the temperature and threshold)."""
        from transferkit.engines.keras_step import run_model
        from transferkit.models.novelty import feature_view, has_trust, novelty_dim, split_outputs

        st = self.state
        if not has_trust(st.model):
            return
        features = feature_view(st.model)
        train = (run_model(features, images.x_train), images.y_train)
        val = (run_model(features, images.x_val), images.y_val)
        head = st.model.get_layer("head")
        negatives = self._negative_images()
        st.novelty = st.task.fit_trust(head, train, val, len(st.classes), st.options.keep_known,
                                       novelty_dim=novelty_dim(head),
                                       **_negatives(None if negatives is None else run_model(features, negatives)))
        probs, _ = split_outputs(run_model(head, val[0]), len(st.classes))
        self._fit_conformal((probs, images.y_val), train)

    def _negative_images(self):
        """The decoded photos labelled unknown (``train --add``), or None without any."""
        from transferkit.training.finetune import decode_all

        paths = self.state.data.negative_paths
        found = decode_all(paths, self.state.options.size)[0] if paths else None
        return found if found is not None and len(found) else None

    def _checkpoint(self, state: dict) -> None:
        self.state.fine_tune = state
        self.owner.save(self.state.model_path, warm=False)  # a checkpoint: the final save converts

    def _spec(self):
        from transferkit.models.backbones import get_spec

        return get_spec(self.state.options.backbone)

    # ----- resume -----
    def restore(self) -> None:
        """For ``resume``: adopt the run's saved model after checking it was made with the same options and the
        same training files (anything else would change the split or the features)."""
        from transferkit.models.record import ModelRecord

        st = self.state
        if not os.path.exists(st.model_path):
            raise TransferkitError(f"{st.out}: nothing to resume (no {runs.MODEL_NAME})")
        loaded, record = ModelRecord.load(st.model_path)
        st.options = runs.check_resumable(st.out, loaded.metadata, st.options)
        runs.check_same_files(st.out, loaded.metadata, st.data)
        self.owner.adopt(loaded, record)
        st.skipped = runs.read_split(st.out).get("skipped", st.skipped)


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


def _negatives(features: np.ndarray | None) -> dict:
    """``fit_trust``'s ``negatives`` argument where there are photos labelled unknown (single-label only: train
    --add refuses multi-label data), else nothing (the multi-label task's fit_trust takes none)."""
    return {} if features is None else {"negatives": features}
