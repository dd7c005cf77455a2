"""One training loop for every stage: teacher fine-tuning, student distillation, baseline.

Stages differ only in their loss terms:
    teacher   the teacher fine-tuned on gold labels (ce)
    student   the student distilled from the fine-tuned teacher (ce + kd + hidden, weighted)
    baseline  the student fine-tuned alone on gold labels (ce): what distillation must beat

Read top to bottom: setup -> accelerator.prepare -> epochs -> accumulate -> forward -> loss ->
backward -> clip -> step -> log -> evaluate -> checkpoint; at the end the best model is reloaded
and scored on validation and test, and <output_dir>/<stage>/ holds model/, metrics.json,
config.yaml, log.jsonl and predictions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset, DatasetDict
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from distill import data as data_mod
from distill import models
from distill.config import Config, stage_train, to_dict, to_yaml
from distill.losses import HiddenStateLoss, SoftLabelLoss
from distill.sampling import LengthGroupedBatchSampler
from distill.tasks import get_task
from distill.tasks.base import Task

log = logging.getLogger("distill")

STAGES = ("teacher", "student", "baseline")
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; see README (SLURM requeue)


class StageError(RuntimeError):
    """A stage that cannot run as configured; the message says why and what to do."""


class Preempted(SystemExit):
    """Raised after a checkpoint was saved on SIGTERM/SIGINT; exits with REQUEUE_EXIT_CODE."""

    def __init__(self, message: str):
        super().__init__(REQUEUE_EXIT_CODE)
        self.message = message


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Stage layout and bookkeeping
# ---------------------------------------------------------------------------------------------


def stage_dir(cfg: Config, stage: str) -> Path:
    if stage == "teacher" and cfg.teacher.dir:
        return Path(cfg.teacher.dir)
    return Path(cfg.output_dir) / stage


def stage_view(cfg: Config, stage: str) -> dict[str, Any]:
    """The part of the config that determines a stage's outputs (what 'same config' means).

    Tracking, Hub and bookkeeping keys never matter; the teacher stage ignores the student and
    distillation settings, so every student of a grid can share one fine-tuned teacher.
    """
    full = to_dict(cfg)
    if stage == "teacher":
        view = {k: full[k] for k in ("task", "data", "teacher", "seed")}
        view["train"] = to_dict(stage_train(cfg, "teacher"))
        return view
    drop = {"tracking", "hub", "overwrite", "checkpoint", "output_dir"}
    view = {k: v for k, v in full.items() if k not in drop}
    if stage == "baseline":
        view.pop("distill")
    return view


def check_stage_dir(cfg: Config, stage: str) -> str:
    """'fresh', 'resume' or 'complete' for this stage's folder; refuses a different config.

    A folder holding another config is refused unless overwrite=true (then it is cleared), so a
    typo in a re-run never mixes two experiments' checkpoints.
    """
    out = stage_dir(cfg, stage)
    saved = out / "config.yaml"
    if not saved.exists():
        return "fresh"
    from omegaconf import OmegaConf

    from distill.config import load_config

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


class JsonlLog:
    """Append-only log.jsonl written by the main process only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Models of a stage
# ---------------------------------------------------------------------------------------------


def same_tokenizer(a: Any, b: Any) -> bool:
    """Two fast tokenizers that produce identical ids for every text."""
    return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def teacher_source(cfg: Config) -> str:
    """Where the fine-tuned teacher for distillation lives."""
    if cfg.teacher.finetuned:
        return cfg.teacher.model  # type: ignore[return-value]
    path = stage_dir(cfg, "teacher") / "model"
    if not path.exists():
        raise StageError(
            f"no fine-tuned teacher at {path}: run `distill teacher` (or `distill run`) first, "
            "or set teacher.finetuned=true with teacher.model pointing at a fine-tuned model"
        )
    return str(path)


