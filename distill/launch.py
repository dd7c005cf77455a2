"""What a launch gives a run beyond the recipe: its processes, and the precision its device allows.

**Waits between processes.** Under `accelerate launch` / torchrun every process runs the same
stage, and some work is done by the main process alone while the others wait for it (taking the
stage lock, writing config.yaml, merging the teacher cache, building augmented rows, writing a
checkpoint's checksums). Those waits go through three calls:

    on_main(accelerator, "taking the lock on runs/x/student", work)  # work() on the main process;
                                                                    # its result on every process
    with main_first(accelerator, "building augmented rows"): ...    # the main process first
    with together(accelerator, "writing teacher cache shards"): ... # every process; all learn
                                                                    # whether all succeeded

None of them waits forever, and none hides a failure:

- the outcome of the work (its result, or its error) is posted to the launch's key-value store
  (the one torch.distributed met through), where each waiting process reads it: an error on one
  process is raised on every process as `PeerFailed`, naming the process that failed, what it
  was doing and its error, instead of leaving the others in a barrier;
- every process beats (a counter in the store, from a thread, every few seconds), and a process
  waits only while the one it waits for beats: after `DISTILL_WAIT_S` seconds (default 600)
  without a beat, the process it waits for stopped, hangs in a frozen machine, or lost its node,
  and the waiting one stops naming it. Long work (augmenting a large set, merging a large cache)
  keeps beating, so it is waited for as long as it runs.

Processes must make these calls in the same order (they are numbered), as they make any
collective. A launch without a TCP store falls back on collectives, which still carry errors
but wait as long as torch's own timeout.

**Precision.** accelerate keeps `mixed_precision="fp16"` on a CPU, where it cannot apply (no
autocast, no scaler: the model trains in fp32). `effective_precision` is what actually applies;
the teacher cache's key and the teacher's dtype follow it, and `precision_note` says so at start.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from distill.errors import Preempted, StageError

WAIT_ENV = "DISTILL_WAIT_S"
DEFAULT_WAIT_S = 600.0
ACK_S = 10.0  # how long a failing process waits for the others to read its error
T = TypeVar("T")


class PeerFailed(StageError):
    """Another process of this launch failed, or went silent, while this one waited for it."""


def seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from environment variable `name` (unset: `default`)."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if value <= 0:
        raise StageError(f"{name}={raw!r}: use a number of seconds > 0 (default {default:.0f})")
    return value


def wait_s() -> float:
    """Seconds of silence after which a waiting process gives up on another (DISTILL_WAIT_S)."""
    return seconds_from_env(WAIT_ENV, DEFAULT_WAIT_S)


def describe(err: BaseException) -> str:
    """`Type: message (raised in function, file:line)`: the error and the line that raised it."""
    text = f"{type(err).__name__}: {getattr(err, 'message', None) or err}"
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ else []
    if frames:
        last = frames[-1]
        text += f" (raised in {last.name}, {Path(last.filename).name}:{last.lineno})"
    return text


def _outcome(err: BaseException) -> tuple:
    if isinstance(err, Preempted):  # a signal: the others stop for a requeue too, not for an error
        return ("preempted", err.message)
    return ("error", describe(err))


class _Caller:
    """Store calls made from a thread of their own, each waited for at most a given time: the
    process hosting the store may be frozen (a stopped machine answers no call, and a store call
    has no timeout of its own), and a waiting process must still be able to give up."""

    def __init__(self, host: str, port: int):
        self.calls: queue.Queue = queue.Queue()
        self.host, self.port = host, port
        threading.Thread(target=self._run, daemon=True, name="distill-store").start()

    def _run(self) -> None:
        import torch.distributed as dist

        client = None
        while True:
            fn, box, done = self.calls.get()
            try:
                if client is None:  # a client of its own: the training's is not shared across threads
                    client = dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                                           timeout=timedelta(seconds=60))
                box.append((True, fn(client)))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                box.append((False, err))
            done.set()

    def __call__(self, fn: Callable[[Any], T], timeout: float) -> T:
        """`fn(store)`; TimeoutError when it has not returned within `timeout` seconds."""
        box: list = []
        done = threading.Event()
        self.calls.put((fn, box, done))
        if not done.wait(max(0.0, timeout)):
            raise TimeoutError
        ok, value = box[0]
        if not ok:
            raise value
        return value


class Board:
    """This process's view of the launch's key-value store: numbered outcomes and beats."""

    def __init__(self, host: str, port: int, rank: int, size: int):
        self.rank, self.size = rank, size
        self.seq = 0
        # a restarted elastic launch keeps its store: its keys must not meet the last attempt's
        self.prefix = f"distill/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.wait = wait_s()
        self.call = _Caller(host, port)
        beat_s = max(0.1, min(5.0, self.wait / 10))
        threading.Thread(target=self._beat, args=(host, port, beat_s), daemon=True, name="distill-beat").start()

    def _beat(self, host: str, port: int, every: float) -> None:
        import torch.distributed as dist

        try:
            client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60), wait_for_workers=False)
            while True:
                client.add(f"{self.prefix}beat/{self.rank}", 1)
                time.sleep(every)
        except Exception:  # the store is gone: the launch is ending
            return

    def next_key(self) -> str:
        self.seq += 1
        return f"{self.prefix}{self.seq}"

    def _silent(self, source: int, where: str) -> PeerFailed:
        return PeerFailed(
            f"process {self.rank} of {self.size} waited for process {source} while {where}, and heard "
            f"nothing from it for {self.wait:.0f} s ({WAIT_ENV}): it stopped, hangs, or lost its "
            "machine. See its output; re-run the same command to resume"
        )

    def _lost(self, source: int, where: str, err: BaseException) -> PeerFailed:
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        return PeerFailed(
            f"process {self.rank} of {self.size} lost the launch's store while waiting for process "
            f"{source} ({where}): {text}. The process holding it stopped: see the output of the "
            "other processes"
        )

    def post(self, key: str, outcome: tuple, where: str = "") -> None:
        data = pickle.dumps(outcome)
        try:
            self.call(lambda store: store.set(key, data), self.wait)
        except TimeoutError:
            raise self._silent(0, where or "posting its outcome") from None
        except (RuntimeError, OSError) as err:
            raise self._lost(0, where or "posting its outcome", err) from None

    def fail(self, key: str, err: BaseException) -> None:
        """Post this process's failure; the main process, which may host the store and end with
        it, gives the others a moment to read it."""
        try:
            self.call(lambda store: store.set(key, pickle.dumps(_outcome(err))), ACK_S)
            deadline = time.monotonic() + ACK_S
            while self.rank == 0 and time.monotonic() < deadline:
                if self.call(lambda store: store.add(f"{key}/read", 0), ACK_S) >= self.size - 1:
                    break
                time.sleep(0.05)
        except Exception:  # the store is gone or frozen: nothing more to tell
            pass

    def expect(self, key: str, source: int, where: str) -> Any:
        """The outcome `source` posts under `key`: its result, or its failure raised here."""
        beat_key = f"{self.prefix}beat/{source}"
        last, seen, delay = None, time.monotonic(), 0.005
        while True:
            left = self.wait - (time.monotonic() - seen)
            try:
                found, beat = self.call(lambda store: (store.check([key]), store.add(beat_key, 0)), left)
                if found:
                    outcome = pickle.loads(self.call(lambda store: store.get(key), self.wait))
                    break
            except TimeoutError:  # the store's host does not answer either
                raise self._silent(source, where) from None
            except (RuntimeError, OSError) as err:
                raise self._lost(source, where, err) from None
            now = time.monotonic()
            if beat != last:
                last, seen = beat, now
            elif now - seen > self.wait:
                raise self._silent(source, where)
            time.sleep(delay)
            delay = min(0.5, delay * 2)
        if outcome[0] == "ok":
            return outcome[1]
        with contextlib.suppress(Exception):
            self.call(lambda store: store.add(f"{key}/read", 1), ACK_S)
        if outcome[0] == "preempted":
            raise Preempted(outcome[1])
        who = "the main process (0)" if source == 0 else f"process {source}"
        raise PeerFailed(f"process {self.rank} of {self.size} stops: {who} failed while {where}: {outcome[1]}")


_BOARD: dict[str, Any] = {}


def board(accelerator: Any) -> Optional[Board]:
    """The launch's board (made once per process, when it first waits or is first asked: from
    then on it beats), or None for one process or without a TCP store."""
    if accelerator.num_processes == 1:
        return None
    if "board" not in _BOARD:
        _BOARD["board"] = None
        try:
            from torch.distributed import distributed_c10d as c10d

            base = c10d._get_default_store()
        except Exception:
            base = None
        tcp = base
        while tcp is not None and hasattr(tcp, "underlying_store"):
            tcp = tcp.underlying_store
        if tcp is not None and hasattr(tcp, "host") and hasattr(tcp, "port"):
            _BOARD["board"] = Board(tcp.host, tcp.port, accelerator.process_index, accelerator.num_processes)
    return _BOARD["board"]


def _fallback_share(accelerator: Any, outcome: Optional[tuple], where: str) -> Any:
    """Without a store: the main process's outcome broadcast to every process."""
    from accelerate.utils import broadcast_object_list

    box = [outcome]
    broadcast_object_list(box)
    kind, value = box[0]
    if kind == "ok":
        return value
    if kind == "preempted":
        raise Preempted(value)
    raise PeerFailed(f"process {accelerator.process_index} of {accelerator.num_processes} stops: the main "
                     f"process (0) failed while {where}: {value}")


