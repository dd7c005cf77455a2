"""A fake stage runner for the search tests, and the worker processes of the multi-process tests.

`FakeStage` stands in for `distill.loop.train.run_stage` (tests put it there with monkeypatch,
where the search looks it up) and resolves every stage name through the loop's own planner
(`distill.loop.plan.plan_stage`): a stage name the product refuses, the fake refuses too, and a
teacher stage trains the config the product would (its folder, its own seed). Kept apart from
tests/test_search.py so a worker process imports the search alone, not the models and data the
other tests build.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

from distill.errors import NonFiniteLoss, Preempted


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
        self.configs: dict[str, Any] = {}  # folder name -> the config the stage trains

    def __call__(self, cfg, stage: str, on_evaluate=None) -> dict:
        from distill.loop.plan import plan_stage

        plan = plan_stage(cfg, stage)  # StageError for a name the recipe has not, as run_stage
        out, teacher = plan.folder, plan.kind == "teacher"
        name = out.name if teacher else Path(plan.recipe.output_dir).name
        if (out / "metrics.json").exists():
            return json.loads((out / "metrics.json").read_text())
        self.calls.append((stage, name))
        self.configs[name] = plan.recipe
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


def light_search(runner: FakeStage) -> None:
    """In a worker process: the fake stage, no preflight (no data or models here) and no figures
    (the tests are about sharing the study, and matplotlib is slow to start)."""
    import distill.loop.train
    from distill.study.search import outputs, trials

    distill.loop.train.run_stage = runner
    trials.Search.preflight = lambda self: None  # type: ignore[method-assign]
    outputs.plot = lambda search, study: {}
    outputs.importances = lambda search, study: {}


def run_worker(recipe: str, root: str, worker: int) -> None:
    """One worker of the two-worker test."""
    from distill.study.search.command import main

    light_search(FakeStage(sleep=0.05))
    sys.exit(main([recipe, "--root", root, "--worker", str(worker)]))


def run_team(recipe: str, root: str, trouble: str = "") -> None:
    """One process of a worker started by torchrun (2 processes): prints what it trained and how
    the search ended, as a JSON line tagged with its rank.

    trouble="fail": the main process's sampler raises when it suggests trial 1's values;
    trouble="hang": it stalls there for 20 s, while the others wait at most 8 s."""
    import contextlib
    import io

    from distill.config.search_space import Param
    from distill.study.search import team
    from distill.study.search.command import main

    runner = FakeStage(epochs=4)
    light_search(runner)
    rank = int(os.environ["RANK"])
    if trouble == "hang":
        team.WAIT_S = 8
    if trouble and rank == 0:
        suggest = Param.suggest

        stalled: set = set()

        def troubled(self, trial):
            if trial.number == 1:
                if trouble == "fail":
                    raise RuntimeError("the sampler broke")
                if trial.number not in stalled:  # once per trial, not once per parameter
                    stalled.add(trial.number)
                    time.sleep(20)
            return suggest(self, trial)

        Param.suggest = troubled  # type: ignore[method-assign]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            code: Any = main([recipe, "--root", root])
    except BaseException as err:  # noqa: BLE001 - reported, so that both processes print
        code = f"{type(err).__name__}: {err}"
    students = [name for stage, name in runner.calls if stage == "student"]
    print("RESULT " + json.dumps({"rank": rank, "code": code, "students": students, "stderr": errors.getvalue(),
                                  "evaluations": runner.evaluations}), flush=True)


def take_waiting_trials(url: str, start: Any, taken: Any) -> None:
    """One of two workers that ask a SQLite study for trials at the same instant (`start`, a
    barrier): puts the numbers it got in `taken`."""
    import warnings

    import optuna

    from distill.study.search.study import make_storage

    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="race", storage=make_storage(url, heartbeat=60))
    start.wait()
    taken.put([study.ask().number for _ in range(3)])