def align_labels(model: nn.Module, labels: list[str], name: str) -> None:
    """Make a fine-tuned model's outputs follow the dataset's label order.

    The names in `config.id2label` are matched to the dataset's; if the order differs, the rows
    of the output layer are permuted (a teacher trained with another label order would
    otherwise teach the wrong classes). Different names are an error.
    """
    if not labels:
        return
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    theirs = [id2label[i] for i in range(len(id2label))]
    if theirs == labels:
        return
    generic = all(v == f"LABEL_{i}" for i, v in enumerate(theirs))
    if len(theirs) != len(labels):
        raise StageError(
            f"{name} predicts {len(theirs)} labels {theirs[:10]} but the dataset has "
            f"{len(labels)} {labels[:10]}: a teacher must be fine-tuned on the same label set"
        )
    if generic:
        log.warning("%s has generic label names; assuming the dataset's order %s", name, labels)
        return
    if sorted(theirs) != sorted(labels):
        raise StageError(
            f"{name} was fine-tuned with labels {theirs} but the dataset's are {labels}: "
            "the names differ, so its outputs cannot be matched to the data"
        )
    perm = torch.tensor([theirs.index(label) for label in labels])
    head = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == len(labels)]
    if not head:
        raise StageError(f"cannot find the output layer of {name} to reorder its labels")
    out = head[-1]
    with torch.no_grad():
        out.weight.copy_(out.weight[perm])
        if out.bias is not None:
            out.bias.copy_(out.bias[perm])
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    log.warning("%s: reordered output labels %s -> dataset order %s", name, theirs, labels)


def build_models(cfg: Config, stage: str, task: Task) -> tuple[nn.Module, Any, Optional[nn.Module], Any]:
    """(trained model, its tokenizer, frozen teacher or None, teacher tokenizer or None)."""
    head = task.model_class()
    kwargs = task.model_kwargs()
    t, s = cfg.teacher, cfg.student
    if stage == "teacher":
        if not t.model:
            raise StageError("the teacher stage needs teacher.model (a hub id or path)")
        model = models.load_model(t.model, head, t.revision, t.trust_remote_code, new_head=True, **kwargs)
        return model, models.load_tokenizer(t.model, t.revision, t.trust_remote_code), None, None

    teacher = teacher_tok = None
    if stage == "student" and t.model:
        src = teacher_source(cfg)
        teacher = models.load_model(src, head, t.revision if t.finetuned else None, t.trust_remote_code)
        align_labels(teacher, task.labels, f"teacher '{src}'")
        teacher_tok = models.load_tokenizer(src, t.revision if t.finetuned else None, t.trust_remote_code)
        models.freeze(teacher)

    if s.model:
        model = models.load_model(
            s.model,
            head,
            s.revision,
            s.trust_remote_code,
            config_overrides=dict(s.config_overrides),
            new_head=True,
            **kwargs,
        )
        tokenizer = models.load_tokenizer(s.model, s.revision, s.trust_remote_code)
    else:
        # Layer-subset student: cut from the *pretrained* teacher, for the distilled student and
        # the baseline alike, so the two differ only in their loss.
        base = models.load_model(t.model, head, t.revision, t.trust_remote_code, new_head=True, **kwargs)
        n = base.config.num_hidden_layers
        layers = list(s.from_teacher_layers) or models.uniform_layers(n, s.num_layers)
        model = models.student_from_teacher(base, layers)
        for key, value in s.config_overrides.items():
            setattr(model.config, key, value)
        tokenizer = models.load_tokenizer(t.model, t.revision, t.trust_remote_code)
    return model, tokenizer, teacher, teacher_tok


class Trainee(nn.Module):
    """The trained model plus the loss modules that own parameters (hidden-state projections).

    Wrapping both lets accelerate prepare, synchronise and checkpoint them together, while only
    `model` is ever saved as the student.
    """

    def __init__(self, model: nn.Module, hidden_loss: Optional[HiddenStateLoss] = None):
        super().__init__()
        self.model = model
        self.hidden_loss = hidden_loss

    def forward(self, inputs: dict, teacher_hidden=None, attention_mask=None):
        """Model outputs, and the hidden-state loss when teacher hidden states are given."""
        with_hidden = self.hidden_loss is not None and teacher_hidden is not None
        out = self.model(**inputs, output_hidden_states=with_hidden)
        hidden = None
        if with_hidden:
            hidden = self.hidden_loss(out.hidden_states, teacher_hidden, attention_mask)
        return out, hidden


class OnlineTeacher:
    """Runs the frozen teacher on each batch (inference mode, under the mixed-precision setting)."""

    def __init__(self, model: nn.Module, task: Task, accelerator: Accelerator, hidden: bool):
        self.model, self.task, self.accelerator, self.hidden = model, task, accelerator, hidden

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[dict, Any]:
        with self.accelerator.autocast():
            out = self.model(**self.task.model_inputs(batch, teacher=True), output_hidden_states=self.hidden)
        return self.task.kd_targets(out, batch, teacher=True), out.hidden_states if self.hidden else None


