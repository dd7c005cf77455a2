"""One training loop for every stage: teacher fine-tuning, student distillation, baseline.

Stages differ only in their loss terms (built by `setup.build_objective`):
    teacher   the teacher fine-tuned on gold labels (ce)
    student   the student distilled from the fine-tuned teacher (ce + kd + hidden + ..., weighted)
    baseline  the student fine-tuned alone on gold labels (ce): what distillation must beat

`run_stage` reads top to bottom: set the stage up (setup.py) -> accelerator.prepare -> resume ->
epochs of `train_step` (step.py: forward, loss terms, backward, clip, one read, step) -> log ->
evaluate -> checkpoint; at the end the best model is reloaded and scored on validation and test,
and <output_dir>/<stage>/ holds model/, metrics.json, config.yaml, log.jsonl and predictions.
`train_step` is also what scripts/bench_train.py times.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from distill import models
from distill.loop.checkpoints import (
    LoopState, SignalsRaise, StopFlag, checkpoint_bytes, latest_checkpoint, load_model_weights, resume_from, save_checkpoint, save_model_folder,
)
from distill.config import Config, to_dict, to_yaml
from distill.errors import REQUEUE_EXIT_CODE, NonFiniteLoss, Preempted, StageError
from distill.loop.evaluate import evaluate, is_better, write_predictions
from distill.objective.losses import Trainee
from distill.loop.step import StepGuard, StepResult, Window, nonfinite_error, train_step
from distill.teachers.teacher import select as select_reads
from distill.loop.setup import Stage, make_accelerator, setup_stage
from distill.data.features import data_identity, read_raw
from distill.files import atomic_write
from distill.launch import on_main
from distill.loop.folders import DATA_FILE, JsonlLog, check_no_readers, check_stage_dir, clear_stage_dir, locked, reading
from distill.loop.plan import StagePlan, plan_stage

log = logging.getLogger("distill")

# on_evaluate(step, epoch, validation metrics): called after every validation pass (e.g. a
# search's pruner); an exception it raises ends the stage where it is
EvalCallback = Callable[[int, int, dict], None]


def stop_error(accelerator: Accelerator, jlog: JsonlLog, state: LoopState, result: StepResult, batch: dict, ckpt_root: Any, guard: StepGuard, limit: int) -> NonFiniteLoss:
    """The error that stops the run at this step (`step.nonfinite_error`), with the checkpoint
    kept, written to log.jsonl."""
    latest = latest_checkpoint(ckpt_root)
    where = f"at step {state.global_step + 1} (epoch {state.epoch}, batch {state.batches_done} of the epoch)"
    kept = f"The last good checkpoint is kept: {latest}." if latest else "No checkpoint was saved yet."
    err = NonFiniteLoss(f"{nonfinite_error(accelerator, result, batch, where, guard, limit)} {kept}")
    jlog.write({"step": state.global_step, "error": str(err)})
    return err


def prepare(accelerator: Accelerator, s: Stage) -> tuple[Any, Any, Any, Any, dict, int]:
    """(trainee, optimizer, scheduler, train loader, eval loaders, total optimizer steps), prepared."""
    tcfg = s.train
    trainee = Trainee(s.model, s.objective, s.capture)
    if tcfg.compile:  # in place: the module, its state_dict keys and save_pretrained stay as they are
        trainee.model.compile()
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight", "norm.weight")
    named = list(trainee.named_parameters())
    groups = [
        {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": tcfg.weight_decay},
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=tcfg.lr)
    # train.batch_size is per process: the global batch is batch_size x processes x grad_accum.
    steps_per_epoch = math.ceil(len(s.train_loader) / accelerator.num_processes / tcfg.grad_accum)
    total = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps > 0:
        total = min(total, tcfg.max_steps)
    # A prepared scheduler steps once per process at every optimizer step (accelerate's
    # convention), so its horizon is counted in those sub-steps; DeepSpeed's engine steps it once.
    ticks = 1 if accelerator.distributed_type == DistributedType.DEEPSPEED else accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tcfg.warmup_ratio * total) * ticks, total * ticks)
    trainee, optimizer, loader, scheduler, *evals = accelerator.prepare(
        trainee, optimizer, s.train_loader, scheduler, *s.eval_loaders.values()
    )
    return trainee, optimizer, scheduler, loader, dict(zip(s.eval_loaders, evals)), total


def check_launch(accelerator: Accelerator) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # e.g. torchrun on a machine without GPUs: each process would run the whole stage alone,
        # all of them writing the same folder
        raise StageError(
            f"the launcher started {launched} processes but accelerate runs {accelerator.num_processes}: "
            "on CPU set ACCELERATE_USE_CPU=1 (accelerate launch --cpu does), otherwise check the "
            "accelerate config (accelerate env)"
        )


def restore(accelerator: Accelerator, status: str, stage: str, ckpt_root, best_dir, jlog: JsonlLog) -> LoopState:
    """The loop state to start from: the latest checkpoint's when resuming, else a fresh one."""
    state = LoopState()
    latest = latest_checkpoint(ckpt_root, verified=True) if status == "resume" else None
    if latest is not None:
        state = resume_from(accelerator, latest, best_dir)
        if accelerator.is_main_process:
            print(f"[distill] resuming {stage} from {latest} (epoch {state.epoch}, batch "
                  f"{state.batches_done}, step {state.global_step})", flush=True)
    elif accelerator.is_main_process:
        shutil.rmtree(best_dir, ignore_errors=True)  # left by a run that never checkpointed
    if status == "resume":
        jlog.rewind(state.global_step)  # the steps after the checkpoint are logged again
    return state


