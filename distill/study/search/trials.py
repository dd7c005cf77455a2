"""One search: the recipe and its space, the shared teachers, and the trials this worker runs.

Every trial is an ordinary `student` stage (`run_stage`) in `<root>/trial-<n>/`, built from the
recipe, the command line, the trial's values and the folders every trial shares (the fine-tuned
teachers, the caches of their outputs). The teachers are fine-tuned once, before the first trial,
by the same `run_stage` that `distill run` uses, so a search's teacher folder holds the very run
`distill run` would make (its own seed included). Pruning follows the validation metric the loop
computes at every evaluation (`on_evaluate`).

Not supported: a space over `teacher.*` keys with `teachers:` (the keys set the single teacher).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from distill.config import Config, ConfigError, SearchConfig, leaf_types, load_config
from distill.config.search_space import (
    TEACHER_EXACT,
    TEACHER_PREFIXES,
    Param,
    SearchError,
    direction,
    parse_duration,
    parse_space,
    pruner_name,
    resolve_objectives,
    value_text,
)
from distill.study.search import outputs
from distill.study.search import study as studies
from distill.study.search.team import Team


class TrialFailed(Exception):
    """A trial whose values cannot train (an invalid combination, a non-finite loss): recorded
    as failed, and the search goes on. `reason` is the underlying message."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class _Stopped(Exception):
    """Carries an interruption or crash out of Optuna's loop, so the trial can be retried."""

    def __init__(self, number: int, cause: BaseException):
        super().__init__(f"trial {number} stopped: {type(cause).__name__}: {cause}")
        self.number, self.cause = number, cause


