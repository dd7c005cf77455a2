"""Task families. `get_task(task, data)` picks the family named by `task.family` and hands it the
recipe's task and data sections (the only settings a task reads)."""

from __future__ import annotations

from distill.config import DataConfig, TaskConfig
from distill.tasks.base import Task


def get_task(settings: TaskConfig, data: DataConfig) -> Task:
    family = settings.family
    if family == "classification":
        from distill.tasks.classification import ClassificationTask

        return ClassificationTask(settings, data)
    if family == "tagging":
        from distill.tasks.tagging import TaggingTask

        return TaggingTask(settings, data)
    if family == "qa":
        from distill.tasks.qa import QATask

        return QATask(settings, data)
    raise ValueError(f"task.family={family!r} is not one of: classification, tagging, qa")
