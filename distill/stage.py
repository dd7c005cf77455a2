"""A stage's folder: where it lives, whether it holds this run, and writes that never half-happen.

`<output_dir>/<stage>/` (the teacher: `teacher.dir` when set) holds config.yaml, log.jsonl,
checkpoints/, best/, model/ and, last of all, metrics.json, whose presence marks the stage
complete. `check_stage_dir` compares a stage's *identity* (the config keys that change its
result) with the one saved there, so a re-run resumes, skips or refuses, never mixes two runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from distill.config import Config, load_config, stage_train, to_dict
from distill.errors import StageError

STAGES = ("teacher", "student", "baseline")

# Keys that never change a stage's result: bookkeeping, trackers, the Hub, the search around it,
# how often it logs or checkpoints, and whether the teacher's outputs are cached or recomputed.
NOT_IDENTITY = ("tracking", "hub", "overwrite", "checkpoint", "output_dir", "run", "search")
NOT_IDENTITY_TRAIN = ("logging_steps", "checkpoint_steps", "keep_checkpoints", "num_workers")
NOT_IDENTITY_DISTILL = ("teacher_outputs", "cache_hidden_states", "cache_dir")


def stage_dir(cfg: Config, stage: str) -> Path:
    if stage == "teacher" and cfg.teacher.dir:
        return Path(cfg.teacher.dir)
    return Path(cfg.output_dir) / stage


def stage_view(cfg: Config, stage: str) -> dict[str, Any]:
    """The part of the config that determines a stage's outputs (what 'same config' means).

    The teacher stage ignores the student and distillation settings, so every student of a grid
    can share one fine-tuned teacher; the baseline ignores the distillation settings.
    """
    full = to_dict(cfg)
    if stage == "teacher":
        view = {k: full[k] for k in ("task", "data", "teacher", "seed")}
        view["train"] = to_dict(stage_train(cfg, "teacher"))  # type: ignore[arg-type]
    else:
        view = {k: v for k, v in full.items() if k not in NOT_IDENTITY}
        view["distill"] = {k: v for k, v in view["distill"].items() if k not in NOT_IDENTITY_DISTILL}
        if "augment" in view:
            view["augment"] = {k: v for k, v in view["augment"].items() if k not in ("batch_size", "cache_dir")}
    if stage != "student":  # transfer sets and augmented rows are the student's alone
        view.pop("distill", None)
        view.pop("augment", None)
        view["data"] = {k: v for k, v in view["data"].items() if k != "transfer"}
    view["train"] = {k: v for k, v in view["train"].items() if k not in NOT_IDENTITY_TRAIN}
    return view


def check_stage_dir(cfg: Config, stage: str) -> str:
    """'fresh', 'resume', 'complete' or 'overwrite' for this stage's folder.

    A folder holding another config is refused unless overwrite=true, so a typo in a re-run
    never mixes two experiments' checkpoints. Nothing is deleted here: with overwrite=true the
    folder is cleared only once every input of the new run has been checked.
    """
    out = stage_dir(cfg, stage)
    saved = out / "config.yaml"
    if not saved.exists():
        return "fresh"
    try:
        old = load_config(saved)
        same = stage_view(old, stage) == stage_view(cfg, stage)
    except Exception:  # an older or hand-edited config.yaml: treat as different
        same = False
    if not same:
        if not cfg.overwrite:
            raise StageError(
                f"{out} holds a run with a different config ({saved}). Use another output_dir, "
                "or pass overwrite=true to replace it."
            )
        return "overwrite"
    if (out / "metrics.json").exists() and (out / "model").exists():
        return "complete"
    return "resume"


def check_writable(out: Path, keep: bool = True) -> None:
    """Create the stage folder and write (then remove) a probe file: an unusable output_dir fails
    here, before any data or model is loaded, instead of at the first checkpoint. With
    keep=False the folders this check created are removed again (a dry check leaves nothing).

    The probe's name is unique per host and process, and a folder another process created in
    the meantime is left alone, so every process of a launch can run this at once.
    """
    probe = out / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    created = []
    parent = out
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise StageError(
            f"output_dir is not writable: cannot create or write {out} ({err.strerror or err}). "
            "Set output_dir=<a folder you can write to>."
        ) from None
    if not keep:
        for folder in created:  # deepest first; another process may be using it: keep it then
            try:
                folder.rmdir()
            except OSError:
                break


class JsonlLog:
    """Append-only log.jsonl written by the main process only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> None:
        """Drop records after `step` (a resumed run logs those steps again)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except ValueError:  # a line cut short by a crash
                continue
        atomic_write(self.path, "".join(kept))


def atomic_write(path: Path, text: str) -> None:
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
