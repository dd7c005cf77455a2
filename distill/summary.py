"""The closing table of `distill run`: each stage's score, parameters and relative speed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from distill import models
from distill.config import Config
from distill.tasks import get_task
from distill.train import stage_dir

LABELS = {"teacher": "teacher (fine-tuned)", "student": "student (distilled)", "baseline": "student (fine-tuned alone)"}


@torch.no_grad()
def cpu_latency_ms(model_dir: Path, model_class, seq: int, runs: int = 10) -> float:
    """Median latency of one batch-1 forward at length `seq` (random ids, current threads)."""
    model = model_class.from_pretrained(model_dir).eval()
    ids = torch.randint(5, model.config.vocab_size - 1, (1, seq))
    mask = torch.ones_like(ids)
    for _ in range(3):
        model(input_ids=ids, attention_mask=mask)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def summary_rows(cfg: Config, results: dict[str, dict]) -> list[dict]:
    task = get_task(cfg)
    metric = task.metric
    rows = []
    for stage, res in results.items():
        split = "test" if "test" in res else "validation"
        model_dir = stage_dir(cfg, stage) / "model"
        rows.append(
            {
                "stage": stage,
                "model": LABELS.get(stage, stage),
                "split": split,
                "score": res.get(split, {}).get(metric),
                "parameters": res.get("info", {}).get("parameters"),
                "latency_ms": cpu_latency_ms(model_dir, task.model_class(), cfg.data.max_length),
            }
        )
    ref = next((r["latency_ms"] for r in rows if r["stage"] == "teacher"), rows[0]["latency_ms"])
    for r in rows:
        r["speedup"] = ref / r["latency_ms"]
    return rows


def print_summary(cfg: Config, results: dict[str, dict]) -> list[dict]:
    """Print the table and save it as <output_dir>/summary.json (main process only)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return []
    rows = summary_rows(cfg, results)
    metric = get_task(cfg).metric
    header = f"| model | {metric} ({rows[0]['split']}) | parameters | latency (ms, bs 1, seq {cfg.data.max_length}, CPU) | speed vs teacher |"
    lines = [header, "|---|---|---|---|---|"]
    for r in rows:
        score = f"{r['score']:.4f}" if r["score"] is not None else "-"
        lines.append(
            f"| {r['model']} | {score} | {r['parameters'] / 1e6:.2f}M | {r['latency_ms']:.1f} | {r['speedup']:.2f}x |"
        )
    print("\n" + "\n".join(lines) + "\n", flush=True)
    (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(rows, indent=2))
    return rows
