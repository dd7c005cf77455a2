"""One training step, and the one thing it reads back from the device.

`train_step` runs a micro-batch: teacher signals, student forward and loss terms, backward; on
the last micro-batch of an optimizer step it clips, reads, and steps. The read is the step's
only host sync and only collective (`StepGuard.read`): one vector, summed over processes, holding

    whether the loss was non-finite (any micro-batch, any process)
    whether the gradient norm was non-finite
    whether a process was asked to stop (SIGTERM/SIGINT: checkpoint and exit)
    the fp16 loss scale the step ran with
    on a logging step, the window's loss sums (train/loss, train/loss_<term>)

Mixed precision as the libraries intend it. In bf16 or fp32 a non-finite loss or gradient stops
the run before the weights change (`NonFiniteLoss`). In fp16 accelerate's `GradScaler` owns
overflow: a gradient that overflows at the current loss scale makes it skip the optimizer step
and halve the scale, a normal event that is counted and logged (`train/skipped_steps`,
`train/loss_scale`) while the run goes on. The run stops only on a non-finite *loss* once the
scale is at its floor (`LOSS_SCALE_FLOOR`: the overflow is then the model's, not the scale's), or
after `train.max_skipped_steps` consecutive skipped steps, each with a message that says which.

`scripts/bench_train.py` times this same step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator

from distill.errors import NonFiniteLoss

# A non-finite loss while the fp16 loss scale is at or below this stops the run: lowering the
# scale further cannot make the loss finite (DeepSpeed's min_loss_scale default, too).
LOSS_SCALE_FLOOR = 1.0


@dataclass
class StepResult:
    loss: torch.Tensor  # the weighted total of this micro-batch, on the device
    terms: dict[str, torch.Tensor]  # each term's value, on the device
    synced: bool = False  # this micro-batch ended an optimizer step (the fields below apply)
    error: Optional[str] = None  # why the run must stop: "loss", "gradient norm", "floor" or "skips"
    skipped: bool = False  # the fp16 gradient scaler skipped the optimizer step (overflow)
    stop: bool = False  # a process was asked to stop: checkpoint and exit
    record: Optional[dict] = None  # the logging window's values, on a logging step
    scale: Optional[float] = None  # the fp16 loss scale the step ran with


@dataclass
class Window:
    """Loss terms and throughput accumulated on the device between two log records."""

    start: float = field(default_factory=time.perf_counter)
    samples: int = 0
    sums: dict = field(default_factory=dict)  # name -> device tensor
    counts: dict = field(default_factory=dict)  # name -> micro-batches it was summed over
    skipped: int = 0  # optimizer steps the fp16 gradient scaler skipped

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], rows: int) -> None:
        self.samples += rows
        for name, value in {**terms, "total": loss}.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
            self.counts[name] = self.counts.get(name, 0) + 1

    def values(self) -> list[torch.Tensor]:
        return [self.sums[name].reshape(1) for name in self.sums]

    def record(self, sums: list[float], processes: int) -> dict:
        """The log record from the window's sums as read (summed over processes)."""
        out = {}
        for name, total in zip(self.sums, sums):
            out["train/loss" if name == "total" else f"train/loss_{name}"] = total / processes / self.counts[name]
        out["train/samples_per_s"] = self.samples / max(time.perf_counter() - self.start, 1e-9)
        return out


class StepGuard:
    """Finiteness of the optimizer step being accumulated (on the device), the one read per
    optimizer step, and the count of steps the fp16 gradient scaler skipped."""

    def __init__(self, accelerator: Accelerator, max_skipped: int = 0):
        self.accelerator = accelerator
        self.scaler = getattr(accelerator, "scaler", None)  # fp16: a GradScaler; else None
        self.max_skipped = max_skipped
        self.bad_loss: Optional[torch.Tensor] = None
        self.consecutive = self.total = 0  # skipped optimizer steps: in a row, in all

    def watch(self, loss: torch.Tensor) -> None:
        flag = ~torch.isfinite(loss.detach())
        self.bad_loss = flag if self.bad_loss is None else self.bad_loss | flag

    def read(self, norm: Any, stop: bool, window: Optional[Window]) -> StepResult:
        """One reduce and one host read: (error, stop, scale, record) of the step about to be
        taken. Every process gets the same values, so all stop or step together."""
        acc = self.accelerator
        device = self.bad_loss.device
        bad_grad = torch.zeros((), device=device) if norm is None else ~torch.isfinite(torch.as_tensor(norm, device=device))
        parts = [self.bad_loss.float().reshape(1), bad_grad.float().reshape(1), torch.full((1,), float(stop), device=device)]
        if self.scaler is not None:
            parts.append(self.scaler._get_scale_async().float().reshape(1).to(device))
        if window is not None:
            parts.extend(window.values())
        vector = torch.cat(parts)
        if acc.num_processes > 1:
            vector = acc.reduce(vector, "sum")
        values = vector.tolist()  # the step's one host read
        self.bad_loss = None
        n = acc.num_processes
        scale = values[3] / n if self.scaler is not None else None
        sums = values[4 if self.scaler is not None else 3:]
        error = None
        if self.scaler is None:
            error = "loss" if values[0] > 0 else "gradient norm" if values[1] > 0 else None
        elif values[0] > 0 and scale <= LOSS_SCALE_FLOOR:
            error = "floor"  # otherwise the scaler skips the step and lowers the scale
        record = window.record(sums, n) if window is not None else None
        return StepResult(torch.empty(0), {}, True, error, False, values[2] > 0, record, scale)

    def stepped(self, optimizer: Any) -> bool:
        """After `optimizer.step()`: whether the scaler skipped it (accelerate tells, without a
        read), counted; True in `too_many` once the skips in a row reach the limit."""
        skipped = self.scaler is not None and bool(getattr(optimizer, "step_was_skipped", False))
        self.consecutive = self.consecutive + 1 if skipped else 0
        self.total += skipped
        return skipped

    @property
    def too_many(self) -> bool:
        return self.max_skipped > 0 and self.consecutive >= self.max_skipped


