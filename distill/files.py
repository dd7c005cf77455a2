"""Writes that never half-happen, and the free-space check before a large one.

Shared by every layer that writes into a run's folders: stage files and checkpoints (loop/),
the teacher cache (teachers/), augmentation (data/), exports (ship/).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from distill.errors import StageError

RESUME_ADVICE = "then re-run the same command: the last good checkpoint is kept."


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (never a torn file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def swap_in(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing what was there. `final` is missing for
    only an instant (two renames), and a half-written `tmp` is never visible under `final`."""
    trash = final.with_name(f".old-{final.name}")
    shutil.rmtree(trash, ignore_errors=True)
    if final.exists():
        os.replace(final, trash)
    os.replace(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


def link_tree(src: Path, dst: Path) -> None:
    """Copy a folder as hard links (no extra disk; files are never modified in place)."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def check_free_space(
    folder: Path, needed: int, what: str, advice: str = "Free some space (older runs, caches) or move "
    "output_dir, " + RESUME_ADVICE, error: type[Exception] = StageError,
) -> None:
    """Refuse to start writing `what` when the disk holding `folder` (created if missing) has
    less than `needed` bytes free: a full disk mid-write would leave a half file and a cryptic
    error. `advice` says what to do; `error` is the exception class raised."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise error(
            f"not enough disk space to write {what} in {folder}: about {needed / 2**20:.0f} MiB "
            f"needed, {free / 2**20:.0f} MiB free. {advice}"
        )
