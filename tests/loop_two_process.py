"""Worker for test_loop_speed.py's 2-process test: a student stage on each path, counting the
host reads and collectives of its training steps. Launch:
ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 THIS DATA_ROOT TEACHER OUT_DIR
(DATA_ROOT holds the data and, in run/teacher, the fine-tuned teacher). Each process writes
OUT_DIR/rank<r>.json: {path: {steps, reads, collectives, shaped}}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from distill.cli import main  # noqa: E402
from tests.test_loop_speed import PATHS, ValueShapedOps, count_reads_and_collectives, recipe, steps_and_logs  # noqa: E402


def run(root: Path, teacher: Path, out: Path) -> None:
    rank = int(os.environ["RANK"])
    report = {}
    for name in ("online", "cached hidden states"):
        where = out / name.replace(" ", "-")
        where.mkdir(parents=True, exist_ok=True)
        path = recipe(root, teacher, PATHS[name], where=where) if rank == 0 else where / "recipe.yaml"
        with pytest.MonkeyPatch.context() as patch:
            counts = count_reads_and_collectives(patch)
            if rank != 0:  # the recipe is written by process 0 before its first collective
                import time

                while not path.exists():
                    time.sleep(0.05)
            with ValueShapedOps(counts["shaped"]):
                code = main(["student", str(path), f"output_dir={where / 'run'}", f"teacher.dir={root / 'run' / 'teacher'}"])
        assert code == 0, f"{name}: exit {code}"
        steps, _ = steps_and_logs(where / "run")
        report[name] = {"steps": steps, **counts}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
