"""Task families. `get_task(cfg)` picks the family named by `task.family`."""

from __future__ import annotations

from distill.config import Config
from distill.tasks.base import Task


def get_task(cfg: Config) -> Task:
    family = cfg.task.family
    if family == "classification":
        from distill.tasks.classification import ClassificationTask

        return ClassificationTask(cfg)
    if family == "tagging":
        from distill.tasks.tagging import TaggingTask

        return TaggingTask(cfg)
    if family == "qa":
        from distill.tasks.qa import QATask

        return QATask(cfg)
    raise ValueError(f"task.family={family!r} is not one of: classification, tagging, qa")