def start_trackers(accelerator: Accelerator, plan: StagePlan) -> None:
    """The trackers named in tracking.report_to, sent the stage's resolved config."""
    if accelerator.log_with:
        name = plan.tracking.run_name or f"{plan.task.name}-{plan.kind}-{models.short_name(plan.student.model or 'layers')}"
        accelerator.init_trackers(plan.tracking.project, config=to_dict(plan.recipe), init_kwargs={"wandb": {"name": name}})


def run_stage(cfg: Config, stage: str, on_evaluate: Optional[EvalCallback] = None) -> dict[str, dict[str, Any]]:
    """Run stage `stage` of the recipe `cfg` (teacher, teacher-<i>, student, baseline) to
    completion, or resume it, and return its metrics.json content."""
    plan = plan_stage(cfg, stage)
    out, stage = plan.folder, plan.name
    accelerator = make_accelerator(plan)
    check_launch(accelerator)
    main = accelerator.is_main_process
    if not main:  # one copy of every warning and progress bar
        log.setLevel(logging.ERROR)
        import datasets

        datasets.disable_progress_bars()
    raw = read_raw(plan.data, plan.seed)  # read once: hashed here, set up below
    # a run on other data (splits, and the student's transfer sets) is never resumed into nor
    # skipped as complete
    data = data_identity(raw, plan.data.transfer if plan.kind == "student" else ())
    where = f"checking the stage folder {out}"
    status = on_main(accelerator, where, lambda: check_stage_dir(plan, data))  # refuses a different config at once
    if status != "complete":

        def under_lock() -> str:
            """The status again, now that no other run can finish or start the stage; a stage
            about to be written must not be one another run is reading."""
            now = check_stage_dir(plan, data)
            if now != "complete":
                check_no_readers(out)
            return now

        with locked(accelerator, out, under_lock, what=f"stage {stage}") as status:
            if status != "complete":
                teachers = [t.folder for t in plan.teachers if not t.finetuned]
                with reading(accelerator, teachers, f"stage {stage} in {out}"):
                    return set_up_and_train(accelerator, plan, raw, data, status, on_evaluate)
    if main:
        print(f"[distill] {stage}: complete with the same config, skipping ({out})", flush=True)
    return json.loads((out / "metrics.json").read_text())


def set_up_and_train(accelerator: Accelerator, plan: StagePlan, raw: Any, data: dict, status: str, on_evaluate: Optional[EvalCallback]) -> dict:
    """With the stage's folder locked: set it up, record its config, train it."""
    out, stage = plan.folder, plan.name
    with SignalsRaise():  # SIGTERM while setting up (e.g. building the cache): exit 75, no temp folders
        s = setup_stage(plan, accelerator, raw)  # every check; nothing written yet

    def record() -> None:
        """Every check passed: replace an old run (overwrite=true), record the config."""
        if status == "overwrite":
            clear_stage_dir(out)
        atomic_write(out / "config.yaml", to_yaml(plan.recipe))
        atomic_write(out / DATA_FILE, json.dumps(data, indent=1))
        print(f"[distill] stage {stage} -> {out}\n{to_yaml(plan.recipe)}", flush=True)

    on_main(accelerator, f"recording the stage's config in {out}", record)
    return train_stage(accelerator, plan, s, status, on_evaluate)


