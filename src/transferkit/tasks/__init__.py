"""Tasks: what a model's outputs mean, in one object per task (timm's registry, by name).

A task owns everything that depends on the kind of answer: the head's output layer and its Keras loss, the
linear fit on cached features, the score a head candidate is chosen by, turning model outputs into result rows
(``decide``), calibration, metrics and the report's task-specific part. The trainer, the predictors, the server
and the reports call the task, never a softmax of their own, so a new task is one new module here.

    from transferkit.tasks import get_task, task_of
    task = get_task("single_label")           # by name
    task = task_of(model_file_metadata)       # what a model file was trained for (older files: single_label)
"""

from __future__ import annotations

from transferkit.errors import TransferkitError
from transferkit.tasks.base import Task
from transferkit.tasks.multi_label import MultiLabel
from transferkit.tasks.single_label import SingleLabel

TASKS: dict[str, type[Task]] = {SingleLabel.name: SingleLabel, MultiLabel.name: MultiLabel}
DEFAULT_TASK = SingleLabel.name


def get_task(name: str = DEFAULT_TASK) -> Task:
    """The task registered as ``name``; a one-line error naming the known ones."""
    try:
        return TASKS[name]()
    except KeyError:
        raise TransferkitError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def task_of(metadata: dict | None) -> Task:
    """The task a model file's metadata names (a file written before tasks existed is single-label)."""
    name = (metadata or {}).get("task") or DEFAULT_TASK
    return type(get_task(name if isinstance(name, str) else DEFAULT_TASK)).from_metadata(metadata or {})


def task_for(options) -> Task:
    """The task a training run's options ask for (``multi_label``)."""
    return get_task(MultiLabel.name if getattr(options, "multi_label", False) else DEFAULT_TASK)


__all__ = ["Task", "SingleLabel", "MultiLabel", "task_for", "TASKS", "DEFAULT_TASK", "get_task", "task_of"]