# ---------------------------------------------------------------------------------------------
# Data loaders and evaluation
# ---------------------------------------------------------------------------------------------


def make_loader(task: Task, features: Dataset, batch_size: int, shuffle: bool, cfg: Config) -> DataLoader:
    sampler = LengthGroupedBatchSampler(
        features["length"], batch_size, shuffle=shuffle, group_by_length=cfg.train.group_by_length, seed=cfg.seed
    )
    return DataLoader(features, batch_sampler=sampler, collate_fn=task.collate)


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-batch arrays whose dim 1 may differ (pad with -100)."""
    if chunks[0].ndim == 1:
        return np.concatenate(chunks)
    width = max(c.shape[1] for c in chunks)
    padded = []
    for c in chunks:
        if c.shape[1] < width:
            pad = [(0, 0)] * c.ndim
            pad[1] = (0, width - c.shape[1])
            c = np.pad(c, pad, constant_values=-100)
        padded.append(c)
    return np.concatenate(padded)


@torch.no_grad()
def evaluate(
    accelerator: Accelerator, model: "Trainee", task: Task, loader: DataLoader, features: Dataset, raw: Dataset
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Task metrics and mean gold-label loss over exactly the evaluation set, gathered from every
    process (gather_for_metrics drops the samples repeated to even out the last batch).

    `model` is a (prepared) Trainee, so DDP/FSDP wrappers see the same forward as in training.
    """
    model.eval()
    collected: dict[str, list[np.ndarray]] = {}
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    for batch in loader:
        out, _ = model(task.model_inputs(batch))
        if getattr(out, "loss", None) is not None:
            n = len(batch["feature_id"])
            loss_sum += out.loss.float() * n
            count += n
        outputs = task.eval_outputs(out, batch)
        outputs = {
            k: accelerator.pad_across_processes(v, dim=1, pad_index=-100) if v.dim() > 1 else v
            for k, v in outputs.items()
        }
        outputs = accelerator.gather_for_metrics(outputs)
        for key, value in outputs.items():
            collected.setdefault(key, []).append(value.cpu().numpy())
    arrays = {k: _concat(v) for k, v in collected.items()}
    order = np.argsort(arrays["feature_id"], kind="stable")
    arrays = {k: v[order] for k, v in arrays.items()}
    if len(arrays["feature_id"]) != len(features):
        raise RuntimeError(
            f"evaluation gathered {len(arrays['feature_id'])} features for a split of {len(features)}"
        )
    metrics = task.compute_metrics(arrays, features, raw)
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    if count > 0:
        metrics["loss"] = float(loss_sum / count)
    model.train()
    return metrics, arrays


def is_better(task: Task, metric: str, new: float, best: Optional[float]) -> bool:
    if best is None:
        return True
    return new < best if not task.greater_is_better(metric) else new > best


# ---------------------------------------------------------------------------------------------
# Checkpoints (resume after preemption)
# ---------------------------------------------------------------------------------------------


