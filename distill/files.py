"""Writes that never half-happen, the free-space check before a large one, and checksums that
say whether a folder still holds what was written.

Shared by every layer that writes into a run's folders: stage files and checkpoints (loop/),
the teacher cache (teachers/), augmentation (data/), exports (ship/). A folder read back later
(a checkpoint, a cache) records the sha256 of each of its files in `checksums.json` before it is
renamed into place (`write_checksums`); a reader calls `verify_checksums` first, so a flipped
bit or a file cut short is found before anything trains on it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from distill.errors import StageError

RESUME_ADVICE = "then re-run the same command: the last good checkpoint is kept."


def atomic_write(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename (never a torn file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
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


# ---------------------------------------------------------------------------------------------
# Checksums: a folder that says whether it is still what was written
# ---------------------------------------------------------------------------------------------

CHECKSUMS = "checksums.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """Every file under `folder` but its checksum record, in a fixed order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(folder: Path) -> dict[str, str]:
    """Record the sha256 of every file under `folder` in `folder/checksums.json` (call it last,
    once every file is written, before the folder is renamed into place)."""
    sums = {str(p.relative_to(folder)): sha256_file(p) for p in folder_files(folder)}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    return sums


def verify_checksums(folder: Path) -> Optional[str]:
    """None when every file recorded in `folder/checksums.json` is there with the same content,
    else what is wrong (no record, missing files, files that changed: damaged or cut short)."""
    try:
        recorded = json.loads((folder / CHECKSUMS).read_text())
        if not isinstance(recorded, dict):
            raise ValueError("not a mapping of files to checksums")
    except (OSError, ValueError) as err:
        return f"no readable {CHECKSUMS} ({err})"
    present = {str(p.relative_to(folder)) for p in folder_files(folder)}
    missing = sorted(set(recorded) - present)
    if missing:
        return f"missing files {missing}"
    bad = [name for name, digest in recorded.items() if sha256_file(folder / name) != digest]
    return f"files that changed since they were written (damaged or truncated): {bad}" if bad else None


def full_disk_error(err: OSError, folder: Path, what: str, advice: str, error: type[Exception] = StageError) -> Exception:
    """The error to raise for an OSError met while writing `what` into `folder`: a message for
    a full disk or quota (ENOSPC, EDQUOT), the error itself otherwise."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return error(f"the disk holding {folder} filled up while writing {what} ({err.strerror}). {advice}")
    return err


def reusable(folder: Path, marker: str, what: str) -> bool:
    """True when `folder` holds a complete `what` (its `marker` file is written last) whose files
    match their checksums. A damaged or cut-short one (or one without checksums) is moved aside
    and removed, with a warning naming it and what is wrong, so the caller builds it again."""
    if not (folder / marker).is_file():
        return False
    problem = verify_checksums(folder)
    if problem is None:
        return True
    logging.getLogger("distill").warning("%s %s is damaged (%s): building it again", what, folder, problem)
    aside = folder.with_name(f".damaged-{folder.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another process moved it first
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return False
