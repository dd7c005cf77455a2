"""One training loop for every stage: teacher fine-tuning, student distillation, baseline.

Stages differ only in their loss terms:
    teacher   the teacher fine-tuned on gold labels (ce)
    student   the student distilled from the fine-tuned teacher (ce + kd + hidden, weighted)
    baseline  the student fine-tuned alone on gold labels (ce): what distillation must beat

Read top to bottom: checks -> setup -> accelerator.prepare -> epochs -> accumulate -> forward ->
loss -> backward -> clip -> step -> log -> evaluate -> checkpoint; at the end the best model is
reloaded and scored on validation and test, and <output_dir>/<stage>/ holds model/,
metrics.json, config.yaml, log.jsonl and predictions.

Every input (data, models, tokenizers, label names, layer maps, the teacher cache) is checked
before the stage writes or deletes anything, so a bad recipe never costs earlier results. A
stage survives preemption: SIGTERM/SIGINT finish the current step, save a checkpoint and exit
with REQUEUE_EXIT_CODE; running the same command again resumes mid-epoch and reaches the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from datasets import Dataset, DatasetDict
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from distill import data as data_mod
from distill import models
from distill.config import Config, stage_train, to_dict, to_yaml
from distill.errors import REQUEUE_EXIT_CODE, NonFiniteLoss, Preempted, StageError
from distill.losses import HiddenStateLoss, SoftLabelLoss
from distill.sampling import LengthGroupedBatchSampler
from distill.tasks import get_task
from distill.tasks.base import Task

log = logging.getLogger("distill")

STAGES = ("teacher", "student", "baseline")

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
    """'fresh', 'resume', 'complete' or 'overwrite' for this stage's folder.

    A folder holding another config is refused unless overwrite=true, so a typo in a re-run
    never mixes two experiments' checkpoints. Nothing is deleted here: with overwrite=true the
    folder is cleared only once every input of the new run has been checked.
    """
    out = stage_dir(cfg, stage)
    saved = out / "config.yaml"
    if not saved.exists():
        return "fresh"
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


def check_writable(out: Path, keep: bool = True) -> None:
    """Create the stage folder and write (then remove) a probe file: an unusable output_dir fails
    here, before any data or model is loaded, instead of at the first checkpoint. With
    keep=False the folders this check created are removed again (a dry check leaves nothing)."""
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
        if not keep:
            for folder in created:  # deepest first
                folder.rmdir()
    except OSError as err:
        raise StageError(
            f"output_dir is not writable: cannot create or write {out} ({err.strerror or err}). "
            "Set output_dir=<a folder you can write to>."
        ) from None


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


def _swap_in(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing what was there. `final` is missing for
    only an instant (two renames), and a half-written `tmp` is never visible under `final`."""
    trash = final.with_name(f".old-{final.name}")
    shutil.rmtree(trash, ignore_errors=True)
    if final.exists():
        os.replace(final, trash)
    os.replace(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder as hard links (no extra disk; files are never modified in place)."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy)


# ---------------------------------------------------------------------------------------------
# Models of a stage
# ---------------------------------------------------------------------------------------------


def same_tokenizer(a: Any, b: Any) -> bool:
    """Two tokenizers that produce identical ids for every text (the one identity the tasks and
    the teacher cache use too)."""
    return models.same_tokenizer(a, b)


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


def _output_layer(model: nn.Module, num_labels: int) -> nn.Linear:
    """The linear layer that produces the label logits (a classifier/score head, else the last
    linear layer with one output per label)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    named = [m for n, m in linears if n.split(".")[0] in ("classifier", "score")]
    if named:
        return named[-1]
    if linears:
        return linears[-1][1]
    raise StageError(f"cannot find the output layer ({num_labels} outputs) of {type(model).__name__}")


def label_order(config: Any, labels: list[str], name: str) -> Optional[list[int]]:
    """Where each of the dataset's labels sits in a fine-tuned model's outputs (by the names in
    `config.id2label`): None when the order already matches or the names are generic
    (LABEL_0, ...); an error for another count or other names."""
    if not labels:
        return None
    id2label = {int(k): v for k, v in config.id2label.items()}
    theirs = [id2label[i] for i in range(len(id2label))]
    if theirs == labels:
        return None
    if len(theirs) != len(labels):
        raise StageError(
            f"{name} predicts {len(theirs)} labels {theirs[:10]} but the dataset has "
            f"{len(labels)} {labels[:10]}: a teacher must be fine-tuned on the same label set "
            "(fine-tune it with `distill teacher`, or point teacher.model at one that matches)"
        )
    if all(v == f"LABEL_{i}" for i, v in enumerate(theirs)):
        log.warning("%s has generic label names; assuming the dataset's order %s", name, labels)
        return None
    if sorted(theirs) != sorted(labels):
        raise StageError(
            f"{name} was fine-tuned with labels {theirs} but the dataset's are {labels}: "
            "the names differ, so its outputs cannot be matched to the data. Map the data's "
            "labels to the teacher's names, or fine-tune a teacher on this data."
        )
    return [theirs.index(label) for label in labels]


def align_labels(model: nn.Module, labels: list[str], name: str) -> None:
    """Make a fine-tuned model's outputs follow the dataset's label order.

    The names in `config.id2label` are matched to the dataset's; if the order differs, the rows
    of the output layer are permuted (a teacher trained with another label order would
    otherwise teach the wrong classes). A different count or different names are an error.
    """
    order = label_order(model.config, labels, name)
    if order is None:
        return
    theirs = [model.config.id2label[i] for i in range(len(labels))]
    perm = torch.tensor(order)
    out = _output_layer(model, len(labels))
    with torch.no_grad():
        out.weight.copy_(out.weight[perm])  # [labels, hidden], rows in the dataset's order
        if out.bias is not None:
            out.bias.copy_(out.bias[perm])
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    log.warning("%s: reordered output labels %s -> dataset order %s", name, theirs, labels)


def build_models(cfg: Config, stage: str, task: Task) -> tuple[nn.Module, Any, Optional[nn.Module], Any]:
    """(trained model, its tokenizer, frozen teacher or None, teacher tokenizer or None).

    Needs `task.setup` first: heads are built with the task's label count.
    """
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
        # the baseline alike, so the two differ only in their loss. The overrides (e.g. dropout)
        # go into the config the modules are built from.
        base = models.load_model(
            t.model,
            head,
            t.revision,
            t.trust_remote_code,
            config_overrides=dict(s.config_overrides),
            new_head=True,
            **kwargs,
        )
        n = base.config.num_hidden_layers
        try:
            layers = list(s.from_teacher_layers) or models.uniform_layers(n, s.num_layers)
            model = models.student_from_teacher(base, layers)
        except ValueError as err:
            raise StageError(f"cannot cut the student out of teacher '{t.model}' ({n} layers): {err}") from None
        tokenizer = models.load_tokenizer(t.model, t.revision, t.trust_remote_code)
    return model, tokenizer, teacher, teacher_tok


def bind_tokenizers(cfg: Config, task: Task, tokenizer: Any, teacher_tok: Any) -> None:
    """Give the task its tokenizers; refuse a teacher/student pair the task cannot align."""
    if teacher_tok is None or same_tokenizer(tokenizer, teacher_tok):
        task.bind(tokenizer)
        return
    if cfg.distill.hidden_weight > 0:
        raise StageError(
            "hidden-state distillation needs teacher and student with the same tokenizer "
            "(positions must match); set distill.hidden_weight=0 or pick a student that "
            "shares the teacher's tokenizer"
        )
    try:
        task.bind(tokenizer, teacher_tok)
    except ValueError as err:
        raise StageError(f"teacher and student tokenizers cannot be aligned for {task.family}: {err}") from None


def build_losses(
    cfg: Config, model: nn.Module, teacher: Optional[nn.Module]
) -> tuple[dict[str, float], Optional[SoftLabelLoss], Optional[HiddenStateLoss]]:
    """The weighted loss terms of the stage: ce alone without a teacher, else ce + kd + hidden."""
    d = cfg.distill
    if teacher is None:
        return {"ce": 1.0}, None, None
    weights = {k: w for k, w in {"ce": d.ce_weight, "kd": d.kd_weight, "hidden": d.hidden_weight}.items() if w > 0}
    kd_loss = SoftLabelLoss(d.kd_loss, d.temperature) if "kd" in weights else None
    hidden_loss = None
    if "hidden" in weights:
        try:
            hidden_loss = HiddenStateLoss(
                model.config.num_hidden_layers,
                teacher.config.num_hidden_layers,
                model.config.hidden_size,
                teacher.config.hidden_size,
                kind=d.hidden_loss,
                layer_map=d.layer_map,
                include_embeddings=d.include_embeddings,
            )
        except ValueError as err:
            raise StageError(f"{err} (student has {model.config.num_hidden_layers} layers)") from None
    return weights, kd_loss, hidden_loss


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
    """Runs the frozen teacher on each batch (inference mode, under the mixed-precision setting).

    The teacher is never passed to `accelerator.prepare`: no DDP/FSDP wrapper, no gradient sync,
    no optimizer state, and it stays out of checkpoints. Each process holds a full copy.
    """

    def __init__(self, model: nn.Module, task: Task, accelerator: Accelerator, hidden: bool):
        self.model, self.task, self.accelerator, self.hidden = model, task, accelerator, hidden

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[dict, Any]:
        with self.accelerator.autocast():
            out = self.model(**self.task.model_inputs(batch, teacher=True), output_hidden_states=self.hidden)
        return self.task.kd_targets(out, batch, teacher=True), out.hidden_states if self.hidden else None


def place_teacher(teacher: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Move the frozen teacher to this process's device. DeepSpeed trains without autocast, so
    there the teacher is cast to the mixed-precision dtype instead (half the memory)."""
    teacher.to(accelerator.device)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision in ("bf16", "fp16"):
        teacher.to(torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)
    return teacher


# ---------------------------------------------------------------------------------------------
# Data, loaders and evaluation
# ---------------------------------------------------------------------------------------------


def load_data(cfg: Config, task: Task) -> DatasetDict:
    """The raw splits, subsampled; the task reads its label names from them (before any model
    is built, so heads get the right size)."""
    raw = data_mod.subsample(data_mod.load_raw(cfg), cfg)
    try:
        task.setup(raw)
    except ValueError as err:  # the task's own data checks (DataError is a ValueError too)
        raise data_mod.DataError(str(err)) from None
    return raw


def prepare_data(cfg: Config, task: Task, accelerator: Accelerator, raw: DatasetDict) -> dict[str, Dataset]:
    """Raw splits -> features with the task's (bound) tokenizers."""
    features = {}
    # the main process tokenizes first; the others then read the datasets cache
    with accelerator.main_process_first():
        for split, ds in raw.items():
            try:
                features[split] = task.preprocess(ds, split)
            except ValueError as err:
                raise data_mod.DataError(f"split '{split}': {err}") from None
    for split, feats in features.items():
        if len(feats) == 0:
            raise data_mod.DataError(f"split '{split}' has no features after preprocessing")
    return features


def make_loader(task: Task, features: Dataset, batch_size: int, shuffle: bool, cfg: Config) -> DataLoader:
    """Length-grouped batches whose order is a function of (seed, epoch) only.

    The loader gets its own generator: starting an iteration draws a seed from it, and drawing
    from the global RNG instead would shift dropout after a resume.
    """
    sampler = LengthGroupedBatchSampler(
        features["length"], batch_size, shuffle=shuffle, group_by_length=cfg.train.group_by_length, seed=cfg.seed
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(features, batch_sampler=sampler, collate_fn=task.collate, generator=generator)


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


def _real_rows(accelerator: Accelerator, rows: int) -> int:
    """How many of this process's `rows` are real evaluation rows.

    To give every process a full last batch, accelerate repeats rows from the start of the set
    at the tail of each process's last batch; taken in process order, the first `remainder`
    rows of that last round are the real ones (what gather_for_metrics keeps).
    """
    state = accelerator.gradient_state
    if accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
        return rows
    return max(0, min(rows, state.remainder - accelerator.process_index * rows))


@torch.no_grad()
def evaluate(
    accelerator: Accelerator, model: "Trainee", task: Task, loader: DataLoader, features: Dataset, raw: Dataset
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Task metrics and mean gold-label loss over exactly the evaluation set, gathered from every
    process (the rows repeated to even out the last batch count neither in the metrics nor in
    the loss).

    `model` is a (prepared) Trainee, so DDP/FSDP wrappers see the same forward as in training.
    """
    model.eval()
    collected: dict[str, list[np.ndarray]] = {}
    loss_sum, count = 0.0, 0
    for batch in loader:
        out, _ = model(task.model_inputs(batch))
        rows = len(batch["feature_id"])
        real = _real_rows(accelerator, rows)
        loss = getattr(out, "loss", None)
        state = accelerator.gradient_state
        if accelerator.num_processes > 1 and state.end_of_dataloader and state.remainder > 0:
            # Every process runs this extra forward (FSDP needs them in step), on its real rows
            # only (at least one, to keep shapes valid), so repeats never enter the loss.
            sub = {k: v[: max(real, 1)] for k, v in batch.items()}
            loss = getattr(model(task.model_inputs(sub))[0], "loss", None)
        if loss is not None and real > 0:
            loss_sum += float(loss) * real
            count += real
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
    ids = arrays["feature_id"]
    if len(ids) != len(features) or len(np.unique(ids)) != len(features):
        raise RuntimeError(
            f"evaluation gathered {len(ids)} features ({len(np.unique(ids))} distinct) for a split "
            f"of {len(features)}: the evaluation loader must give each feature to one process once"
        )
    metrics = task.compute_metrics(arrays, features, raw)
    if accelerator.num_processes > 1:
        totals = torch.tensor([loss_sum, float(count)], dtype=torch.float64, device=accelerator.device)
        loss_sum, count = (float(x) for x in accelerator.reduce(totals, "sum"))
    if count > 0:
        metrics["loss"] = loss_sum / count
    model.train()
    return metrics, arrays


def is_better(task: Task, metric: str, new: float, best: Optional[float]) -> bool:
    if best is None:
        return True
    return new < best if not task.greater_is_better(metric) else new > best


def save_model_folder(accelerator: Accelerator, trainee: nn.Module, folder: Path, tokenizer: Any = None) -> None:
    """Save the trained model (not the loss modules) as a Hugging Face folder, atomically.

    Called on every process: under FSDP the full weights are gathered to the main process,
    which alone writes.
    """
    state = accelerator.get_state_dict(trainee)  # full weights on the main process
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainee).model
        weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        tmp = folder.with_name(f".tmp-{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _swap_in(tmp, folder)
    accelerator.wait_for_everyone()


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


# ---------------------------------------------------------------------------------------------
# Checkpoints (resume after preemption)
# ---------------------------------------------------------------------------------------------


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


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """The newest complete checkpoint (folders appear only once complete: see save_checkpoint)."""
    done = [p for p in ckpt_root.glob("step-*") if (p / "loop_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def save_checkpoint(accelerator: Accelerator, ckpt_root: Path, state: LoopState, keep: int, best_dir: Path) -> Path:
    """accelerator.save_state (model, optimizer, scheduler, RNG) plus the loop state and the
    best model so far, written into a temp folder and renamed when complete: a crash mid-save
    never leaves a broken latest checkpoint. Keeps the newest `keep`."""
    final = ckpt_root / f"step-{state.global_step}"
    tmp = ckpt_root / f".tmp-step-{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if best_dir.exists():
            _link_tree(best_dir, tmp / "best")
        (tmp / "loop_state.json").write_text(json.dumps(asdict(state)))
        _swap_in(tmp, final)
        olds = sorted((p for p in ckpt_root.glob("step-*") if p != final), key=lambda p: int(p.name.split("-")[1]))
        for old in olds[: max(0, len(olds) - keep + 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_from(accelerator: Accelerator, checkpoint: Path, best_dir: Path) -> LoopState:
    """Restore model, optimizer, scheduler and RNG states, the best model so far and the loop
    state saved in `checkpoint`."""
    accelerator.load_state(str(checkpoint))
    if accelerator.is_main_process:
        shutil.rmtree(best_dir, ignore_errors=True)
        if (checkpoint / "best").exists():
            _link_tree(checkpoint / "best", best_dir)
    accelerator.wait_for_everyone()
    return LoopState(**json.loads((checkpoint / "loop_state.json").read_text()))


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


def any_nonfinite(accelerator: Accelerator, value: torch.Tensor) -> bool:
    """True on every process when `value` is NaN/inf on any of them (all must stop together)."""
    bad = (~torch.isfinite(value.detach())).float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "max")
    return bool(bad > 0)


def _nonfinite(
    accelerator: Accelerator, jlog: JsonlLog, state: LoopState, what: str, terms: dict, batch: dict,
    value: torch.Tensor, ckpt_root: Path,
) -> NonFiniteLoss:
    """The error for a NaN/inf loss or gradient: step, loss terms, the batch's example ids (of
    this process's batch: with several processes, the one whose value is not finite names the
    rows that caused it)."""
    latest = latest_checkpoint(ckpt_root)
    values = {k: float(v.detach()) for k, v in terms.items()}
    where = f" on process {accelerator.process_index}" if accelerator.num_processes > 1 else ""
    err = NonFiniteLoss(
        f"non-finite {what} ({float(torch.as_tensor(value).detach())}{where}) at step {state.global_step + 1} (epoch {state.epoch}, "
        f"batch {state.batches_done} of the epoch): loss terms {values}, batch example_ids "
        f"{batch['example_id'].tolist()}. "
        + (f"The last good checkpoint is kept: {latest}. " if latest else "No checkpoint was saved yet. ")
        + "Lower train.lr, raise train.warmup_ratio, or check those rows."
    )
    jlog.write({"step": state.global_step, "error": str(err)})
    return err


# ---------------------------------------------------------------------------------------------
# Checking every stage before the first one trains
# ---------------------------------------------------------------------------------------------


def preflight(cfg: Config, stages: Sequence[str]) -> None:
    """Check the inputs of every stage about to run, before the first one trains, so that a
    broken student setting does not surface only after hours of teacher fine-tuning.

    Cheap: data, configs and tokenizers, no weights. A student stage whose teacher is not
    fine-tuned yet checks against the pretrained teacher, which has the same tokenizer, depth
    and width (the teacher stage gives it the data's labels). Every stage repeats its full
    checks when it starts; this only moves the failures earlier.
    """
    task = get_task(cfg)
    load_data(cfg, task)
    for stage in stages:
        if stage not in STAGES:
            raise StageError(f"unknown stage '{stage}' ({', '.join(STAGES)})")
        if check_stage_dir(cfg, stage) == "complete":
            continue
        check_writable(stage_dir(cfg, stage), keep=False)
        _check_model_setup(cfg, stage, task)


def _check_model_setup(cfg: Config, stage: str, task: Task) -> None:
    """The model-dependent checks of `build_models`, `bind_tokenizers` and `build_losses`, on
    configs and tokenizers only."""
    t, s = cfg.teacher, cfg.student
    if stage == "teacher":
        models.load_config(t.model, t.revision, t.trust_remote_code)
        models.load_tokenizer(t.model, t.revision, t.trust_remote_code)
        return
    teacher_config = teacher_tok = None
    if stage == "student" and t.model:
        finetuned = t.finetuned or (stage_dir(cfg, "teacher") / "model").exists()
        src = teacher_source(cfg) if finetuned else t.model
        revision = t.revision if (t.finetuned or not finetuned) else None
        teacher_config = models.load_config(src, revision, t.trust_remote_code)
        if finetuned:
            label_order(teacher_config, task.labels, f"teacher '{src}'")
        teacher_tok = models.load_tokenizer(src, revision, t.trust_remote_code)
    if s.model:
        student_config = models.load_config(s.model, s.revision, s.trust_remote_code, **dict(s.config_overrides))
        tokenizer = models.load_tokenizer(s.model, s.revision, s.trust_remote_code)
    else:
        student_config = models.load_config(t.model, t.revision, t.trust_remote_code, **dict(s.config_overrides))
        n = student_config.num_hidden_layers
        try:
            layers = list(s.from_teacher_layers) or models.uniform_layers(n, s.num_layers)
        except ValueError as err:
            raise StageError(f"cannot cut the student out of teacher '{t.model}' ({n} layers): {err}") from None
        bad = [i for i in layers if not 0 <= i < n]
        if bad or sorted(set(layers)) != list(layers):
            raise StageError(
                f"cannot cut the student out of teacher '{t.model}' ({n} layers): "
                f"student.from_teacher_layers={layers} must be increasing, unique and in 0..{n - 1}"
            )
        student_config.num_hidden_layers = len(layers)
        tokenizer = models.load_tokenizer(t.model, t.revision, t.trust_remote_code)
    bind_tokenizers(cfg, get_task(cfg), tokenizer, teacher_tok)
    if teacher_config is not None and cfg.distill.hidden_weight > 0:
        build_losses(cfg, _ConfigOnly(student_config), _ConfigOnly(teacher_config))


class _ConfigOnly(nn.Module):
    """A model stand-in that only has a config (what `build_losses` reads)."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config


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


def run_stage(cfg: Config, stage: str) -> dict[str, dict[str, float]]:
    """Run one stage to completion (or resume it) and return its metrics.json content."""
    if stage not in STAGES:
        raise StageError(f"unknown stage '{stage}' ({', '.join(STAGES)})")
    out = stage_dir(cfg, stage)
    tcfg = stage_train(cfg, stage)
    accelerator = make_accelerator(cfg, stage, tcfg.grad_accum)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # e.g. torchrun on a machine without GPUs: each process would run the whole stage alone,
        # all of them writing the same folder
        raise StageError(
            f"the launcher started {launched} processes but accelerate runs {accelerator.num_processes}: "
            "on CPU set ACCELERATE_USE_CPU=1 (accelerate launch --cpu does), otherwise check the "
            "accelerate config (accelerate env)"
        )
    main = accelerator.is_main_process
    if not main:  # one copy of every warning and progress bar
        log.setLevel(logging.ERROR)
        import datasets

        datasets.disable_progress_bars()
    # Every process reads the folder's state before anyone may change it.
    status = check_stage_dir(cfg, stage)
    accelerator.wait_for_everyone()
    if status == "complete":
        if main:
            print(f"[distill] {stage}: complete with the same config, skipping ({out})", flush=True)
        return json.loads((out / "metrics.json").read_text())

    # --- checks and setup: data, models, tokenizers, losses, teacher outputs -----------------
    # Nothing below writes into the stage folder, so a bad input loses no earlier result.
    check_writable(out)
    set_seed(cfg.seed)
    task = get_task(cfg)
    raw = load_data(cfg, task)
    model, tokenizer, teacher, teacher_tok = build_models(cfg, stage, task)
    distilling = teacher is not None
    bind_tokenizers(cfg, task, tokenizer, teacher_tok)
    weights, kd_loss, hidden_loss = build_losses(cfg, model, teacher)
    features = prepare_data(cfg, task, accelerator, raw)
    teacher_fn = None
    if distilling:
        from distill import cache

        place_teacher(teacher, accelerator)
        teacher_fn = cache.teacher_outputs(cfg, task, teacher, features["train"], accelerator, hidden="hidden" in weights)
        if teacher_fn is None:
            teacher_fn = OnlineTeacher(teacher, task, accelerator, hidden="hidden" in weights)
        else:
            # outputs are cached: the teacher need not stay resident while the student trains
            del teacher
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # --- every check passed: replace an old run (overwrite=true), record the config -----------
    if main:
        if status == "overwrite":
            shutil.rmtree(out)
            out.mkdir(parents=True)
        atomic_write(out / "config.yaml", to_yaml(cfg))
        print(f"[distill] stage {stage} -> {out}\n{to_yaml(cfg)}", flush=True)
    accelerator.wait_for_everyone()

    # --- optimizer, schedule, prepare -------------------------------------------------------
    trainee = Trainee(model, hidden_loss)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight", "norm.weight")
    named = list(trainee.named_parameters())
    groups = [
        {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": tcfg.weight_decay},
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=tcfg.lr)
    train_loader = make_loader(task, features["train"], tcfg.batch_size, True, cfg)
    sampler: LengthGroupedBatchSampler = train_loader.batch_sampler  # accelerate shards it, keeps it
    eval_bs = tcfg.eval_batch_size or 2 * tcfg.batch_size
    eval_splits = [s for s in ("validation", "test") if s in features]
    eval_loaders = {s: make_loader(task, features[s], eval_bs, False, cfg) for s in eval_splits}
    # train.batch_size is per process: the global batch is batch_size x processes x grad_accum.
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / tcfg.grad_accum)
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps > 0:
        total_steps = min(total_steps, tcfg.max_steps)
    # A prepared scheduler steps once per process at every optimizer step (accelerate's
    # convention), so its horizon is counted in those sub-steps; DeepSpeed's engine steps it once.
    ticks = 1 if accelerator.distributed_type == DistributedType.DEEPSPEED else accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(tcfg.warmup_ratio * total_steps) * ticks, total_steps * ticks
    )
    trainee, optimizer, train_loader, scheduler, *loaders = accelerator.prepare(
        trainee, optimizer, train_loader, scheduler, *eval_loaders.values()
    )
    eval_loaders = dict(zip(eval_loaders, loaders))

    # --- resume -----------------------------------------------------------------------------
    ckpt_root = out / "checkpoints"
    best_dir = out / "best"
    state = LoopState()
    latest = latest_checkpoint(ckpt_root) if status == "resume" else None
    jlog = JsonlLog(out / "log.jsonl", main)
    if latest is not None:
        state = resume_from(accelerator, latest, best_dir)
    if status == "resume":
        jlog.rewind(state.global_step)  # the steps after the checkpoint are logged again
    if latest is not None and main:
        print(
            f"[distill] resuming {stage} from {latest} (epoch {state.epoch}, batch "
            f"{state.batches_done}, step {state.global_step})",
            flush=True,
        )
    elif main:
        shutil.rmtree(best_dir, ignore_errors=True)  # left by a run that never checkpointed

    if accelerator.log_with:  # the trackers named in tracking.report_to (created here)
        run_name = cfg.tracking.run_name or f"{cfg.task.name}-{stage}-{models.short_name(cfg.student.model or 'layers')}"
        accelerator.init_trackers(cfg.tracking.project, config=to_dict(cfg), init_kwargs={"wandb": {"name": run_name}})
    select = tcfg.select_metric or task.metric
    metric_needs_val = "validation" in eval_loaders

    def evaluate_and_select() -> bool:
        """Evaluate on validation, keep the best model; True when early stopping says stop."""
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
            save_model_folder(accelerator, trainee, best_dir)
        else:
            state.bad_evals += 1
        return tcfg.patience > 0 and state.bad_evals >= tcfg.patience

    last_saved: Optional[tuple] = None

    def checkpoint() -> Path:
        """Save unless this exact loop state was just saved."""
        nonlocal last_saved
        key = (state.global_step, state.epoch, state.batches_done)
        path = ckpt_root / f"step-{state.global_step}"
        if key != last_saved:
            path = save_checkpoint(accelerator, ckpt_root, state, tcfg.keep_checkpoints, best_dir)
            last_saved = key
        return path

    def stop_if_signalled(flag: StopFlag) -> None:
        if flag.any_process(accelerator):
            path = checkpoint()
            raise Preempted(
                f"stopped by signal at step {state.global_step}; checkpoint saved to {path}. "
                f"Re-run the same command to resume (exit status {REQUEUE_EXIT_CODE})."
            )

    # --- the loop -----------------------------------------------------------------------------
    trainee.train()
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not main, desc=stage, dynamic_ncols=True)
    window = {"samples": 0, "time": time.perf_counter(), "terms": {}, "n": 0}
    with StopFlag() as stop_flag:
        while not state.finished and state.epoch < tcfg.epochs:
            # The batch order is a pure function of (seed, epoch); a resumed epoch skips the
            # batches already consumed.
            train_loader.set_epoch(state.epoch)
            sampler.set_epoch(state.epoch)
            epoch_loader = train_loader
            if state.batches_done:
                epoch_loader = accelerator.skip_first_batches(train_loader, state.batches_done)
            epoch_done = True
            for batch in epoch_loader:
                last_batch = accelerator.gradient_state.end_of_dataloader  # the epoch's last
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
                    # one scalar sync per batch: a NaN stops the run at the batch that made it
                    if any_nonfinite(accelerator, loss):
                        raise _nonfinite(accelerator, jlog, state, "loss", terms, batch, loss, ckpt_root)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tcfg.max_grad_norm > 0:
                        norm = accelerator.clip_grad_norm_(trainee.parameters(), tcfg.max_grad_norm)
                        # a non-finite gradient would poison the weights, and every later checkpoint
                        # (DeepSpeed clips inside its engine and may report no norm)
                        if norm is not None and any_nonfinite(accelerator, torch.as_tensor(norm)):
                            raise _nonfinite(accelerator, jlog, state, "gradient norm", terms, batch, norm, ckpt_root)
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

                if tcfg.eval_steps > 0 and state.global_step % tcfg.eval_steps == 0 and metric_needs_val:
                    state.finished = evaluate_and_select()
                if state.global_step >= total_steps:
                    state.finished = True
                if last_batch:
                    continue  # the epoch-end block below evaluates, checkpoints and checks signals
                if state.finished:
                    epoch_done = False
                    break
                if tcfg.checkpoint_steps > 0 and state.global_step % tcfg.checkpoint_steps == 0:
                    checkpoint()
                stop_if_signalled(stop_flag)
            if not epoch_done:
                break
            # the epoch ran to its end
            state.epoch += 1
            state.batches_done = 0
            if tcfg.eval_steps == 0 and metric_needs_val:
                state.finished = evaluate_and_select() or state.finished
            checkpoint()
            stop_if_signalled(stop_flag)
    progress.close()

    # --- final: reload the best model, score validation and test, write outputs -------------
    if metric_needs_val and (not state.history or state.history[-1]["step"] != state.global_step):
        evaluate_and_select()  # the weights since the last evaluation
    accelerator.wait_for_everyone()
    if best_dir.exists():
        load_model_weights(accelerator, trainee, best_dir)
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
    final_model = accelerator.unwrap_model(trainee).model
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
        "processes": accelerator.num_processes,
    }
    accelerator.log({f"{s}/{k}": v for s, m in results.items() if s != "info" for k, v in m.items()}, step=state.global_step)
    save_model_folder(accelerator, trainee, out / "model", tokenizer)
    if main:
        # metrics.json last: its presence marks the stage complete
        atomic_write(out / "metrics.json", json.dumps(results, indent=2))
        shutil.rmtree(best_dir, ignore_errors=True)
        shutil.rmtree(ckpt_root, ignore_errors=True)
        print(f"[distill] {stage} done: " + json.dumps({k: v for k, v in results.items() if k != "info"}), flush=True)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it ends the process group, and
        tracker.finish()  # `distill run` goes on with the next stage
    accelerator.free_memory()
    return results

