"""The errors several modules raise, in one place that imports nothing of the project, so no
module has to import the training loop (or the data reader) just for an exception class.

Each message says what was wrong, where, and what to do. The CLI turns them into one line on
stderr and an exit status; `Preempted` exits with REQUEUE_EXIT_CODE so a scheduler requeues.
"""

from __future__ import annotations

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; see docs/launching.md (SLURM requeue)


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what and where."""


class StageError(RuntimeError):
    """A stage that cannot run as configured; the message says why and what to do."""


class NonFiniteLoss(StageError):
    """The loss or the gradient norm stopped being finite; the last good checkpoint is kept."""


class CacheError(StageError):
    """A teacher cache that cannot be built or read; the message says why and what to do."""


class DataError(ValueError):
    """Data that cannot be used; the message names the split, file or column."""


class ModelLoadError(RuntimeError):
    """A model id or path that cannot be loaded; the message says why and what to do."""


class Preempted(SystemExit):
    """Raised after a checkpoint was saved on SIGTERM/SIGINT; exits with REQUEUE_EXIT_CODE."""

    def __init__(self, message: str):
        super().__init__(REQUEUE_EXIT_CODE)
        self.message = message