def train_stage(accelerator: Accelerator, plan: StagePlan, s: Stage, status: str, on_evaluate: Optional[EvalCallback]) -> dict:
    """Train a set-up stage from scratch or from its latest checkpoint, then finish it."""
    main, out, stage = accelerator.is_main_process, s.out, s.name
    tcfg, task = s.train, s.task
    trainee, optimizer, scheduler, train_loader, eval_loaders, total_steps = prepare(accelerator, s)
    sampler = s.train_loader.batch_sampler  # ours: the prepared loader shards it, keeping it inside

    ckpt_root, best_dir, jlog = out / "checkpoints", out / "best", JsonlLog(out / "log.jsonl", main)
    state = restore(accelerator, status, stage, ckpt_root, best_dir, jlog)
    start_trackers(accelerator, plan)
    select = tcfg.select_metric or task.metric
    phase1 = plan.distill.intermediate_epochs if s.objective.two_phase else 0

    def evaluate_and_select() -> bool:
        """Evaluate on validation, keep the best model; True when early stopping says stop."""
        metrics, _ = evaluate(accelerator, trainee, task, eval_loaders["validation"], s.features["validation"], s.raw["validation"])
        record = {"step": state.global_step, "epoch": state.epoch, **{f"validation/{k}": v for k, v in metrics.items()}}
        jlog.write(record)
        accelerator.log(record, step=state.global_step)
        if on_evaluate is not None:
            on_evaluate(state.global_step, state.epoch, metrics)
        state.history.append({"step": state.global_step, select: metrics[select]})
        if is_better(task, select, metrics[select], state.best_metric):
            state.best_metric, state.best_step, state.bad_evals = metrics[select], state.global_step, 0
            save_model_folder(accelerator, trainee, best_dir)
        else:
            state.bad_evals += 1
        return tcfg.patience > 0 and state.bad_evals >= tcfg.patience

    saved: list = [None]
    needed = checkpoint_bytes(accelerator.unwrap_model(trainee))

    def checkpoint() -> None:
        """Save unless this exact loop state was just saved."""
        key = (state.global_step, state.epoch, state.batches_done)
        if key != saved[0]:
            save_checkpoint(accelerator, ckpt_root, state, tcfg.keep_checkpoints, best_dir, needed)
            saved[0] = key

    def preempt() -> None:
        checkpoint()
        raise Preempted(
            f"stopped by signal at step {state.global_step}; checkpoint saved to "
            f"{ckpt_root / f'step-{state.global_step}'}. Re-run the same command to resume "
            f"(exit status {REQUEUE_EXIT_CODE})."
        )

    can_select = "validation" in eval_loaders
    trainee.train()
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not main, desc=stage, dynamic_ncols=True)
    guard, window = StepGuard(accelerator, tcfg.max_skipped_steps), Window()
    with StopFlag() as stop:
        while not state.finished and state.epoch < tcfg.epochs:
            intermediate = state.epoch < phase1  # TinyBERT's first phase: intermediate terms only
            s.objective.intermediate_phase = intermediate
            # the teacher serves only what this phase's terms read (no online pass for none)
            select_reads(s.teacher, s.objective.needs("teacher"))
            # the batch order is a pure function of (seed, epoch); a resumed epoch skips what it did
            train_loader.set_epoch(state.epoch)
            sampler.set_epoch(state.epoch)
            batches = accelerator.skip_first_batches(train_loader, state.batches_done) if state.batches_done else train_loader
            result = None
            for batch in batches:
                last = accelerator.gradient_state.end_of_dataloader  # the epoch's last batch
                log_now = (state.global_step + 1) % tcfg.logging_steps == 0 or state.global_step + 1 == total_steps
                result = train_step(
                    accelerator, trainee, batch, task, s.teacher, optimizer, scheduler, tcfg.max_grad_norm,
                    guard, window, log_now, lambda: stop.signal is not None,
                )
                if result.error is not None:
                    raise stop_error(accelerator, jlog, state, result, batch, ckpt_root, guard, tcfg.max_skipped_steps)
                state.batches_done += 1
                if not result.synced:
                    continue
                state.global_step += 1
                window.skipped += result.skipped
                progress.update(1)
                if result.record is not None:
                    record = {"step": state.global_step, "epoch": state.epoch, "lr": scheduler.get_last_lr()[0], **result.record}
                    if guard.scaler is not None:  # fp16: the scale this step ran with, the window's skips
                        record.update({"train/loss_scale": result.scale, "train/skipped_steps": window.skipped})
                    if phase1:
                        record["phase"] = "intermediate" if intermediate else "prediction"
                    jlog.write(record)
                    accelerator.log(record, step=state.global_step)
                    progress.set_postfix(loss=f"{record['train/loss']:.4f}", sps=f"{record['train/samples_per_s']:.1f}")
                    window = Window()
                if tcfg.eval_steps > 0 and state.global_step % tcfg.eval_steps == 0 and can_select and not intermediate:
                    state.finished = evaluate_and_select()
                state.finished = state.finished or state.global_step >= total_steps
                if state.finished and not last:
                    break  # ends the stage mid-epoch (the epoch-end block below is skipped)
                if not last:  # the epoch-end block checkpoints and checks signals at the last batch
                    if tcfg.checkpoint_steps > 0 and state.global_step % tcfg.checkpoint_steps == 0:
                        checkpoint()
                    if result.stop:  # read with the step: no exchange of its own
                        preempt()
            else:  # the epoch ran to its end
                state.epoch, state.batches_done = state.epoch + 1, 0
                if tcfg.eval_steps == 0 and can_select and not intermediate:
                    state.finished = evaluate_and_select() or state.finished
                checkpoint()
                if result is not None and result.stop:  # asked by the last step's read (a later signal: the next step's)
                    preempt()
    progress.close()
    if can_select and (not state.history or state.history[-1]["step"] != state.global_step):
        evaluate_and_select()  # the weights since the last evaluation
    return finish(accelerator, plan, s, trainee, eval_loaders, state, select, guard)


