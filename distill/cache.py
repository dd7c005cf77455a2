"""Teacher outputs computed once and stored on disk (filled in by the teacher-cache work)."""

from __future__ import annotations

from typing import Any, Optional


def teacher_outputs(cfg, task, teacher, train_features, accelerator, hidden: bool) -> Optional[Any]:
    """A callable batch -> (teacher targets, hidden states) reading a cache, or None for online."""
    return None
