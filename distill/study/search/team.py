"""The processes of one search worker: the main process talks to the study, the others follow it.

Under `accelerate launch` or torchrun every process runs the same trials (a trial's stage can use
several devices), but only the main process asks the study for a trial, reports evaluations to
the pruner, measures objectives and writes the tables. `Team.lead(where, work)` runs `work()` on
the main process and hands its result to every process. When `work` raises, the others get an
error marker instead of the result and raise `MainProcessFailed`, naming the main process, what
it was doing and where its error came from; a process that hears nothing for `WAIT_S` seconds
raises too, so no process waits forever. A single process leads itself.

What happens inside a stage (the training loop's own collectives) is the loop's business: an
error there reaches the other processes through the loop, not through the team.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

from distill.launch import describe
from distill.config.search_space import SearchError

# How long a process waits for the main one at each hand-over. Between two hand-overs the main
# process alone opens the study, preflights the recipe, measures a trial's latency and writes
# the tables: minutes at most.
WAIT_S = 30 * 60


class MainProcessFailed(SearchError):
    """The main process of this worker failed, or went silent, before it shared what the others
    wait for."""


class Team:
    """The processes of one worker (a single process is a team of one)."""

    def __init__(self) -> None:
        self.size, self.rank, self.group = 1, 0, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # as Accelerator() reads it: processes started on CPU (torchrun, accelerate launch --cpu)
            state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
            self.size, self.rank = state.num_processes, state.process_index
            # the search's hand-overs go over their own CPU group, with their own timeout: the
            # training's group may be NCCL, and waits as long as the loop allows
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=WAIT_S))
        self.told = False  # the main process has shared an error: the others have stopped
        self.stage_error: Optional[BaseException] = None  # raised inside a stage, on every process

    @property
    def main(self) -> bool:
        return self.rank == 0

    def lead(self, where: str, work: Optional[Callable[[], Any]] = None) -> Any:
        """`work()` on the main process; its result on every process (`work` is ignored on the
        others). `where` says what the main process is doing, in messages."""
        if self.size == 1:
            return work() if work is not None else None
        if not self.main:
            message = self._receive(where)
            if message[0] == "error":
                raise MainProcessFailed(f"process {self.rank} of {self.size} stops: the main process (0) failed "
                                        f"while {message[1]}: {message[2]}")
            return message[1]
        try:
            result = work() if work is not None else None
        except BaseException as err:
            self.fail(where, err)
            raise
        self._send(("ok", result), where)
        return result

    def fail(self, where: str, err: BaseException) -> None:
        """Main process: tell the others, waiting for it, that it failed while `where`."""
        if self.size > 1 and self.main and not self.told and err is not self.stage_error:
            self.told = True
            self._send(("error", where, describe(err)), where)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A stage every process runs: an error inside it is not the team's to share."""
        try:
            yield
        except BaseException as err:
            self.stage_error = err
            raise

    def _send(self, message: tuple, where: str) -> None:
        import torch.distributed as dist

        try:
            dist.broadcast_object_list([message], src=0, group=self.group)
        except RuntimeError as err:  # a process that stopped, or did not answer in WAIT_S
            self.told = True  # there is no one left to tell
            raise MainProcessFailed(f"the main process could not reach the other {self.size - 1} process(es) "
                                    f"while {where}: {err}") from None

    def _receive(self, where: str) -> tuple:
        import torch.distributed as dist

        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as err:
            raise MainProcessFailed(
                f"process {self.rank} of {self.size} waited for the main process (0) while {where}, and heard "
                f"nothing within {WAIT_S:.0f} s or lost it ({str(err).splitlines()[0][:200]}): it stopped or "
                "hangs; see its output") from None
        return box[0]
