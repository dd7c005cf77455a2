"""Checkpoints, resume and signals: a stage survives preemption.

A checkpoint is accelerate's state (model, optimizer, scheduler, RNG) plus the loop state and the
best model so far, written under a temporary name and renamed when complete, so a crash mid-save
never leaves a broken latest checkpoint. SIGTERM/SIGINT set a flag; the loop finishes its step,
checkpoints and exits with REQUEUE_EXIT_CODE, and the same command resumes mid-epoch.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from distill.errors import REQUEUE_EXIT_CODE, Preempted
from distill.launch import on_main, together
from distill.files import check_free_space, link_tree, swap_in, verify_checksums, write_checksums

log = logging.getLogger("distill")


@dataclass
class LoopState:
    """Where the loop is; saved beside every checkpoint as loop_state.json."""

    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` already consumed
    global_step: int = 0  # optimizer steps
    best_metric: Optional[float] = None
    best_step: int = 0
    bad_evals: int = 0  # evaluations without improvement (early stopping)
    finished: bool = False  # early stopping or max_steps ended training
    history: list = field(default_factory=list)


def verify(checkpoint: Path) -> Optional[str]:
    """None when every file of `checkpoint` matches its recorded checksum, else what is wrong."""
    try:
        json.loads((checkpoint / "loop_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"no readable loop_state.json ({err})"
    return verify_checksums(checkpoint)


def latest_checkpoint(ckpt_root: Path, verified: bool = False) -> Optional[Path]:
    """The newest complete checkpoint (folders appear only once complete: see save_checkpoint).
    With `verified`, a checkpoint whose files do not match their checksums is skipped, with a
    warning, for the one before it."""
    done = [p for p in ckpt_root.glob("step-*") if (p / "loop_state.json").exists()]
    for path in sorted(done, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        problem = verify(path) if verified else None
        if problem is None:
            return path
        log.warning("checkpoint %s is not usable (%s); trying the one before it", path, problem)
    return None


def checkpoint_bytes(model: nn.Module) -> int:
    """A checkpoint's size: the weights, AdamW's two moments and the best model (fp32)."""
    return sum(p.numel() * 4 for p in model.parameters()) * 4


def save_checkpoint(
    accelerator: Accelerator, ckpt_root: Path, state: LoopState, keep: int, best_dir: Path, needed_bytes: int = 0
) -> Path:
    """Save into a temp folder, checksum every file, rename it when complete, keep the newest
    `keep`. The disk is checked first: a full disk fails with a message, never mid-file."""
    final = ckpt_root / f"step-{state.global_step}"
    tmp = ckpt_root / f".tmp-step-{state.global_step}"

    def make_room() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt_root.mkdir(parents=True, exist_ok=True)
        check_free_space(ckpt_root, needed_bytes, "a checkpoint")

    def seal() -> None:
        if best_dir.exists():
            link_tree(best_dir, tmp / "best")
        (tmp / "loop_state.json").write_text(json.dumps(asdict(state)))
        write_checksums(tmp)
        swap_in(tmp, final)
        olds = sorted((p for p in ckpt_root.glob("step-*") if p != final), key=lambda p: int(p.name.split("-")[1]))
        for old in olds[: max(0, len(olds) - keep + 1)]:
            shutil.rmtree(old, ignore_errors=True)

    # a failure on one process (a full disk on the main one) stops every process, naming it
    on_main(accelerator, f"making room for checkpoint {final}", make_room)
    with together(accelerator, f"saving checkpoint {final}"):
        accelerator.save_state(str(tmp))
    on_main(accelerator, f"sealing checkpoint {final} (checksums, rename)", seal)
    return final


def resume_from(accelerator: Accelerator, checkpoint: Path, best_dir: Path) -> LoopState:
    """Restore model, optimizer, scheduler and RNG states, the best model so far and the loop
    state saved in `checkpoint`."""
    accelerator.load_state(str(checkpoint))

    def restore_best() -> None:
        shutil.rmtree(best_dir, ignore_errors=True)
        if (checkpoint / "best").exists():
            link_tree(checkpoint / "best", best_dir)

    on_main(accelerator, f"restoring the best model of {checkpoint}", restore_best)
    return LoopState(**json.loads((checkpoint / "loop_state.json").read_text()))


def save_model_folder(accelerator: Accelerator, trainee: nn.Module, folder: Path, tokenizer: Any = None) -> None:
    """Save the trained model (not the loss modules) as a Hugging Face folder, atomically.

    Called on every process: under FSDP the full weights are gathered to the main process,
    which alone writes. `trainee` is the prepared module whose `.model` is the trained model.
    """
    state = accelerator.get_state_dict(trainee)  # full weights on the main process

    def save() -> None:
        model = accelerator.unwrap_model(trainee).model
        check_free_space(folder.parent, sum(p.numel() * p.element_size() for p in model.parameters()) * 2, "the model")
        weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        tmp = folder.with_name(f".tmp-{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        swap_in(tmp, folder)

    on_main(accelerator, f"saving the model to {folder}", save)


def load_model_weights(accelerator: Accelerator, trainee: nn.Module, folder: Path) -> None:
    """Load the weights saved in `folder` into the prepared trainee's model (every process)."""
    model = accelerator.unwrap_model(trainee).model
    saved = type(model).from_pretrained(folder).state_dict()
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {f"model.{k}": v for k, v in saved.items()}
        set_model_state_dict(trainee, full, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(saved)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes the step, checkpoints and exits."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._old: dict = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_process(self, accelerator: Accelerator) -> bool:
        """True on every process as soon as one got a signal (they must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        flag = torch.tensor(1.0 if self.signal is not None else 0.0, device=accelerator.device)
        return bool(accelerator.reduce(flag, "max") > 0)


class SignalsRaise:
    """Before the loop can checkpoint (setup, cache build): SIGTERM/SIGINT raise `Preempted`
    at once, so the process exits with REQUEUE_EXIT_CODE and half-written temporary folders
    are removed by the code that was writing them."""

    def __enter__(self) -> "SignalsRaise":
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._raise)
            except ValueError:  # not the main thread: no handler
                pass
        return self

    @staticmethod
    def _raise(signum, frame) -> None:
        raise Preempted(
            f"stopped by signal {signal.Signals(signum).name} before training started (nothing to "
            f"resume yet). Re-run the same command to start again (exit status {REQUEUE_EXIT_CODE})."
        )

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
