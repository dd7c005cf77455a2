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
import contextlib
import errno
import time
from typing import Any, Iterator, Optional

from dataclasses import replace

from distill.config import TEACHER_STAGE, Config, load_config, stage_train, teacher_list, teacher_of_stage, to_dict
from distill.errors import StageError

STAGES = ("teacher", "student", "baseline")
DATA_FILE = "data.json"  # content hashes of the splits the stage was trained on
LOCK_FILE = ".lock"

# Keys that never change a stage's result: bookkeeping, trackers, the Hub, the search around it,
# how often it logs or checkpoints, and whether the teacher's outputs are cached or recomputed.
NOT_IDENTITY = ("tracking", "hub", "overwrite", "checkpoint", "output_dir", "run", "search")
NOT_IDENTITY_TRAIN = ("logging_steps", "checkpoint_steps", "keep_checkpoints", "num_workers")
NOT_IDENTITY_DISTILL = ("teacher_outputs", "cache_hidden_states", "cache_dir")


def stage_dir(cfg: Config, stage: str) -> Path:
    """`<output_dir>/<stage>`; a teacher stage (`teacher`, or `teacher-<i>` of `teachers:`) goes
    to its teacher's `dir` when set."""
    if stage == "teacher" and cfg.teacher.dir:
        return Path(cfg.teacher.dir)
    if TEACHER_STAGE.match(stage):
        teacher = teacher_of_stage(cfg, stage)
        if teacher.dir:
            return Path(teacher.dir)
    return Path(cfg.output_dir) / stage


def teacher_stages(cfg: Config) -> list[str]:
    """The stages that fine-tune the recipe's teachers (those not `finetuned` already), in order:
    `teacher` for the one `teacher:`, `teacher-<i>` for each entry of `teachers:`."""
    if not cfg.teachers:
        return ["teacher"] if cfg.teacher.model and not cfg.teacher.finetuned else []
    return [f"teacher-{i}" for i, t in enumerate(cfg.teachers) if not t.finetuned]


def teacher_stage_config(cfg: Config, index: int) -> Config:
    """The config that fine-tunes teacher `index` as an ordinary `teacher` stage.

    Every teacher stage is the one-teacher case: `teacher` is that teacher (its folder resolved
    to `teachers[i].dir` or `<output_dir>/teacher-<i>`), `teachers` is empty, and the teacher's
    own `seed` (when set) replaces the recipe's. So a teacher of a list and the same teacher
    given alone train (and skip, and resume) alike, and its folder's config.yaml says which
    teacher it holds. The one `teacher:` without a seed of its own gives `cfg` itself.
    """
    teachers = teacher_list(cfg)
    if not 0 <= index < len(teachers):
        raise StageError(f"no teacher {index}: the recipe has {len(teachers)} (0..{len(teachers) - 1})")
    t = teachers[index]
    seed = cfg.seed if t.seed is None else t.seed
    if not cfg.teachers:
        return cfg if seed == cfg.seed else replace(cfg, seed=seed)
    t = replace(t, dir=str(stage_dir(cfg, f"teacher-{index}")))
    # the combination keys mean nothing to one teacher (and are not part of its identity)
    d = replace(cfg.distill, intermediate_teacher=0, teacher_combine="mean", teacher_weights=[])
    return replace(cfg, teacher=t, teachers=[], distill=d, seed=seed)


def resolve_stage(cfg: Config, stage: str) -> tuple[Config, str]:
    """(config, stage) that `run_stage` runs for a stage name: `teacher-<i>` and `teacher` become
    the stage `teacher` of `teacher_stage_config`; every other stage is itself."""
    match = TEACHER_STAGE.match(stage)
    if match:
        if not cfg.teachers:
            raise StageError(f"stage '{stage}' needs `teachers:`; this recipe's one teacher is stage 'teacher'")
        teacher_of_stage(cfg, stage)  # in range
        return teacher_stage_config(cfg, int(match.group(1))), "teacher"
    if stage == "teacher":
        if cfg.teachers:
            names = ", ".join(f"teacher-{i}" for i in range(len(cfg.teachers)))
            raise StageError(f"the recipe lists {len(cfg.teachers)} teachers: name one of the stages {names}")
        if cfg.teacher.model:
            return teacher_stage_config(cfg, 0), "teacher"
    return cfg, stage


