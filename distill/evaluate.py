"""`distill eval`: score a saved model on the recipe's validation and test splits."""

from __future__ import annotations

from accelerate import Accelerator

from distill import models
from distill.config import Config
from distill.tasks import get_task
from distill.train import Trainee, align_labels, evaluate, load_data, make_loader, prepare_data


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict[str, dict[str, float]]:
    """Metrics per evaluation split for the model saved at `checkpoint` (a model folder)."""
    accelerator = Accelerator()
    task = get_task(cfg)
    raw = load_data(cfg, task)
    task.bind(models.load_tokenizer(checkpoint))
    features = prepare_data(cfg, task, accelerator, raw)
    model = models.load_model(checkpoint, task.model_class())
    align_labels(model, task.labels, checkpoint)
    trainee = accelerator.prepare(Trainee(model))
    batch_size = cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    results = {}
    for split in ("validation", "test"):
        if split in features:
            loader = accelerator.prepare(make_loader(task, features[split], batch_size, False, cfg))
            results[split], _ = evaluate(accelerator, trainee, task, loader, features[split], raw[split])
    return results
