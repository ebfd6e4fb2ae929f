"""transferkit: train, evaluate and serve image classifiers by transfer learning with Keras 3.

    from transferkit import ImageClassifier
    clf = ImageClassifier(epochs=30).fit("photos/", test_dir="test/", out="runs/fruit")
    clf.predict(["new.jpg"])
    transferkit.evaluate("runs/fruit/model.keras", "test/")

The package reads top-down like the pipeline: ``data`` (decode, folders, health) -> ``models`` (registry,
EfficientNet-Lite, heads, the model file) -> ``engines`` (Keras / onnxruntime / OpenVINO, the Predictor
protocol) -> ``training`` (features, head, fine-tuning) -> ``reports`` (metrics, plots, HTML, evaluation) ->
``classifier`` (ImageClassifier) and ``api`` -> ``apps`` (cli, serve, demo) and ``export``.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from transferkit import _quiet  # noqa: E402

_quiet.install()  # TensorFlow's two C++ start-up lines off stderr (see _quiet)

from transferkit._version import __version__  # noqa: E402
from transferkit.errors import TransferkitError  # noqa: E402
from transferkit.options import EngineOptions, ServeOptions, TrainOptions  # noqa: E402  (no Keras import)

_LAZY = {  # the heavy parts (Keras, TensorFlow) are imported when used, so ``transferkit --help`` is instant
    "ImageClassifier": ("transferkit.classifier", "ImageClassifier"),
    "train": ("transferkit.api", "train"),
    "evaluate": ("transferkit.api", "evaluate"),
    "predict": ("transferkit.api", "predict"),
    "predict_on_ray": ("transferkit.api", "predict_on_ray"),
    "explain": ("transferkit.api", "explain"),
    "model_card": ("transferkit.api", "model_card"),
    "compare": ("transferkit.api", "compare"),
    "load_model": ("transferkit.api", "load_model"),
    "load_predictor": ("transferkit.api", "load_predictor"),
    "list_backbones": ("transferkit.models.backbones", "list_backbones"),
    "export_model": ("transferkit.export", "export_model"),
    "backbones": ("transferkit.models.backbones", None),
    "LabelFile": ("transferkit.data.labelfile", "LabelFile"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'transferkit' has no attribute '{name}'")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)


__all__ = ["__version__", "TransferkitError", "TrainOptions", "EngineOptions", "ServeOptions", *_LAZY]
