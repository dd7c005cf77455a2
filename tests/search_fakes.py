"""A fake stage runner for the search tests, and the worker process of the two-worker test.

Kept apart from tests/test_search.py so a worker process imports the search alone, not the
models and data the other tests build.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

from distill.errors import NonFiniteLoss, Preempted
from distill.study import search as S


def fake_score(cfg) -> float:
    """Best at lr = 1e-3; T and the loss add small, known amounts."""
    score = 0.9 - 0.1 * abs(math.log10(cfg.train.lr) + 3)
    return score + 0.01 * cfg.distill.temperature + (0.02 if cfg.distill.kd_loss == "ce" else 0.0)


class FakeStage:
    """Behaves like run_stage for the search: skips a complete folder, reports a validation score
    after each epoch to `on_evaluate` (rising to the final score), writes metrics.json last."""

    def __init__(self, epochs: int = 3, sleep: float = 0.0, preempt: Optional[str] = None, nan: Optional[str] = None):
        self.epochs, self.sleep, self.preempt, self.nan = epochs, sleep, preempt, nan
        self.calls: list[tuple[str, str]] = []  # (stage, folder name)
        self.evaluations: dict[str, int] = {}
        self.configs: dict[str, Any] = {}

    def __call__(self, cfg, stage: str, on_evaluate=None) -> dict:
        teacher = stage.startswith("teacher")
        if teacher:  # `teacher`, or `teacher-<i>` for an entry of `teachers:`
            out = Path((cfg.teacher if stage == "teacher" else cfg.teachers[int(stage.split("-")[1])]).dir)
        else:
            out = Path(cfg.output_dir) / stage
        name = out.name if teacher else Path(cfg.output_dir).name
        if (out / "metrics.json").exists():
            return json.loads((out / "metrics.json").read_text())
        self.calls.append((stage, name))
        self.configs[name] = cfg
        if teacher:
            results = {"validation": {"accuracy": 0.95}, "test": {"accuracy": 0.94}, "info": {"parameters": 10}}
        else:
            if self.preempt == name:
                self.preempt = None  # the next attempt goes through
                raise Preempted("stopped by signal at step 3; checkpoint saved")
            if self.nan == name:
                raise NonFiniteLoss("non-finite loss (nan) at step 2")
            score = fake_score(cfg)
            for epoch in range(1, self.epochs + 1):
                time.sleep(self.sleep)
                (out / "checkpoints" / f"step-{epoch * 5}").mkdir(parents=True, exist_ok=True)
                self.evaluations[name] = epoch
                if on_evaluate is not None:
                    value = score * epoch / self.epochs
                    on_evaluate(epoch * 5, epoch, {"accuracy": value, "loss": 1 - value})
            layers = cfg.student.num_layers or 1
            results = {"validation": {"accuracy": score, "loss": 1 - score},
                       "test": {"accuracy": score - 0.01}, "info": {"parameters": layers * 1_000_000}}
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # as a finished stage does
        (out / "metrics.json").write_text(json.dumps(results))
        return results


def run_worker(recipe: str, root: str, worker: int) -> None:
    """One worker of the two-worker test: the fake stage, no preflight (no data or models here)
    and no figures (the test is about sharing the study, and matplotlib is slow to start)."""
    S.Search.preflight = lambda self: None  # type: ignore[method-assign]
    S.Search.plot = lambda self, study: {}  # type: ignore[method-assign]
    S.Search.importances = lambda self, study: {}  # type: ignore[method-assign]
    sys.exit(S.main([recipe, "--root", root, "--worker", str(worker)], runner=FakeStage(sleep=0.05)))


def run_team(recipe: str, root: str) -> None:
    """One process of a worker started by torchrun (2 processes): prints what it trained, as
    a JSON line tagged with its rank."""
    import os

    S.Search.preflight = lambda self: None  # type: ignore[method-assign]
    S.Search.plot = lambda self, study: {}  # type: ignore[method-assign]
    S.Search.importances = lambda self, study: {}  # type: ignore[method-assign]
    runner = FakeStage(epochs=4)
    code = S.main([recipe, "--root", root], runner=runner)
    students = [name for stage, name in runner.calls if stage == "student"]
    print("RESULT " + json.dumps({"rank": int(os.environ["RANK"]), "code": code, "students": students,
                                  "evaluations": runner.evaluations}), flush=True)
