"""A stage's folder: where it lives, whether it holds this run, and writes that never half-happen.

`<output_dir>/<stage>/` (the teacher: `teacher.dir` when set) holds config.yaml, log.jsonl,
checkpoints/, best/, model/ and, last of all, metrics.json, whose presence marks the stage
complete. `check_stage_dir` compares a stage's *identity* (the config keys that change its
result, and the content of its data) with the one saved there, so a re-run resumes, skips or
refuses, never mixes two runs.

Who may touch a folder: one run writes it at a time (`StageLock`, `locked`: `.lock`, refreshed
by a heartbeat, taken over once its holder is gone), and a run that reads it (a student reading
its teacher) marks it (`ReaderMark`, `reading`: `.reader-*`), so no other run overwrites or
retrains it meanwhile (`check_no_readers`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from distill.config import load_config
from distill.errors import StageError
from distill.files import atomic_write
from distill.launch import on_main, seconds_from_env
from distill.loop.plan import StagePlan, changed_keys, stage_view

log = logging.getLogger("distill")

DATA_FILE = "data.json"  # content hashes of the data the stage was trained on
LOCK_FILE = ".lock"
READER_PREFIX = ".reader-"  # marks of the runs reading this folder (a student its teacher)
TRANSFER_KEY = "data.transfer["  # data.json's entries for transfer sets (data.transfer.transfer_identity)
STALE_ENV = "DISTILL_LOCK_STALE_S"
DEFAULT_STALE_S = 300.0


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
        # splits, and the transfer sets a record names (one written before they were recorded
        # does not name them)
        names = set(before) | {k for k in data if k in before or not k.startswith(TRANSFER_KEY)}
        changed = sorted(k for k in names if before.get(k) != data.get(k))
    if keys or changed:
        if not plan.overwrite:
            splits = [k for k in changed if not k.startswith(TRANSFER_KEY)]
            sources = [k for k in changed if k.startswith(TRANSFER_KEY)]
            what = (
                "was trained on other data ("
                + " and ".join(([f"splits {splits}"] if splits else []) + ([", ".join(sources)] if sources else []))
                + " changed since)" if not keys
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


# ---------------------------------------------------------------------------------------------
# Locks with a heartbeat
# ---------------------------------------------------------------------------------------------


def stale_s() -> float:
    """Seconds without a heartbeat after which a lock (or a reader's mark) is stale."""
    return seconds_from_env(STALE_ENV, DEFAULT_STALE_S)


def beat_s() -> float:
    """How often a holder refreshes its lock: often enough that a live one is never stale."""
    return max(0.05, min(30.0, stale_s() / 10))


@dataclass
class LockFile:
    """What a lock file (or a reader's mark) says, read once."""

    path: Path
    raw: bytes  # the bytes judged: a take-over removes the file only if they are still there
    info: Optional[dict]  # None: unreadable (damaged, cut short)
    problem: Optional[str]  # why it is unreadable
    age: float  # seconds since its last heartbeat (or, unreadable, since it was last written)

    @classmethod
    def read(cls, path: Path) -> Optional["LockFile"]:
        try:
            raw = path.read_bytes()
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        info, problem = None, None
        try:
            info = json.loads(raw)
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            info, problem = None, f"unreadable: {err}" if raw else "empty"
        beat = info.get("beat") if info else None
        last = max(mtime, beat) if isinstance(beat, (int, float)) else mtime
        return cls(path, raw, info, problem, max(0.0, time.time() - last))

    @property
    def holder(self) -> str:
        if self.info is None:
            return f"an unknown process (the lock file is damaged: {self.problem})"
        return f"process {self.info.get('pid')} on {self.info.get('host')}"

    @property
    def beat(self) -> Any:
        return (self.info or {}).get("beat", self.raw)

    def verdict(self, stale: float) -> str:
        """'alive', 'gone' (stale, or its process ended on this host) or 'unsure' (another host's
        or an unreadable lock, not stale yet: watch whether it still beats)."""
        if self.info is None:
            return "gone" if self.age > stale else "unsure"
        here = self.info.get("host") == socket.gethostname()
        if here and not _process_alive(self.info.get("pid")):
            return "gone"
        # a live process id here with no heartbeat for that long: frozen, or the id was reused
        # (a lock without heartbeats, from an older version, is judged by its process alone)
        if self.age > stale and ("beat" in self.info or not here):
            return "gone"
        return "alive" if here else "unsure"

    def describe(self, stale: float) -> str:
        what = f" ({self.info['what']})" if self.info and self.info.get("what") else ""
        return f"{self.holder}{what}, last heartbeat {self.age:.0f} s ago"


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM  # exists, owned by someone else
    return True


class Heartbeat:
    """A thread that rewrites a lock file every `beat_s()` seconds with a fresh `beat` time, so
    another host can tell a live holder from a dead one. It stops when the file is no longer
    this holder's (taken over after this process went silent), and says so."""

    def __init__(self, path: Path, info: dict):
        self.path, self.info = path, info
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"distill-lock-{path.name}")
        self.thread.start()

    def _run(self) -> None:
        every = beat_s()
        while not self.stop.wait(every):
            try:
                current = json.loads(self.path.read_text())
            except (OSError, ValueError):
                current = None
            if not current or current.get("token") != self.info["token"]:
                log.warning("the lock %s is no longer this process's (%s): another run took it over", self.path, current)
                return
            self.info["beat"] = time.time()
            _write_lock(self.path, self.info, replace=True)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _write_lock(path: Path, info: dict, replace: bool) -> None:
    """Write a lock file whole: through a temporary file, then a rename (`replace`) or a hard
    link that fails when the lock exists (FileExistsError): never a torn or half-taken lock."""
    tmp = path.with_name(f".tmp{path.name}-{info['host']}-{info['pid']}-{info['token']}")
    tmp.write_text(json.dumps(info))
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _new_info(what: str) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex[:12],
            "what": what, "since": now, "beat": now}


