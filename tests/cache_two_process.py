"""Worker for test_cache.py's 2-process test: build one teacher cache (logits and hidden states)
across processes, read a cache built by one process, then train a student from it. Launch:
ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 THIS OUT_DIR ONE_PROCESS_CACHE.

Each process writes OUT_DIR/rank<r>.json with what it saw (teacher rows computed while building
and while training, batches trained, the largest cached-vs-online logit difference, losses).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from datasets import Dataset, DatasetDict  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from tests.conftest import SPANISH, minilm_path, online_teacher, pair, teacher_outputs, tiny_bert_config  # noqa: E402
from distill.config import Config  # noqa: E402
from distill.objective.losses import SoftLabelLoss  # noqa: E402
from distill.data.sampling import LengthGroupedBatchSampler  # noqa: E402
from distill.tasks.classification import ClassificationTask  # noqa: E402


def inputs(out: Path, cache_dir: Path):
    """(cfg, task, features, teacher): the same on every process and in the test that reads the
    cache back, so they share one cache key. The cache keeps the hidden states too (float16)."""
    cfg = Config()
    cfg.student.model = "student"
    cfg.output_dir = str(out / "run")
    cfg.distill.cache_dir = str(cache_dir)
    cfg.distill.hidden_weight, cfg.distill.cache_hidden_states, cfg.distill.cache_hidden_dtype = 1.0, True, "float16"
    cfg.data.max_length = 24
    cfg.train.batch_size = 4
    texts = [f"{a} {b}" if i % 2 else a for i, (a, b) in enumerate(zip(SPANISH * 5, SPANISH[3:] * 6))]
    raw = DatasetDict(train=Dataset.from_dict({"text": texts, "label": [i % 3 for i in range(len(texts))]}))
    task = ClassificationTask(cfg.task, cfg.data)
    task.setup(raw)
    task.bind(AutoTokenizer.from_pretrained(minilm_path()))
    features = task.preprocess(raw["train"], "train")
    torch.manual_seed(0)  # the same teacher on both processes
    teacher = AutoModelForSequenceClassification.from_config(tiny_bert_config(num_labels=3)).eval()
    with torch.no_grad():
        teacher.classifier.weight.mul_(30.0)
    return cfg, task, features, teacher


def largest_difference(a, b) -> float:
    """The largest difference between two caches' rows, every feature, every target."""
    ids = list(range(len(a)))
    x, y = a.gather(ids), b.gather(ids)
    assert set(x) == set(y)
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def main(out: Path, built_by_one: Path) -> None:
    from distill.teachers.cache import TeacherCache

    accelerator = Accelerator()
    assert accelerator.num_processes == 2, "launch with 2 processes"
    with accelerator.main_process_first():
        cfg, task, features, teacher = inputs(out, out / "cache")
    counting, rows = [True], [0]

    def count(module, args, kwargs, output):
        if counting[0]:
            rows[0] += len(kwargs["input_ids"])

    teacher.register_forward_hook(count, with_kwargs=True)
    fn = teacher_outputs(cfg, task, teacher, features, accelerator, hidden=True)
    build_rows, rows[0] = rows[0], 0

    torch.manual_seed(1)
    student = AutoModelForSequenceClassification.from_config(tiny_bert_config(num_labels=3))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    sampler = LengthGroupedBatchSampler(features["length"], cfg.train.batch_size, seed=cfg.seed)
    loader = DataLoader(features, batch_sampler=sampler, collate_fn=task.collate)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    online = online_teacher(teacher, task, accelerator, hidden=False)
    kd = SoftLabelLoss("kl", 1.0)
    losses, diff, batches, train_rows = [], 0.0, 0, 0
    for batch in loader:
        targets, _ = pair(fn(batch))
        outputs = student(**task.model_inputs(batch))
        loss = kd(task.kd_pairs(task.kd_targets(outputs, batch, teacher=False), targets, batch))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        counting[0] = False  # the comparison below is not training
        live, _ = pair(online(batch))
        counting[0] = True
        diff = max(diff, float((live["logits"] - targets["logits"]).abs().max()))
        losses.append(float(loss.detach()))
        batches += 1
        train_rows += len(batch["feature_id"])
    report = {
        "read_one_process_cache": largest_difference(TeacherCache(built_by_one), fn.cache),  # 1 -> 2
        "features": len(features),
        "teacher_rows_in_build": build_rows,
        "teacher_rows_in_training": rows[0],
        "cache": str(fn.cache.path),
        "train_batches": batches,
        "train_rows": train_rows,
        "max_abs_diff": diff,
        "losses": losses,
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