def on_main(accelerator: Any, where: str, work: Optional[Callable[[], T]] = None) -> Optional[T]:
    """`work()` on the main process; its result on every process, or its error raised on every
    process (`PeerFailed` on the others). `where` says what the main process is doing."""
    if accelerator.num_processes == 1:
        return work() if work is not None else None
    b = board(accelerator)
    key = b.next_key() if b is not None else ""
    if not accelerator.is_main_process:
        return b.expect(key, 0, where) if b is not None else _fallback_share(accelerator, None, where)
    try:
        result = work() if work is not None else None
    except BaseException as err:
        if b is not None:
            b.fail(key, err)
        else:
            with contextlib.suppress(Exception):
                _fallback_share(accelerator, _outcome(err), where)
        raise
    if b is not None:
        b.post(key, ("ok", result), where)
    else:
        _fallback_share(accelerator, ("ok", result), where)
    return result


@contextlib.contextmanager
def together(accelerator: Any, where: str) -> Iterator[None]:
    """A block every process runs; at its end each learns whether every other one succeeded (a
    failure anywhere is raised everywhere, naming the process)."""
    if accelerator.num_processes == 1:
        yield
        return
    b = board(accelerator)
    if b is None:
        yield
        accelerator.wait_for_everyone()
        return
    key = b.next_key()
    try:
        yield
    except BaseException as err:
        b.fail(f"{key}/{b.rank}", err)
        raise
    b.post(f"{key}/{b.rank}", ("ok", None), where)
    for r in range(b.size):
        if r != b.rank:
            b.expect(f"{key}/{r}", r, where)