def _take_over(found: LockFile, why: str) -> bool:
    """Remove a stale lock if it is still the one judged (another run may have taken it over in
    the meantime); True when it was removed."""
    aside = found.path.with_name(f".stale{found.path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(found.path, aside)
    except FileNotFoundError:
        return False
    if aside.read_bytes() != found.raw:  # a fresh lock taken since: put it back
        with contextlib.suppress(OSError):
            os.link(aside, found.path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    print(f"[distill] taking over a stale lock {found.path}: {why}", flush=True)
    return True


class StageLock:
    """One process at a time owns a stage folder: `<stage>/.lock` names the host and process,
    and the holder refreshes it every `beat_s()` seconds from a thread (`Heartbeat`).

    A second run on the same folder stops, naming the holder, as soon as it knows the holder is
    alive: at once on the same host (its process exists), after seeing one more heartbeat from
    another host. A lock is taken over, with a message naming its old holder, when its holder's
    process ended (same host) or its heartbeat is older than DISTILL_LOCK_STALE_S seconds
    (default 300; any host): a run killed with SIGKILL or lost with its node, requeued anywhere,
    waits that long at most and resumes. A damaged (unreadable) lock is judged by its age alike.
    """

    def __init__(self, out: Path, what: str = ""):
        self.path = out / LOCK_FILE
        self.what = what
        self.heartbeat: Optional[Heartbeat] = None

    @property
    def held(self) -> bool:
        return self.heartbeat is not None

    def __enter__(self) -> "StageLock":
        stale, waited_for = stale_s(), None
        while True:
            info = _new_info(self.what)
            try:
                _write_lock(self.path, info, replace=False)
            except FileExistsError:
                pass
            else:
                self.heartbeat = Heartbeat(self.path, info)
                return self
            found = LockFile.read(self.path)
            if found is None:
                continue  # released this instant
            verdict = found.verdict(stale)
            if verdict == "gone":
                _take_over(found, f"held by {found.describe(stale)} (no heartbeat for {stale:.0f} s, "
                                  f"{STALE_ENV}, or its process has ended)")
                continue
            if verdict == "alive" or (waited_for is not None and found.beat != waited_for.beat):
                raise StageError(
                    f"{self.path.parent} is in use by {found.describe(stale)} (lock {self.path}): wait "
                    f"for it to finish, or stop it. A lock whose holder stops beating for {stale:.0f} s "
                    f"({STALE_ENV}) is taken over by the next run."
                )
            if waited_for is None:  # another host's, or damaged: is it still beating?
                print(f"[distill] {self.path.parent} is locked by {found.describe(stale)}: waiting up to "
                      f"{max(0.0, stale - found.age):.0f} s to see whether it is alive", flush=True)
                waited_for = found
            time.sleep(min(beat_s(), max(0.05, stale - found.age + 0.05)))

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.close()
            current = LockFile.read(self.path)
            if current is not None and current.info and current.info.get("token") == self.heartbeat.info["token"]:
                self.path.unlink(missing_ok=True)
            self.heartbeat = None


class ReaderMark:
    """A stage that reads another stage's folder (a student reading its teacher) marks it with
    `.reader-<host>-<pid>-<token>` (refreshed by a heartbeat) for as long as it runs; a stage
    about to overwrite or (re)train that folder refuses while a live mark is there
    (`check_no_readers`). A folder a live run is writing (its lock is held) cannot be marked.
    Both sides write their file first and look for the other's second, so at most one goes on."""

    def __init__(self, folder: Path, what: str):
        self.folder, self.what = folder, what
        self.heartbeat: Optional[Heartbeat] = None

    def __enter__(self) -> "ReaderMark":
        info = _new_info(self.what)
        path = self.folder / f"{READER_PREFIX}{info['host']}-{info['pid']}-{info['token']}"
        _write_lock(path, info, replace=True)
        self.heartbeat = Heartbeat(path, info)
        writer = LockFile.read(self.folder / LOCK_FILE)
        if writer is not None and writer.verdict(stale_s()) != "gone":
            self.__exit__()
            raise StageError(
                f"{self.folder} is being written by {writer.describe(stale_s())} (lock {writer.path}): "
                "this stage reads it, so wait for that run to finish, then re-run the same command."
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.heartbeat is not None:
            self.heartbeat.close()
            self.heartbeat.path.unlink(missing_ok=True)
            self.heartbeat = None


def check_no_readers(folder: Path) -> None:
    """Refuse to overwrite or retrain `folder` while another run reads it (see `ReaderMark`);
    marks whose heartbeat stopped are removed."""
    stale = stale_s()
    live = []
    for path in sorted(folder.glob(f"{READER_PREFIX}*")) if folder.is_dir() else []:
        found = LockFile.read(path)
        if found is None:
            continue
        if found.verdict(stale) == "gone":
            print(f"[distill] removing a stale reader mark {path} ({found.describe(stale)})", flush=True)
            path.unlink(missing_ok=True)
        else:
            live.append(found)
    if live:
        raise StageError(
            f"{folder} is being read by {'; '.join(f.describe(stale) for f in live)}: overwriting or "
            f"retraining it now would pull it from under that run. Wait for it to finish (a reader "
            f"that stops beating for {stale:.0f} s, {STALE_ENV}, no longer counts), or use another "
            "output_dir (teacher.dir)."
        )


@contextlib.contextmanager
def locked(accelerator: Any, out: Path, check: Optional[Callable[[], Any]] = None, what: str = "") -> Iterator[Any]:
    """Hold the stage folder's lock for the body (the main process takes it). `check()` runs on
    the main process once the lock is held (e.g. reading the stage's status: under the lock, no
    other run can finish or start the stage in between); the body gets its result on every
    process. A failure reaches every process (`launch.on_main`), so none waits for a process
    that stopped."""
    lock = StageLock(out, what)

    def take() -> Any:
        out.mkdir(parents=True, exist_ok=True)
        lock.__enter__()
        try:
            return check() if check is not None else None
        except BaseException:
            lock.release()
            raise

    result = on_main(accelerator, f"taking the lock on {out}", take)
    try:
        yield result
    finally:
        lock.release()


@contextlib.contextmanager
def reading(accelerator: Any, folders: Sequence[Path], what: str) -> Iterator[None]:
    """Mark `folders` as read by this stage for the body (see `ReaderMark`; the main process
    marks them)."""
    marks = [ReaderMark(folder, what) for folder in folders]
    taken: list[ReaderMark] = []

    def take() -> None:
        for mark in marks:
            if mark.folder.is_dir():
                mark.__enter__()
                taken.append(mark)

    try:
        on_main(accelerator, f"marking {', '.join(map(str, folders))} as read", take)
        yield
    finally:
        for mark in taken:
            mark.__exit__()


def clear_stage_dir(out: Path) -> None:
    """Remove an old run's files (overwrite=true), keeping this run's lock and readers' marks."""
    for path in out.iterdir():
        if path.name == LOCK_FILE or path.name.startswith(READER_PREFIX):
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


