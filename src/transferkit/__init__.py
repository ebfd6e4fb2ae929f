"""transferkit: train, evaluate and serve image classifiers by transfer learning with Keras 3.

    import transferkit
    result = transferkit.train("photos/", test_dir="test/", out="runs/fruit")
    transferkit.evaluate("runs/fruit/model.keras", "test/")
    transferkit.predict("runs/fruit/model.keras", ["new.jpg"])
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from transferkit._version import __version__  # noqa: E402
from transferkit.errors import TransferkitError  # noqa: E402


def __getattr__(name):
    """Import the heavy parts (Keras, TensorFlow) only when they are used, so ``transferkit --help`` is instant."""
    lazy = {
        "train": ("transferkit.training", "train"),
        "evaluate": ("transferkit.evaluation", "evaluate"),
        "predict": ("transferkit.prediction", "predict"),
        "load_model": ("transferkit.prediction", "load_model"),
        "backbones": ("transferkit.backbones", None),
    }
    if name not in lazy:
        raise AttributeError(f"module 'transferkit' has no attribute '{name}'")
    import importlib

    module_name, attr = lazy[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)


__all__ = ["__version__", "TransferkitError", "train", "evaluate", "predict", "load_model", "backbones"]