@contextlib.contextmanager
def main_first(accelerator: Any, where: str) -> Iterator[None]:
    """The block on the main process, then (once it succeeded) on the others, e.g. to build a
    cache once and read it everywhere; a failure on any process is raised on every one."""
    if accelerator.num_processes == 1:
        yield
        return
    b = board(accelerator)
    if b is None:
        with accelerator.main_process_first():
            yield
        return
    first, then = b.next_key(), b.next_key()
    if b.rank == 0:
        try:
            yield
        except BaseException as err:
            b.fail(first, err)
            raise
        b.post(first, ("ok", None), where)
        for r in range(1, b.size):
            b.expect(f"{then}/{r}", r, where)
        return
    b.expect(first, 0, where)
    try:
        yield
    except BaseException as err:
        b.fail(f"{then}/{b.rank}", err)
        raise
    b.post(f"{then}/{b.rank}", ("ok", None), where)


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------


def effective_precision(accelerator: Any) -> str:
    """The mixed precision that applies: accelerate's setting, except fp16 on a CPU (accelerate
    keeps the name but trains in fp32 there, without autocast or a scaler)."""
    mixed = str(accelerator.mixed_precision)
    engine = str(getattr(accelerator, "distributed_type", ""))
    if mixed == "fp16" and accelerator.device.type == "cpu" and "DEEPSPEED" not in engine and "MEGATRON" not in engine:
        return "no"
    return mixed


def precision_note(accelerator: Any) -> Optional[str]:
    """What to say at start when the launch's precision does not apply on this device."""
    if effective_precision(accelerator) != str(accelerator.mixed_precision):
        return (
            f"mixed_precision={accelerator.mixed_precision} does not apply on {accelerator.device.type}: "
            "this run trains and runs the teacher in fp32 (and records fp32). Use bf16 on a CPU, "
            "or a GPU for fp16"
        )
    return None
