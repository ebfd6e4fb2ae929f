"""The functional API: each call is a thin wrapper over ``ImageClassifier`` or a ``Predictor``, with the same
options, files and JSON as the command line.

    transferkit.train("photos/", test_dir="test/", out="runs/fruit", epochs=30)   # -> metrics.json's dict
    transferkit.predict("runs/fruit/model.keras", ["new.jpg"], top_k=3)         # -> rows
    transferkit.evaluate("runs/fruit/model.keras", "test/", out="runs/fruit/eval")
"""

from __future__ import annotations

import os

from transferkit.engines.base import Predictor
from transferkit.errors import OptionError
from transferkit.options import DEFAULT_ENGINE, DEFAULT_PREDICT, EngineOptions, PredictOptions


def train(data_dir: str, *, test_dir: str | None = None, out: str | None = None, resume: bool = False,
          callbacks=(), log_dir: str | None = None, ray: str | None = None, add=(), **options) -> dict:
    """Train with ``options`` (the fields of TrainOptions) and write the run folder; returns its metrics.
    ``data_dir``: a class folder, or a label file (``labels.csv``, ``LabelFile(...)``, a Hugging Face
    imagefolder); ``log_dir``: TensorBoard logs of the head and the fine-tuning; ``ray``: extract the features on
    the Ray cluster at this address ("local": a local Ray instance)."""
    from transferkit.classifier import ImageClassifier

    clf = ImageClassifier(**options)
    return clf.fit(data_dir, test_dir=test_dir, out=out, resume=resume, callbacks=callbacks, log_dir=log_dir,
                   ray=ray, add=add).summary()


def load_model(path, *, runtime: str = DEFAULT_ENGINE.runtime,
               precision: str = DEFAULT_ENGINE.precision) -> Predictor:
    """A ``.keras`` model file as an ``ImageClassifier`` on ``runtime`` / ``precision``, or an ``.onnx`` export
    (run by onnxruntime or OpenVINO, without TensorFlow)."""
    engine = EngineOptions(runtime=runtime, precision=precision)  # validated before the model is read
    if str(path).lower().endswith(".onnx"):
        from transferkit.engines.onnx_model import load_onnx

        if engine.runtime == "keras" or engine.precision not in ("auto", "fp32"):
            raise OptionError("runtime", "of an .onnx export is onnxruntime or openvino, fp32",
                              f"{engine.runtime} {engine.precision}")
        return load_onnx(str(path), engine.runtime)
    from transferkit.classifier import ImageClassifier

    return ImageClassifier.load(str(path), runtime=runtime, precision=precision)


def load_predictor(path, *, runtime: str = DEFAULT_ENGINE.runtime,
                   precision: str = DEFAULT_ENGINE.precision) -> Predictor:
    """What ``predict``, ``evaluate`` and the server run: a ``.keras`` file's converted engine straight from the
    cache where ``train`` or an earlier use left one, checked (no TensorFlow import: one photo in well under a
    second); where none is cached yet, converted first by a child process that exits (``engines.convert``:
    this process still imports no TensorFlow); else ``load_model``."""
    engine = EngineOptions(runtime=runtime, precision=precision)
    if not str(path).lower().endswith(".onnx"):
        from transferkit.engines.cached import CachedPredictor
        from transferkit.engines.convert import in_child

        found = CachedPredictor.find(str(path), engine)
        if found is None and in_child(str(path), engine):
            found = CachedPredictor.find(str(path), engine)
        if found is not None:
            return found
    return load_model(path, runtime=runtime, precision=precision)


def _model(model, runtime: str, precision: str) -> Predictor:
    if isinstance(model, (str, os.PathLike)):
        return load_predictor(model, runtime=runtime, precision=precision)
    return model


def predict(model, paths, *, top_k: int = DEFAULT_PREDICT.top_k, batch_size: int = DEFAULT_PREDICT.batch_size,
            runtime: str = DEFAULT_ENGINE.runtime, precision: str = DEFAULT_ENGINE.precision,
            reject: bool = DEFAULT_PREDICT.reject, coverage: float | None = None,
            max_error: float | None = None, expected_error: float | None = None,
            class_coverage: float | None = None) -> list[dict]:
    """Rows for every image in ``paths`` (files, folders, globs, label files: their rows get ``given``, the
    file's label); ``model`` is a path or a loaded predictor; ``reject=False`` labels unknown photos with their
    nearest class instead of None; ``coverage``: rows get ``set``, the conformal prediction set
    (``class_coverage``: with that coverage within every class); ``max_error``: rows get ``abstain``, certified
    (``expected_error``: in expectation; see ``models.conformal``); an abstaining row's label is None."""
    from transferkit.engines.predict import predict_rows

    options = PredictOptions(top_k=top_k, batch_size=batch_size, reject=reject, coverage=coverage,
                             max_error=max_error, expected_error=expected_error,
                             class_coverage=class_coverage)  # checked before the model is read
    return predict_rows(_model(model, runtime, precision), paths, options)