def finish(accelerator: Accelerator, plan: StagePlan, s: Stage, trainee: Any, eval_loaders: dict, state: LoopState, select: str, guard: Optional[StepGuard] = None) -> dict:
    """Reload the best model, score validation and test, write model/, predictions and
    metrics.json (last: its presence marks the stage complete)."""
    out = s.out
    accelerator.wait_for_everyone()
    if (out / "best").exists():
        load_model_weights(accelerator, trainee, out / "best")
    results: dict[str, dict[str, Any]] = {}
    for split, loader in eval_loaders.items():
        results[split], arrays = evaluate(accelerator, trainee, s.task, loader, s.features[split], s.raw[split])
        target = out / f"predictions_{split}.jsonl"
        on_main(accelerator, f"writing {target}",
                lambda: write_predictions(s.task, arrays, s.features[split], s.raw[split], target))
    results["info"] = {
        "stage": s.name,
        "task": plan.task.name,
        "family": s.task.family,
        "metric": s.task.metric,
        "select_metric": select,
        "best_step": state.best_step,
        "steps": state.global_step,
        "parameters": models.count_parameters(accelerator.unwrap_model(trainee).model),
        "teacher": s.teacher_source,
        "loss_weights": s.objective.weights,
        "train_rows": s.rows,
        "processes": accelerator.num_processes,
        **s.info,  # several teachers: who they are and how their targets combine
    }
    if guard is not None and guard.scaler is not None:  # fp16: optimizer steps the scaler skipped (this run)
        results["info"]["skipped_steps"] = guard.total
    accelerator.log({f"{k}/{m}": v for k, ms in results.items() if k != "info" for m, v in ms.items()}, step=state.global_step)
    save_model_folder(accelerator, trainee, out / "model", s.tokenizer)

    def write_metrics() -> None:
        atomic_write(out / "metrics.json", json.dumps(results, indent=2))
        shutil.rmtree(out / "best", ignore_errors=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        print(f"[distill] {s.name} done: " + json.dumps({k: v for k, v in results.items() if k != "info"}), flush=True)

    on_main(accelerator, f"writing {out / 'metrics.json'}", write_metrics)
    for tracker in accelerator.trackers:  # not end_training(): it ends the process group, and
        tracker.finish()  # `distill run` goes on with the next stage
    accelerator.free_memory()
    return results
