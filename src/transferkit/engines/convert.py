"""A model file's converted, checked engine put in the cache where it costs least, so that ``predict``,
``evaluate`` and ``serve`` start from it (``engines.cached``) and never import TensorFlow.

Measured on ``main`` (2 cores with AMX, 1,000 photos): the first ``transferkit predict RUN/model.keras photo``
after ``train`` took 13.1 s and 2.9 GB, converting the model file inside that process; the second 0.25 s and
143 MB; a ``serve`` worker on a fresh model peaked at 2.9 GB. Now:

- ``warm``: ``train`` (``ImageClassifier.save``) converts the file it has just written while TensorFlow and the
  model are in memory anyway, through the very conversion a later use makes (``KerasPredictor.build_engine``:
  the same cache key, the same check on the file's photos): about 10 s more of ``train`` here (2 cores, no AMX;
  its peak 1.8 GB, 2.5 GB before the tf2onnx fix of ``keras_onnx``), and the first predict after it takes
  0.6-0.9 s and 142 MB, as every later one.
- ``in_child``: a model file from elsewhere (or a cache cleared) is converted by a child process that exits
  (``python -m transferkit.engines.convert MODEL RUNTIME PRECISION``): the process that predicts or serves stays
  without TensorFlow, and the conversion's peak is the child's, 1.27 GB (3.0 GB in-process before). The server
  converts in its master, once, before gunicorn forks: a worker on a fresh model peaked at 198 MB (2.9 GB when
  each converted it itself; ``benchmarks/serve.py --first-use``). A process that has imported TensorFlow already
  converts in itself, as before (a child would import it a second time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys

from transferkit.engines import cached, runtimes
from transferkit.errors import TransferkitError
from transferkit.log import logger
from transferkit.options import DEFAULT_ENGINE, EngineOptions

CHILD_MARK = "transferkit-child-log "  # a line of the child's stderr that is one of its log records


def warm(path: str, keras_model=None, engine: EngineOptions = DEFAULT_ENGINE) -> runtimes.Engine | None:
    """Leave in the cache the converted, checked engine that a later use of the model file ``path`` on ``engine``
    would make, from ``keras_model`` (the model the file holds, already in memory; None: loaded from the file).
    The engine (Keras where the conversion was refused), or None where a use would not convert: runtime keras,
    a file without check photos, an engine cached already. Never raises for the cache's sake: a failure is a
    one-line warning (the file itself is intact; a later use converts it)."""
    try:
        built = _convert(path, keras_model, engine)
    except Exception as exc:  # noqa: BLE001 (a model file written or read intact is not undone by its cache)
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        logger.warning(f"{path}: its engine is not cached ({reason}); the first use converts it")
        return None
    if built is not None:
        logger.debug(f"{path}: {built.label} engine cached for later uses")
    return built


def _convert(path: str, keras_model, engine: EngineOptions) -> runtimes.Engine | None:
    """``warm``, raising what goes wrong (a damaged file: a TransferkitError)."""
    from transferkit.engines.keras_model import KerasPredictor
    from transferkit.models import modelfile
    from transferkit.runs import check_model_metadata

    if not cached.missing(path, engine):
        return None
    if keras_model is None:
        predictor = KerasPredictor.from_file(path, engine)
    else:
        metadata = modelfile.read_metadata(path)
        size = metadata["image_size"]  # an int: cached.missing checked it
        predictor = KerasPredictor(keras_model, check_model_metadata(path, metadata), size, metadata, path, engine,
                                   modelfile.read_check_images(path, size))
    if predictor.check_images is None:  # photos that do not look like photos: checked on a real batch later
        return None
    return predictor.build_engine(predictor.check_images)


def in_child(path: str, engine: EngineOptions = DEFAULT_ENGINE) -> bool:
    """Convert the model file ``path`` for ``engine`` into the cache in a child process, where a use of it would
    convert it and this process has not imported TensorFlow (nor will it here). True where the child ran and
    exited cleanly; False where nothing was to do, or where it failed (a warning; this process then converts as
    before). The child's log records are relayed through this process's logger."""
    if "tensorflow" in sys.modules or str(path).lower().endswith(".onnx") or not cached.missing(path, engine):
        return False
    logger.info(f"{os.path.basename(path)}: converting the model to its engine once, in a child process")
    command = [sys.executable, "-m", "transferkit.engines.convert", str(path), engine.runtime, engine.precision]
    try:
        done = subprocess.run(command, env=_child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as exc:
        logger.warning(f"{path}: cannot start the conversion's child process ({exc}); converting here")
        return False
    last = _relay(done.stderr)
    if done.returncode == 2:  # a TransferkitError: this process's own load says it in one line
        return False
    if done.returncode != 0:
        logger.warning(f"{path}: the conversion's child process failed (exit {done.returncode}: {last}); "
                       f"converting here")
        return False
    return True


def _child_env() -> dict:
    """This environment, with this very transferkit first on the child's import path."""
    import transferkit

    here = os.path.dirname(os.path.dirname(os.path.abspath(transferkit.__file__)))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=here + (os.pathsep + path if path else ""))


def _relay(stderr: str) -> str:
    """Log the child's records here; the last other non-empty line (TensorFlow's notices are dropped)."""
    last = ""
    for line in (stderr or "").splitlines():
        if line.startswith(CHILD_MARK):
            with contextlib.suppress(ValueError, TypeError):
                level, message = json.loads(line[len(CHILD_MARK):])
                logger.log(int(level), str(message))
        elif line.strip():
            last = line.strip()[:300]
    return last


class _ChildFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return CHILD_MARK + json.dumps([record.levelno, record.getMessage()], ensure_ascii=True)


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m transferkit.engines.convert MODEL RUNTIME PRECISION``; exit 2 on a TransferkitError."""
    path, runtime, precision = argv if argv is not None else sys.argv[1:]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ChildFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        _convert(path, None, EngineOptions(runtime=runtime, precision=precision))
    except TransferkitError as exc:  # the parent's own load of the file says it, once
        logger.debug(f"the conversion's child: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
