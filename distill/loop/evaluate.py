"""Evaluation: task metrics and gold-label loss over exactly one split, from every process;
the predictions file; and `distill eval` (score a saved model on the recipe's splits).

The model evaluated is a (prepared) `Trainee`, so DDP/FSDP wrappers see the same forward as in
training; calling it with the batch's inputs alone returns the model's outputs first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from distill import models
from distill.config import Config
from distill.errors import StageError
from distill.models.load import looks_like_path
from distill.data.features import load_data, make_loader, prepare_data
from distill.objective.losses import Trainee
from distill.tasks import get_task
from distill.tasks.base import Task, concat_padded


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
    accelerator: Accelerator, model: nn.Module, task: Task, loader: DataLoader, features: Dataset, raw: Dataset
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Task metrics and mean gold-label loss over exactly the evaluation set, gathered from every
    process (the rows repeated to even out the last batch count neither in the metrics nor in
    the loss), and the gathered outputs in feature order."""
    model.eval()
    collected: dict[str, list[np.ndarray]] = {}
    loss_sum, count = 0.0, 0
    for batch in loader:
        out = model(task.model_inputs(batch))[0]
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
    arrays = {k: concat_padded(v) for k, v in collected.items()}
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


def write_predictions(task: Task, arrays: dict[str, np.ndarray], features: Dataset, raw: Dataset, path: Path) -> None:
    """Human-readable predictions per raw example, one JSON object per line (if the task has any)."""
    preds = task.predictions(arrays, features, raw)
    if preds:
        with open(path, "w") as f:
            for p in preds:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict[str, dict[str, float]]:
    """Metrics per evaluation split for the model saved at `checkpoint` (a model folder)."""
    if looks_like_path(checkpoint) and not Path(checkpoint).expanduser().is_dir():
        raise StageError(f"checkpoint={checkpoint}: no such folder ({Path(checkpoint).expanduser().resolve()}); "
                         "point it at a saved model folder, e.g. runs/x/student/model")
    models.load_config(checkpoint)  # a folder that is not a model, a Hub id not cached: said before any work
    accelerator = Accelerator()
    task = get_task(cfg.task, cfg.data)
    raw = load_data(cfg.data, cfg.seed, task)
    task.bind(models.load_tokenizer(checkpoint))
    features = prepare_data(task, raw, accelerator)
    model = models.load_model(checkpoint, task.model_class())
    models.align_labels(model, task.labels, checkpoint)
    trainee: Any = accelerator.prepare(Trainee(model))
    batch_size = cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    results = {}
    for split in ("validation", "test"):
        if split in features:
            loader = accelerator.prepare(
                make_loader(task, features[split], batch_size, seed=cfg.seed, group_by_length=cfg.train.group_by_length)
            )
            results[split], _ = evaluate(accelerator, trainee, task, loader, features[split], raw[split])
    return results