def train_step(
    accelerator: Accelerator, trainee: torch.nn.Module, batch: dict, task: Any, teacher: Any,
    optimizer: Any, scheduler: Any, max_grad_norm: float, guard: StepGuard,
    window: Optional[Window] = None, log: bool = False, stop: Optional[Callable[[], bool]] = None,
) -> StepResult:
    """One micro-batch: teacher signals, student forward + loss terms, backward; on the last
    micro-batch of an optimizer step also clip, read (`StepGuard.read`: with the window's sums
    when `log`, and whether this process was asked to stop, `stop()` asked at the read) and,
    unless that says stop, step. Nothing else is read from the device and nothing else is
    exchanged between processes."""
    with accelerator.accumulate(trainee):
        signals = teacher(batch) if teacher is not None else None
        _, loss, terms = trainee(task.model_inputs(batch), batch, signals)
        guard.watch(loss)
        if window is not None:
            window.add(loss, terms, len(batch["feature_id"]) * accelerator.num_processes)
        accelerator.backward(loss)
        if not accelerator.sync_gradients:
            return StepResult(loss, terms)
        # fp16: clipping unscales first, so an overflow shows as a non-finite norm (DeepSpeed
        # clips inside its engine and may report none)
        norm = accelerator.clip_grad_norm_(trainee.parameters(), max_grad_norm) if max_grad_norm > 0 else None
        result = guard.read(norm, stop is not None and stop(), window if log else None)
        result.loss, result.terms = loss, terms
        if result.error is not None:  # before the weights change
            return result
        optimizer.step()  # fp16: the scaler steps, or skips on overflow and lowers the scale
        result.skipped = guard.stepped(optimizer)
        if guard.too_many:
            result.error = "skips"
        if not result.skipped:
            scheduler.step()
        optimizer.zero_grad()
    return result


def nonfinite_error(accelerator: Accelerator, result: StepResult, batch: dict, where: str, guard: StepGuard, limit: int) -> NonFiniteLoss:
    """The error that stops a run at a step (`where`: step, epoch, batch, the checkpoint kept):
    what went non-finite, the loss terms and this process's batch ids."""
    loss = float(result.loss.detach())
    on = f" on process {accelerator.process_index}" if accelerator.num_processes > 1 else ""
    terms = {k: float(v.detach()) for k, v in result.terms.items()}
    ids = batch["example_id"].tolist()
    if result.error == "skips":
        return NonFiniteLoss(
            f"{guard.consecutive} optimizer steps in a row were skipped by the fp16 gradient scaler "
            f"(train.max_skipped_steps={limit}; loss scale now {result.scale:g}) {where}: the gradients "
            f"overflow at every scale it tried. Last loss terms {terms}{on}, batch example_ids {ids}. "
            "Lower train.lr, raise train.warmup_ratio, train in bf16, or raise train.max_skipped_steps."
        )
    if result.error == "floor":
        return NonFiniteLoss(
            f"non-finite loss ({loss}{on}) {where} with the fp16 loss scale at its floor "
            f"({result.scale:g} <= {LOSS_SCALE_FLOOR:g}): lowering the scale cannot help, the forward "
            f"itself overflows. Loss terms {terms}, batch example_ids {ids}. "
            "Train in bf16 (or fp32), lower train.lr, or check those rows."
        )
    return NonFiniteLoss(
        f"non-finite {result.error} ({loss}{on}) {where}: loss terms {terms}, batch example_ids {ids}. "
        "Lower train.lr, raise train.warmup_ratio, or check those rows."
    )
