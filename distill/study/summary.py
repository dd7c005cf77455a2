"""The closing table of `distill run`: each stage's score, parameters and relative speed."""

from __future__ import annotations

import json
from pathlib import Path

from distill.config import Config
from distill.ship.evidence import trusts_remote_code
from distill.tasks import get_task
from distill.loop.plan import stage_dir

LABELS = {"teacher": "teacher (fine-tuned)", "student": "student (distilled)", "baseline": "student (fine-tuned alone)"}


def summary_rows(cfg: Config, results: dict[str, dict]) -> list[dict]:
    """Per stage: headline score, parameters, and CPU latency measured round-robin over the
    stages' saved models (batch 1, the recipe's max length), so machine load hits all alike."""
    from distill.latency import measure_interleaved

    task = get_task(cfg.task, cfg.data)
    metric = task.metric
    stages = list(results)
    # the recipe's trust_remote_code, never None: None makes transformers ask on the terminal
    loaded = [
        task.model_class().from_pretrained(stage_dir(cfg, s) / "model", trust_remote_code=trusts_remote_code(cfg, s)).eval()
        for s in stages
    ]
    timings = measure_interleaved([(m, 1, cfg.data.max_length) for m in loaded], warmup=3, runs=15)
    rows = []
    for stage, timing in zip(stages, timings):
        res = results[stage]
        split = "test" if "test" in res else "validation"
        rows.append(
            {
                "stage": stage,
                "model": LABELS.get(stage) or stage.replace("-", " ") + " (fine-tuned)",
                "split": split,
                "score": res.get(split, {}).get(metric),
                "parameters": res.get("info", {}).get("parameters"),
                "latency_ms": timing.median_ms,
                "latency_iqr_ms": timing.iqr_ms,
                "threads": timing.threads,
                "warmup": timing.warmup,  # how it was timed, for the model card's speed sentence
                "runs": timing.runs,
            }
        )
    # speed is relative to the (first) teacher: `teacher`, or `teacher-<i>` with several
    ref = next((r["latency_ms"] for r in rows if r["stage"].startswith("teacher")), rows[0]["latency_ms"])
    for r in rows:
        r["speedup"] = ref / r["latency_ms"]
    return rows


def print_summary(cfg: Config, results: dict[str, dict]) -> list[dict]:
    """Print the table and save it as <output_dir>/summary.json (main process only)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return []
    rows = summary_rows(cfg, results)
    metric = get_task(cfg.task, cfg.data).metric
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
