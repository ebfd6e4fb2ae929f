"""TensorFlow's import prints two C++ lines to stderr that no setting silences in TensorFlow 2.21 (``WARNING:
All log messages before absl::InitializeLog() is called are written to STDERR`` and ``oneDNN custom operations
are on``: ``TF_CPP_MIN_LOG_LEVEL`` and ``GLOG_minloglevel`` were tried), so every ``train`` began with them. The
import is run with file descriptor 2 pointed at /dev/null, once, when TensorFlow is first imported (through Keras
or directly); Python's own errors from it still raise as usual. ``TRANSFERKIT_TF_STDERR=1`` keeps them."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: at the first ``import tensorflow``, wraps the real loader's ``exec_module``."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders answer from here on
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            with _stderr_silenced():
                run(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "tensorflow" in sys.modules or os.environ.get("TRANSFERKIT_TF_STDERR") == "1":
        return
    if not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