@dataclass
class LoopState:
    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` already consumed
    global_step: int = 0  # optimizer steps
    best_metric: Optional[float] = None
    best_step: int = 0
    bad_evals: int = 0  # evaluations without improvement (early stopping)
    history: list = field(default_factory=list)


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    done = [p for p in ckpt_root.glob("step-*") if (p / "loop_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def save_checkpoint(accelerator: Accelerator, ckpt_root: Path, state: LoopState, keep: int) -> Path:
    """accelerator.save_state into a temp folder, renamed when complete: a crash mid-save never
    leaves a broken latest checkpoint. Keeps the newest `keep`."""
    final = ckpt_root / f"step-{state.global_step}"
    tmp = ckpt_root / f".tmp-step-{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "loop_state.json").write_text(json.dumps(state.__dict__))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        olds = sorted(
            (p for p in ckpt_root.glob("step-*") if p != final), key=lambda p: int(p.name.split("-")[1])
        )
        for old in olds[: max(0, len(olds) - keep + 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def make_accelerator(cfg: Config, stage: str, grad_accum: int) -> Accelerator:
    trackers = [t for t in cfg.tracking.report_to if t != "none"]
    if "wandb" in trackers:
        try:
            import wandb  # noqa: F401
        except ImportError:
            log.warning("wandb is not installed; logging to log.jsonl only (pip install 'distill[wandb]')")
            trackers.remove("wandb")
    return Accelerator(
        gradient_accumulation_steps=grad_accum,
        log_with=trackers or None,
        project_dir=str(stage_dir(cfg, stage)),
    )


def load_data(cfg: Config, task: Task) -> DatasetDict:
    """The raw splits, subsampled; the task reads its label names from them (before any model
    is built, so heads get the right size)."""
    raw = data_mod.subsample(data_mod.load_raw(cfg), cfg)
    task.setup(raw)
    return raw


def prepare_data(cfg: Config, task: Task, accelerator: Accelerator, raw: DatasetDict) -> dict[str, Dataset]:
    """Raw splits -> features with the task's (bound) tokenizers."""
    features = {}
    # the main process tokenizes first; the others then read the datasets cache
    with accelerator.main_process_first():
        for split, ds in raw.items():
            features[split] = task.preprocess(ds, split)
    for split, feats in features.items():
        if len(feats) == 0:
            raise data_mod.DataError(f"split '{split}' has no features after preprocessing")
    return features


def run_stage(cfg: Config, stage: str) -> dict[str, dict[str, float]]:
    """Run one stage to completion (or resume it) and return its metrics.json content."""
    if stage not in STAGES:
        raise StageError(f"unknown stage '{stage}' ({', '.join(STAGES)})")
    out = stage_dir(cfg, stage)
    status = check_stage_dir(cfg, stage)
    if status == "complete":
        log.info("%s: complete with the same config, skipping (%s)", stage, out)
        return json.loads((out / "metrics.json").read_text())
    tcfg = stage_train(cfg, stage)
    accelerator = make_accelerator(cfg, stage, tcfg.grad_accum)
    main = accelerator.is_main_process
    if status == "overwrite" and main:
        shutil.rmtree(out)
    accelerator.wait_for_everyone()
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "config.yaml", to_yaml(cfg))
        except OSError as err:
            raise StageError(f"output_dir is not writable: {out} ({err.strerror})") from None
        print(f"[distill] stage {stage} -> {out}\n{to_yaml(cfg)}", flush=True)
    set_seed(cfg.seed)

    # --- setup: data, models, losses --------------------------------------------------------
    task = get_task(cfg)
    raw = load_data(cfg, task)
    model, tokenizer, teacher, teacher_tok = build_models(cfg, stage, task)
    d = cfg.distill
    distilling = teacher is not None
    if distilling and not same_tokenizer(tokenizer, teacher_tok):
        if d.hidden_weight > 0:
            raise StageError(
                "hidden-state distillation needs teacher and student with the same tokenizer "
                "(positions must match); set distill.hidden_weight=0 or pick a student that "
                "shares the teacher's tokenizer"
            )
        task.bind(tokenizer, teacher_tok)
    else:
        task.bind(tokenizer)
    features = prepare_data(cfg, task, accelerator, raw)
    if distilling:
        teacher.to(accelerator.device)

    weights = {"ce": 1.0} if not distilling else {"ce": d.ce_weight, "kd": d.kd_weight, "hidden": d.hidden_weight}
    weights = {k: w for k, w in weights.items() if w > 0}
    hidden_loss = None
    if "hidden" in weights:
        hidden_loss = HiddenStateLoss(
            model.config.num_hidden_layers,
            teacher.config.num_hidden_layers,
            model.config.hidden_size,
            teacher.config.hidden_size,
            kind=d.hidden_loss,
            layer_map=d.layer_map,
            include_embeddings=d.include_embeddings,
        )
    kd_loss = SoftLabelLoss(d.kd_loss, d.temperature) if "kd" in weights else None
    teacher_fn = None
    if distilling:
        from distill import cache

        teacher_fn = cache.teacher_outputs(cfg, task, teacher, features["train"], accelerator, hidden="hidden" in weights)
        if teacher_fn is None:
            teacher_fn = OnlineTeacher(teacher, task, accelerator, hidden="hidden" in weights)
    trainee = Trainee(model, hidden_loss)

    # --- optimizer, schedule, prepare -------------------------------------------------------
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight", "norm.weight")
    named = list(trainee.named_parameters())
    groups = [
        {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": tcfg.weight_decay},
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=tcfg.lr)
    train_loader = make_loader(task, features["train"], tcfg.batch_size, True, cfg)
    eval_bs = tcfg.eval_batch_size or 2 * tcfg.batch_size
    eval_splits = [s for s in ("validation", "test") if s in features]
    eval_loaders = {s: make_loader(task, features[s], eval_bs, False, cfg) for s in eval_splits}
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / tcfg.grad_accum)
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps > 0:
        total_steps = min(total_steps, tcfg.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tcfg.warmup_ratio * total_steps), total_steps)
    trainee, optimizer, train_loader, scheduler, *loaders = accelerator.prepare(
        trainee, optimizer, train_loader, scheduler, *eval_loaders.values()
    )
    eval_loaders = dict(zip(eval_loaders, loaders))
    sampler: LengthGroupedBatchSampler = train_loader.batch_sampler.batch_sampler if hasattr(
        train_loader.batch_sampler, "batch_sampler"
    ) else train_loader.batch_sampler

    # --- resume -----------------------------------------------------------------------------
    ckpt_root = out / "checkpoints"
    best_dir = out / "best"
    state = LoopState()
    latest = latest_checkpoint(ckpt_root) if status == "resume" else None
    if latest is not None:
        accelerator.load_state(str(latest))
        state = LoopState(**json.loads((latest / "loop_state.json").read_text()))
        if main:
            print(f"[distill] resuming {stage} from {latest} (epoch {state.epoch}, step {state.global_step})", flush=True)

    if accelerator.trackers:
        run_name = cfg.tracking.run_name or f"{cfg.task.name}-{stage}-{models.short_name(cfg.student.model or 'layers')}"
        accelerator.init_trackers(cfg.tracking.project, config=to_dict(cfg), init_kwargs={"wandb": {"name": run_name}})
    jlog = JsonlLog(out / "log.jsonl", main)
    select = tcfg.select_metric or task.metric
    metric_needs_val = "validation" in eval_loaders

    def evaluate_and_select() -> bool:
        """Evaluate on validation, keep the best model; True when early stopping says stop."""
        if not metric_needs_val:
            return False
        metrics, _ = evaluate(
            accelerator,
            trainee,
            task,
            eval_loaders["validation"],
            features["validation"],
            raw["validation"],
        )
        record = {"step": state.global_step, "epoch": state.epoch, **{f"validation/{k}": v for k, v in metrics.items()}}
        jlog.write(record)
        accelerator.log(record, step=state.global_step)
        if select not in metrics:
            raise StageError(f"train.select_metric='{select}' is not among the metrics {sorted(metrics)}")
        value = metrics[select]
        state.history.append({"step": state.global_step, select: value})
        if is_better(task, select, value, state.best_metric):
            state.best_metric, state.best_step, state.bad_evals = value, state.global_step, 0
            if main:
                tmp = out / ".best-tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                accelerator.unwrap_model(trainee).model.save_pretrained(tmp, safe_serialization=True)
                shutil.rmtree(best_dir, ignore_errors=True)
                os.replace(tmp, best_dir)
            accelerator.wait_for_everyone()
        else:
            state.bad_evals += 1
        return tcfg.patience > 0 and state.bad_evals >= tcfg.patience

    # --- the loop -----------------------------------------------------------------------------
    trainee.train()
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not main, desc=stage, dynamic_ncols=True)
    window = {"samples": 0, "time": time.perf_counter(), "terms": {}, "n": 0}
    stop = False
    with StopFlag() as stop_flag:
        while state.epoch < tcfg.epochs and state.global_step < total_steps and not stop:
            sampler.set_epoch(state.epoch)
            epoch_loader = (
                accelerator.skip_first_batches(train_loader, state.batches_done) if state.batches_done else train_loader
            )
            for batch in epoch_loader:
                with accelerator.accumulate(trainee):
                    teacher_targets = teacher_hidden = None
                    if teacher_fn is not None:
                        teacher_targets, teacher_hidden = teacher_fn(batch)
                    outputs, hidden_term = trainee(
                        task.model_inputs(batch), teacher_hidden, batch.get("attention_mask")
                    )
                    terms: dict[str, torch.Tensor] = {}
                    if "ce" in weights:
                        terms["ce"] = outputs.loss
                    if kd_loss is not None:
                        pairs = task.kd_pairs(task.kd_targets(outputs, batch, teacher=False), teacher_targets, batch)
                        terms["kd"] = kd_loss(pairs)
                    if hidden_term is not None:
                        terms["hidden"] = hidden_term
                    loss = sum(weights[k] * v for k, v in terms.items())
                    # one scalar sync per step: a NaN must stop the run at the batch that made it
                    if not torch.isfinite(loss):
                        values = {k: float(v) for k, v in terms.items()}
                        raise NonFiniteLoss(
                            f"non-finite loss at step {state.global_step} (epoch {state.epoch}): terms "
                            f"{values}, batch example_ids {batch['example_id'].tolist()}. The last good "
                            f"checkpoint is kept in {ckpt_root}; lower train.lr or check these rows."
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tcfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainee.parameters(), tcfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                state.batches_done += 1
                window["samples"] += len(batch["feature_id"]) * accelerator.num_processes
                window["n"] += 1
                for k, v in terms.items():
                    window["terms"][k] = window["terms"].get(k, 0.0) + v.detach()
                window["terms"]["total"] = window["terms"].get("total", 0.0) + loss.detach()
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                progress.update(1)

                if state.global_step % tcfg.logging_steps == 0 or state.global_step == total_steps:
                    elapsed = time.perf_counter() - window["time"]
                    record = {"step": state.global_step, "epoch": state.epoch, "lr": scheduler.get_last_lr()[0]}
                    for k, v in window["terms"].items():
                        name = "train/loss" if k == "total" else f"train/loss_{k}"
                        record[name] = float(accelerator.reduce(v, "mean")) / window["n"]
                    record["train/samples_per_s"] = window["samples"] / max(elapsed, 1e-9)
                    jlog.write(record)
                    accelerator.log(record, step=state.global_step)
                    progress.set_postfix(loss=f"{record['train/loss']:.4f}", sps=f"{record['train/samples_per_s']:.1f}")
                    window = {"samples": 0, "time": time.perf_counter(), "terms": {}, "n": 0}

                if tcfg.eval_steps > 0 and state.global_step % tcfg.eval_steps == 0:
                    stop = evaluate_and_select()
                if tcfg.checkpoint_steps > 0 and state.global_step % tcfg.checkpoint_steps == 0:
                    save_checkpoint(accelerator, ckpt_root, state, tcfg.keep_checkpoints)
                if stop_flag.any_process(accelerator):
                    path = save_checkpoint(accelerator, ckpt_root, state, tcfg.keep_checkpoints)
                    raise Preempted(
                        f"stopped by signal at step {state.global_step}; checkpoint saved to {path}. "
                        f"Re-run the same command to resume (exit status {REQUEUE_EXIT_CODE})."
                    )
                if stop or state.global_step >= total_steps:
                    break
            else:
                # the epoch ran to its end
                state.epoch += 1
                state.batches_done = 0
                if tcfg.eval_steps == 0:
                    stop = evaluate_and_select()
                save_checkpoint(accelerator, ckpt_root, state, tcfg.keep_checkpoints)
                continue
            break  # max_steps or early stopping inside the epoch
    progress.close()

    # --- final: reload the best model, score validation and test, write outputs -------------
    final_model = accelerator.unwrap_model(trainee).model
    if metric_needs_val and tcfg.eval_steps > 0 and state.history and state.history[-1]["step"] != state.global_step:
        evaluate_and_select()  # the last steps since the previous evaluation
    if not best_dir.exists() and metric_needs_val:
        evaluate_and_select()
    accelerator.wait_for_everyone()
    if best_dir.exists():
        best = type(final_model).from_pretrained(best_dir)
        final_model.load_state_dict(best.state_dict())
    results: dict[str, dict[str, float]] = {}
    for split, loader in eval_loaders.items():
        metrics, arrays = evaluate(accelerator, trainee, task, loader, features[split], raw[split])
        results[split] = metrics
        if main:
            preds = task.predictions(arrays, features[split], raw[split])
            if preds:
                with open(out / f"predictions_{split}.jsonl", "w") as f:
                    for p in preds:
                        f.write(json.dumps(p, ensure_ascii=False) + "\n")
    results["info"] = {
        "stage": stage,
        "task": cfg.task.name,
        "family": task.family,
        "metric": task.metric,
        "select_metric": select,
        "best_step": state.best_step,
        "steps": state.global_step,
        "parameters": models.count_parameters(final_model),
        "teacher": teacher_source(cfg) if distilling else None,
        "loss_weights": weights,
    }
    accelerator.log({f"{s}/{k}": v for s, m in results.items() if s != "info" for k, v in m.items()}, step=state.global_step)
    if main:
        model_dir = out / "model"
        tmp = out / ".model-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        final_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
        # metrics.json last: its presence marks the stage complete
        atomic_write(out / "metrics.json", json.dumps(results, indent=2))
        shutil.rmtree(best_dir, ignore_errors=True)
        shutil.rmtree(ckpt_root, ignore_errors=True)
        print(f"[distill] {stage} done: " + json.dumps({k: v for k, v in results.items() if k != "info"}), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