def stage_view(cfg: Config, stage: str) -> dict[str, Any]:
    """The part of the config that determines a stage's outputs (what 'same config' means).

    The teacher stage ignores the student and distillation settings, so every student of a grid
    can share one fine-tuned teacher; the baseline ignores the distillation settings.
    """
    full = to_dict(cfg)
    if stage == "teacher":
        view = {k: full[k] for k in ("task", "data", "teacher", "seed")}
        # the teacher's windows during distillation (QA across tokenizers) are the student's
        # business, and where its folder lies is not what it holds (a copied or moved teacher
        # folder is still complete)
        view["teacher"] = {k: v for k, v in view["teacher"].items() if k not in ("max_length", "doc_stride", "dir")}
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


def check_stage_dir(cfg: Config, stage: str, data: Optional[dict[str, str]] = None) -> str:
    """'fresh', 'resume', 'complete' or 'overwrite' for this stage's folder.

    A folder holding another config, or (given `data`, the content hashes of the splits, see
    `features.data_identity`) a run trained on other data, is refused unless overwrite=true, so
    a typo or an edited file never mixes two experiments' checkpoints nor passes a stale model
    off as complete. Nothing is deleted here: with overwrite=true the folder is cleared only once
    every input of the new run has been checked.
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
    changed = []
    if same and data is not None and (out / DATA_FILE).exists():
        before = json.loads((out / DATA_FILE).read_text())
        changed = sorted(k for k in set(before) | set(data) if before.get(k) != data.get(k))
    if not same or changed:
        if not cfg.overwrite:
            what = f"was trained on other data (splits {changed} changed since)" if same else "holds a run with a different config"
            raise StageError(
                f"{out} {what} ({saved}). Use another output_dir, or pass overwrite=true to replace it."
            )
        return "overwrite"
    if (out / "metrics.json").exists() and (out / "model").exists():
        return "complete"
    return "resume"


def check_writable(out: Path, keep: bool = True) -> None:
    """Fail now, not at the first checkpoint, when the stage folder cannot be written.

    keep=True creates the folder and writes (then removes) a probe file in it. keep=False (a dry
    check: preflight) creates nothing: it probes the folder if it exists, else its nearest
    existing parent, so every process of a launch can check at once without removing a folder
    another process is probing. Probe names are unique per host and process.
    """
    target = out
    if not keep:
        while not target.exists() and target != target.parent:
            target = target.parent
    probe = target / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        if keep:
            target.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise StageError(
            f"output_dir is not writable: cannot create or write {out} ({err.strerror or err}). "
            "Set output_dir=<a folder you can write to>."
        ) from None


class StageLock:
    """One process at a time owns a stage folder: `<stage>/.lock` names the host and process.

    A second run on the same folder stops at once, naming the holder; a lock left by a process
    that no longer runs (same host) is taken over with a warning. Locks from another host cannot
    be checked: the message says how to remove a stale one.
    """

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.held = False

    def __enter__(self) -> "StageLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise StageError(
                        f"{self.path.parent} is in use by process {holder.get('pid')} on "
                        f"{holder.get('host')} (lock {self.path}): wait for it, or stop it. If that "
                        "process is gone (e.g. another machine crashed), delete the lock file."
                    ) from None
                print(f"[distill] taking over a stale lock {self.path} ({holder})", flush=True)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise StageError(f"cannot take the lock {self.path}: another run keeps creating it")

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # being written this instant, or garbage: treat as held
            return {"host": socket.gethostname(), "pid": None}

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot check another machine's processes
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return True
        try:
            os.kill(pid, 0)
        except OSError as err:
            return err.errno == errno.EPERM  # exists, owned by someone else
        return True

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


@contextlib.contextmanager
def locked(accelerator: Any, out: Path) -> Iterator[None]:
    """Hold the stage folder's lock for the body (the main process takes it; every process
    learns whether it could, so none waits at a barrier for a process that stopped)."""
    lock, problem = StageLock(out), [None]
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock.__enter__()
        except StageError as err:
            problem[0] = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(problem)
    if problem[0]:
        raise StageError(problem[0])
    try:
        yield
    finally:
        lock.__exit__()


def clear_stage_dir(out: Path) -> None:
    """Remove an old run's files (overwrite=true), keeping this run's lock."""
    for path in out.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing `what` when the disk holding `folder` has less than `needed`
    bytes free (a full disk mid-write would leave a half file and a cryptic error)."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StageError(
            f"not enough disk space to write {what} in {folder}: about {needed / 2**20:.0f} MiB "
            f"needed, {free / 2**20:.0f} MiB free. Free some space (older runs, caches) or move "
            "output_dir, then re-run the same command: the last good checkpoint is kept."
        )


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
