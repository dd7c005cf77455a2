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


from distill.config import load_config
from distill.loop.plan import StagePlan, changed_keys, stage_view
from distill.errors import StageError
from distill.files import atomic_write

DATA_FILE = "data.json"  # content hashes of the splits the stage was trained on
LOCK_FILE = ".lock"



def check_stage_dir(plan: StagePlan, data: Optional[dict[str, str]] = None) -> str:
    """'fresh', 'resume', 'complete' or 'overwrite' for the plan's folder.

    A folder holding another config (another identity: `plan.stage_view`), or (given `data`, the
    content hashes of the splits, see `data.features.data_identity`) a run trained on other data,
    is refused unless overwrite=true, naming the keys or splits that differ, so a typo or an
    edited file never mixes two experiments' checkpoints nor passes a stale model off as
    complete. Nothing is deleted here: with overwrite=true the folder is cleared only once every
    input of the new run has been checked.
    """
    out = plan.folder
    saved = out / "config.yaml"
    if not saved.exists():
        return "fresh"
    try:
        old = stage_view(load_config(saved), plan.kind)
        keys = changed_keys(old, plan.identity)
    except Exception:  # an older or hand-edited config.yaml: treat as different
        keys = ["(unreadable config.yaml)"]
    changed = []
    if not keys and data is not None and (out / DATA_FILE).exists():
        before = json.loads((out / DATA_FILE).read_text())
        changed = sorted(k for k in set(before) | set(data) if before.get(k) != data.get(k))
    if keys or changed:
        if not plan.overwrite:
            what = (
                f"was trained on other data (splits {changed} changed since)" if not keys
                else f"holds a run with a different config (differs in: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''})"
            )
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