def predict_on_ray(model, paths, out: str, *, address: str | None = "local", top_k: int = DEFAULT_PREDICT.top_k,
                   batch_size: int = DEFAULT_PREDICT.batch_size, runtime: str = DEFAULT_ENGINE.runtime,
                   precision: str = DEFAULT_ENGINE.precision, reject: bool = DEFAULT_PREDICT.reject,
                   coverage: float | None = None, max_error: float | None = None,
                   expected_error: float | None = None, class_coverage: float | None = None) -> dict:
    """``predict``'s rows for every image in ``paths`` (files, folders, globs), computed on the Ray cluster at
    ``address`` ("local": a local Ray instance) and written to the folder ``out`` (``*.parquet`` or ``*.csv``);
    files already predicted there are skipped, so a killed job resumes. ``model``: the path of a model file
    every worker can read. ``coverage`` / ``class_coverage`` / ``max_error`` / ``expected_error``: the rows'
    conformal ``set`` (labels joined by |) and ``abstain`` columns, as ``predict``'s. Returns the summary (rows, new, errors, seconds, images_per_second)."""
    from transferkit.scale.cluster import preflight
    from transferkit.scale.predict import predict_on_ray as run

    guarantees = {"coverage": coverage, "max_error": max_error, "expected_error": expected_error,
                  "class_coverage": class_coverage}
    PredictOptions(**guarantees)  # checked before the model is read
    engine = EngineOptions(runtime=runtime, precision=precision)
    preflight(address)  # Ray installed, the cluster reachable: before the model is read or OUT is made
    return run(str(model), paths, out, address=address, top_k=top_k, reject=reject, batch_size=batch_size,
               engine=engine, **guarantees)


def evaluate(model, test_dir: str, *, out: str | None = None, batch_size: int = DEFAULT_PREDICT.batch_size,
             runtime: str = DEFAULT_ENGINE.runtime, precision: str = DEFAULT_ENGINE.precision,
             unknown_dir: str | None = None, explain: bool = True, max_error: float | None = None) -> dict:
    """Metrics of ``model`` (a path or a loaded predictor) on ``test_dir/<class>/`` (or a label file: its test
    rows where it has a split column, else every row); report files in ``out``;
    ``unknown_dir``: photos of none of the classes (rejection rate, AUROC, confusion with an unknown row);
    ``explain``: heat maps in the report's galleries; ``max_error``: also this bound in ``conformal``."""
    from transferkit.reports.evaluation import evaluate_predictor

    PredictOptions(max_error=max_error)  # checked before the model is read
    return evaluate_predictor(_model(model, runtime, precision), test_dir, out=out, batch_size=batch_size,
                              unknown_dir=unknown_dir, explain=explain, max_error=max_error)


def explain(model, paths, *, out: str | None = None, top_k: int = DEFAULT_PREDICT.top_k,
            runtime: str = DEFAULT_ENGINE.runtime, precision: str = DEFAULT_ENGINE.precision,
            reject: bool = DEFAULT_PREDICT.reject) -> list[dict]:
    """``predict``'s rows, each readable one with ``heatmap``: the Grad-CAM map (h, w; 0-1, the last feature
    map's cells) of its label (an unknown photo: of its nearest class); with ``out``, also ``explanation``, the
    PNG written there (the photo with its heat map, titled with the verdict). ``model``: a ``.keras`` path or
    a loaded model (not an ONNX export: it has no gradients)."""
    from transferkit.errors import TransferkitError
    from transferkit.reports.explain import Explainer, explained_class, write_explanations

    predictor = _model(model, runtime, precision)
    rows = predict(predictor, paths, top_k=top_k, reject=reject)
    explainer = Explainer.for_predictor(predictor)
    if explainer is None:
        raise TransferkitError(f"{getattr(predictor, 'path', model)}: heat maps need a .keras model file")
    good = [r for r in rows if not r.get("error")]
    pairs = explainer.files([r["path"] for r in good], [explained_class(r, explainer.class_names) for r in good])
    for row, (_, heat) in zip(good, pairs):
        row["heatmap"] = heat
    if out and good:
        write_explanations(good, explainer, out, pairs)
    return rows


def model_card(path, *, out: str | None = None) -> str:
    """The model card (Markdown) of a ``.keras`` model file, rendered from its metadata (no TensorFlow import);
    with ``out``, also written there (atomically)."""
    from transferkit.models.modelfile import read_metadata
    from transferkit.reports.card import model_card as render, write_model_card

    metadata = read_metadata(str(path))
    if out:
        write_model_card(metadata, out)
    return render(metadata)


def compare(data_dir: str, *, backbones=None, test_dir: str | None = None, out: str | None = None,
            **options) -> dict:
    """Compare ``backbones`` (default: the offline ones) on ``data_dir`` with the same split and head: validation
    accuracy, macro F1, images/s, and the pick with its reason (see ``training.compare``); with ``out``,
    compare.json and compare.png there."""
    from transferkit.training.compare import compare_backbones

    return compare_backbones(data_dir, list(backbones) if backbones else None, test_dir=test_dir, out=out, **options)
