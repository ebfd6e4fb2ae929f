"""transferkit's messages go through ``logging.getLogger("transferkit")``: progress and choices at INFO, fallbacks
and repaired caches at WARNING. A Python user sees warnings (Python's last-resort handler) and the progress bars;
the CLI installs a handler and sets the level (``--quiet``: warnings only, ``-v``: debug)."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("transferkit")
logger.setLevel(logging.INFO)  # bars shown by default, like Keras's; INFO text needs a handler (the CLI's)


def progress_bar(total: int, desc: str, *, disable: bool = False, **kwargs):
    """The one place a progress bar is made: ``tqdm.auto``, a notebook widget in Jupyter where ipywidgets is
    installed (``pip install transferkit[notebook]``), a text bar on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=disable, dynamic_ncols=True, **kwargs)


def show_progress() -> bool:
    """Whether progress bars are wanted: the transferkit logger lets INFO through."""
    return logger.isEnabledFor(logging.INFO)


def configure(verbosity: int = 0) -> None:
    """For the CLI: one stderr handler printing ``transferkit: message``; -1 quiet, 0 info, 1 debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logger.setLevel(level)
    if not any(getattr(h, "_transferkit", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("transferkit: %(message)s"))
        handler._transferkit = True
        logger.addHandler(handler)
        logger.propagate = False