class Pruning:
    """`on_evaluate` for a trial: reports the objective's validation value and stops the stage
    (optuna.TrialPruned, on every process together) when the pruner says so.

    Reports are indexed by epoch when the loop evaluates at epoch ends (trials with different
    batch sizes then compare like with like), by optimizer step when train.eval_steps > 0."""

    def __init__(self, trial: Any, metric: str, by_epoch: bool, team: Team):
        self.trial, self.metric, self.by_epoch, self.team = trial, metric, by_epoch, team
        self.reported: set[int] = set()

    def __call__(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        import optuna

        at = epoch if self.by_epoch else step
        unit = "epoch" if self.by_epoch else "step"

        def decide() -> bool:
            if self.metric not in metrics:
                raise SearchError(f"the validation metrics {sorted(metrics)} have no '{self.metric}' to prune on")
            if at in self.reported:  # the loop's last evaluation can repeat an epoch
                return False
            self.reported.add(at)
            self.trial.report(float(metrics[self.metric]), step=at)
            return self.trial.should_prune()

        trial = f"trial {self.trial.number}" if self.trial is not None else "the trial"
        if self.team.lead(f"reporting {trial}'s evaluation at {unit} {at}", decide):
            raise optuna.TrialPruned(f"{self.metric}={metrics.get(self.metric)} at {unit} {at}")


class Search:
    """One search: the recipe, the space, the study, and the trials run by this worker."""

    def __init__(self, recipe: str | Path, overrides: Sequence[str] = (), root: Optional[str | Path] = None,
                 worker: int = 0, echo: Callable[[str], None] = print):
        self.recipe, self.overrides = str(recipe), list(overrides)
        self.base = load_config(recipe, self.overrides)  # checks the search section too
        s: SearchConfig = self.base.search
        self.cfg = s
        self.leaves = leaf_types(Config)
        self.params = parse_space(s.space, self.leaves)
        self.objectives = resolve_objectives(self.base)
        self.directions = [direction(o) for o in self.objectives]
        self.pruner = pruner_name(self.base, self.objectives)
        self.budget = parse_duration(s.time_budget) if s.time_budget is not None else None
        self.root = Path(os.path.abspath(root or Path("runs/search") / self.base.task.name))
        self.storage_url = s.storage or f"sqlite:///{self.root / 'study.db'}"
        self.study_name = s.study_name or self.base.task.name
        self.worker, self.echo = worker, echo
        self.team = Team()
        self.has_teacher = bool(self.base.teacher.model) and not self.base.teacher.finetuned
        self.teacher_params = [p for p in self.params if p.key.startswith(TEACHER_PREFIXES) or p.key in TEACHER_EXACT]
        # with `teachers:`, each one not yet fine-tuned gets its shared stage <root>/teacher-<i>
        self.own_teachers = [i for i, t in enumerate(self.base.teachers) if not t.finetuned]
        if self.base.teachers and self.teacher_params:
            raise SearchError(
                f"search.space: {', '.join(p.key for p in self.teacher_params)} set the single `teacher:`, but "
                "this recipe lists `teachers:`; search the student and distillation keys, or one teacher at a time")
        self._storage: Any = None
        studies.make_sampler(s.sampler, s.sampler_options, 0)  # options that do not fit fail here, before any work
        studies.make_pruner(self.pruner, s.pruner_options)

    # --- configs -------------------------------------------------------------------------------
    def teacher_dir(self, params: Mapping[str, Any]) -> Path:
        """The shared teacher folder; one per value of the searched teacher keys."""
        if not self.teacher_params:
            return self.root / "teacher"
        name = "-".join(f"{p.key.split('.')[-1]}{value_text(params[p.key])}" for p in self.teacher_params)
        return self.root / "teacher" / re.sub(r"[^A-Za-z0-9._=-]+", "-", name).strip("-")

    def shared_overrides(self, params: Mapping[str, Any]) -> list[str]:
        """Folders every trial shares: the teacher and the caches of teacher outputs (and of
        augmented rows), unless the recipe names its own."""
        over = []
        if self.has_teacher:
            over.append(f"teacher.dir={self.teacher_dir(params)}")
        for key in sorted(k for k in self.leaves if k.endswith(".cache_dir")):
            section = key.split(".")[0]
            if getattr(getattr(self.base, section), "cache_dir") is None:
                name = "teacher_cache" if section == "distill" else f"{section}_cache"
                over.append(f"{key}={self.root / name}")
        return over

    def shared_teacher_dirs(self) -> dict[int, str]:
        """`teachers:` entries to fine-tune once for every trial -> their shared folder (an entry
        with its own `dir` keeps it)."""
        return {i: str(self.root / f"teacher-{i}") for i in self.own_teachers if not self.base.teachers[i].dir}

    def config_for(self, params: Mapping[str, Any], folder: str) -> Config:
        """The trial's config: recipe <- command line <- the trial's values <- its folders."""
        values = [f"{k}={value_text(v)}" for k, v in params.items()]
        try:
            cfg = load_config(self.recipe, [*self.overrides, *values, *self.shared_overrides(params),
                                            f"output_dir={self.root / folder}"])
        except ConfigError as err:
            raise TrialFailed(f"the trial's values {dict(params)} make an invalid recipe: {err}", str(err)) from None
        cfg.search = SearchConfig()  # not part of the trial's result, nor of its saved config
        for i, folder_of in self.shared_teacher_dirs().items():  # list entries: no dotted override reaches them
            cfg.teachers[i].dir = folder_of
        return cfg

    def teacher_config(self, params: Mapping[str, Any]) -> Config:
        """The base recipe with only the teacher-changing values of `params`."""
        return self.config_for({p.key: params[p.key] for p in self.teacher_params if p.key in params}, ".")

    def param_of(self, key: str) -> Optional[Param]:
        return next((p for p in self.params if p.key == key), None)

    def recipe_values(self, trial: Any) -> dict[str, Any]:
        """A trial's values as the recipe writes them."""
        out = {}
        for key, stored in trial.params.items():
            p = self.param_of(key)
            out[key] = p.value_of(stored) if p else stored
        return out

    # --- the study -----------------------------------------------------------------------------
    def storage(self) -> Any:
        if self._storage is None:
            self._storage = studies.make_storage(self.storage_url, self.cfg.heartbeat)
        return self._storage

    def study(self, create: bool = True) -> Any:
        return studies.open_study(self, self.storage(), create)

    # --- checks before any training ------------------------------------------------------------
    def preflight(self) -> None:
        """Every endpoint of the space makes a valid recipe, and the stages' inputs (data,
        tokenizers, model configs) check out for the base values and every model choice."""
        from distill.loop.preflight import preflight

        if not self.base.data.splits.validation and not self.base.data.validation_from_train:
            raise SearchError("a search scores trials on the validation split, and this recipe has none: set "
                              "data.splits.validation or data.validation_from_train")
        probes: list[dict[str, Any]] = [{}]
        for p in self.params:
            values = list(p.choices) if p.kind == "choice" else [p.low, p.high]
            if p.kind == "int":
                values = [int(v) for v in values]
            for value in values:
                try:
                    self.config_for({p.key: value}, "trial-preflight")
                except TrialFailed as err:
                    raise SearchError(f"search.space.{p.key}: the value {value!r} is not valid here: "
                                      f"{err.reason}") from None
                if p.kind == "choice" and p.key.startswith(("student.", "teacher.", "data.", "task.")):
                    probes.append({p.key: value})
        stages = ["teacher", "student"] if self.has_teacher else [*(f"teacher-{i}" for i in self.own_teachers), "student"]
        for probe in probes:
            cfg = self.config_for(probe, "trial-preflight")
            try:
                preflight(cfg, stages)
            except Exception as err:
                where = f" with {probe}" if probe else ""
                raise type(err)(f"search preflight{where}: {err}") from None

    # --- teachers ------------------------------------------------------------------------------
    def teacher_variants(self) -> Optional[list[dict[str, Any]]]:
        """The teacher settings to fine-tune before the trials; None when a searched teacher key
        is a range (each trial then fine-tunes its own, when it starts)."""
        if not self.has_teacher:
            return []
        if any(p.kind != "choice" for p in self.teacher_params):
            return None
        keys = [p.key for p in self.teacher_params]
        return [dict(zip(keys, combo)) for combo in itertools.product(*(p.choices for p in self.teacher_params))]

    def run_stage(self, cfg: Config, stage: str, on_evaluate: Optional[Callable] = None) -> dict:
        """`run_stage` on every process of the worker: an error inside it is the loop's to share."""
        from distill.loop.train import run_stage

        with self.team.together():
            return run_stage(cfg, stage, on_evaluate=on_evaluate)

    def ensure_teacher(self, params: Mapping[str, Any]) -> None:
        if not self.has_teacher:
            return
        if self.team.main:
            self.echo(f"[distill search] teacher -> {self.teacher_dir(params)}")
        self.run_stage(self.teacher_config(params), "teacher")

    def prepare(self) -> None:
        """Fine-tune the shared teacher(s) once, before any trial."""
        for variant in self.teacher_variants() or []:
            self.ensure_teacher(variant)
        if self.own_teachers:
            cfg = self.config_for({}, ".")
            for i in self.own_teachers:
                if self.team.main:
                    self.echo(f"[distill search] teachers[{i}] -> {cfg.teachers[i].dir}")
                self.run_stage(cfg, f"teacher-{i}")

    # --- trials --------------------------------------------------------------------------------
    def by_epoch(self) -> bool:
        return self.base.train.eval_steps == 0

    def order(self, trial: Any) -> dict[str, Any]:
        """Main process: the trial's values and folder (a retried trial keeps its folder)."""
        params = {p.key: p.suggest(trial) for p in self.params}
        folder = trial.user_attrs.get("folder") or f"trial-{trial.number}"
        trial.set_user_attr("folder", folder)
        trial.set_user_attr("process", studies.this_process(trial.number))
        trial.set_user_attr("worker", self.worker)
        resumed = folder != f"trial-{trial.number}"
        self.echo(f"[distill search] trial {trial.number}{f' (resumes {folder})' if resumed else ''}: "
                  + ", ".join(f"{k}={outputs.fmt(v)}" for k, v in params.items()))
        return {"params": params, "folder": folder}

    def run_trial(self, order: Mapping[str, Any], trial: Any = None) -> Optional[list[float]]:
        """Train the trial's student stage (every process), then measure its objectives (main)."""
        from distill.errors import NonFiniteLoss

        params, folder = order["params"], order["folder"]
        cfg = self.config_for(params, folder)
        if self.teacher_variants() is None:  # a teacher per sampled value, fine-tuned on first use
            self.ensure_teacher(params)
        callback = None
        if self.pruner != "none":
            callback = Pruning(trial, self.objectives[0], self.by_epoch(), self.team)
        try:
            results = self.run_stage(cfg, "student", on_evaluate=callback)
        except NonFiniteLoss as err:
            raise TrialFailed(str(err)) from None
        what = f"measuring trial {trial.number}" if trial is not None else "measuring the trial"
        return self.team.lead(what, lambda: self.measure(cfg, results, trial))

    def measure(self, cfg: Config, results: Mapping[str, Any], trial: Any) -> list[float]:
        """The objective values of a finished trial; its metrics go to the trial's attributes."""
        from distill.loop.plan import stage_dir

        validation = results.get("validation") or {}
        values = []
        model_dir = stage_dir(cfg, "student") / "model"
        for name in self.objectives:
            if name == "latency":
                timing = trial_latency(model_dir, self.cfg.latency)
                trial.set_user_attr("latency", timing)
                values.append(timing["median_ms"])
            elif name == "macs":
                values.append(trial_macs(model_dir, self.cfg.latency.batch, self.cfg.latency.seq))
            elif name == "parameters":
                values.append(float(results["info"]["parameters"]) / 1e6)
            else:
                if name not in validation:
                    raise SearchError(f"the trial's validation metrics {sorted(validation)} have no '{name}'")
                values.append(float(validation[name]))
        for split in ("validation", "test"):
            numbers = {k: float(v) for k, v in (results.get(split) or {}).items() if isinstance(v, (int, float))}
            trial.set_user_attr(split, numbers)
        return values

    def objective(self, trial: Any) -> list[float]:
        """Optuna's objective (main process): values -> order -> shared -> stage -> values."""
        import optuna

        try:
            order = self.team.lead(f"choosing trial {trial.number}", lambda: self.order(trial))
            started = time.monotonic()
            values = self.run_trial(order, trial)
            self.echo(f"[distill search] trial {trial.number} complete in {time.monotonic() - started:.0f} s: "
                      + ", ".join(f"{o}={v:.4g}" for o, v in zip(self.objectives, values or [])))
            return values  # type: ignore[return-value]
        except TrialFailed as err:
            trial.set_user_attr("error", str(err)[:2000])
            self.echo(f"[distill search] trial {trial.number} failed: {err}")
            raise
        except optuna.TrialPruned as err:
            self.echo(f"[distill search] trial {trial.number} pruned: {err}")
            # a pruned trial never resumes: free its checkpoints (config.yaml and log.jsonl stay)
            stage = self.root / trial.user_attrs.get("folder", f"trial-{trial.number}") / "student"
            for name in ("checkpoints", "best"):
                shutil.rmtree(stage / name, ignore_errors=True)
            raise
        except BaseException as err:  # noqa: BLE001 - a signal or crash: recorded for a retry
            raise _Stopped(trial.number, err) from err

    def follow(self) -> None:
        """A process other than the main one: run the trial the main process shares."""
        import optuna

        order = self.team.lead("choosing the next trial")
        try:
            self.run_trial(order, None)
        except (TrialFailed, optuna.TrialPruned):
            pass

    def used(self, trials: Sequence[Any]) -> int:
        """Trials spent from the budget: each trial folder once (a retry continues its folder)."""
        return len({t.user_attrs.get("folder", f"trial-{t.number}") for t in trials})

    def should_continue(self, study: Any, deadline: Optional[float], done: int, max_trials: Optional[int]) -> bool:
        from optuna.trial import TrialState

        if max_trials is not None and done >= max_trials:
            return False
        if deadline is not None and time.monotonic() >= deadline:
            self.echo("[distill search] time budget spent")
            return False
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return True
        return self.cfg.trials is None or self.used(trials) < self.cfg.trials

    def start(self) -> Any:
        """Main process: the study, opened and checked, with the search's inputs preflighted."""
        self.root.mkdir(parents=True, exist_ok=True)
        study = self.study()
        queued = studies.queue_recipe_setting(self, study)
        if queued:
            params, outside = queued
            self.echo("[distill search] trial 0 runs the recipe's own setting: "
                      + ", ".join(f"{k}={outputs.fmt(self.param_of(k).value_of(v))}" for k, v in params.items())
                      + (f" ({', '.join(outside)} outside the space: sampled)" if outside else ""))
        outputs.write_info(self, study)
        self.preflight()
        studies.fail_dead_trials(self, study, self.storage())
        return study

    def run(self, max_trials: Optional[int] = None) -> Any:
        """Fine-tune the teacher(s), then run trials until the budget is spent; returns the study
        (None on processes other than the main one)."""
        if self.cfg.trials is None and self.budget is None and max_trials is None:
            raise SearchError("the search has no end: set search.trials (e.g. 30) and/or search.time_budget (e.g. 2h)")
        study = None

        def start() -> None:
            nonlocal study
            study = self.start()

        done = 0
        try:
            self.team.lead("opening the study and checking the search", start)
            self.prepare()
            deadline = time.monotonic() + self.budget if self.budget else None
            while self.team.lead("choosing whether another trial runs",
                                 lambda: self.should_continue(study, deadline, done, max_trials)):
                if self.team.main:
                    try:
                        study.optimize(self.objective, n_trials=1, catch=(TrialFailed,))
                    except _Stopped as stopped:
                        studies.retry(study, stopped.number)
                        outputs.write_outputs(self, study, plots=False)
                        raise stopped.cause from None
                    outputs.write_outputs(self, study, plots=False)
                else:
                    self.follow()
                done += 1
        except BaseException as err:
            # the others, when they wait for the main process, hear of its error instead
            self.team.fail(f"running trials ({done} done by this worker)", err)
            raise
        if self.team.main:
            outputs.write_outputs(self, study, plots=True)
        return study


# --- model objectives ----------------------------------------------------------------------------
def trial_latency(model_dir: Path, settings: Any) -> dict[str, Any]:
    """Median forward latency (ms) of the saved encoder at the set batch and length, timed by the
    bench code (distill.latency.measure)."""
    import torch
    from transformers import AutoModel

    from distill.latency import measure

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(str(model_dir))
    timing = measure(model, settings.batch, settings.seq, warmup=settings.warmup, runs=settings.runs,
                     threads=settings.threads, device=device)
    del model
    return timing.as_dict()


def trial_macs(model_dir: Path, batch: int, seq: int) -> float:
    """The study's MAC count (GMACs) of the saved encoder at (batch, seq), from its config."""
    from transformers import AutoConfig

    from distill.bench.flops import count

    return count(AutoConfig.from_pretrained(str(model_dir)), batch=batch, seq=seq).macs / 1e9
