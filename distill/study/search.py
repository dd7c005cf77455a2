"""`distill search`: an Optuna study over recipe keys, in which every trial is an ordinary stage.

    distill search recipes/pawsx.yaml search.trials=30 --root runs/search/pawsx
    ... --dry-run            check the search section, print the space and the study's state
    ... --workers 4          write commands.sh and slurm/ for 4 workers sharing one study
    ... --summarize          only (re)write the table, best recipe(s) and plots from the storage

The recipe's `search:` section (distill.config.SearchConfig; docs/search.md) names the space
(recipe key -> a float/int range or a list of choices), the objectives (task metrics from the
validation split, and optionally `latency`, `macs` or `parameters`, all minimised), a trial
count and/or a time budget, the sampler (TPE by default) and the pruner (Hyperband by default
for one objective), fed by the validation metric the loop computes at every evaluation.

Layout of the search folder (--root):
    study.db                the Optuna storage (unless search.storage names a database URL)
    teacher/                the fine-tuned teacher, trained once and shared by every trial
                            (one sub-folder per value when the space searches teacher keys)
    teacher_cache/          the teacher's cached outputs, shared the same way
    trial-<n>/student/      trial n: an ordinary stage folder (config.yaml, metrics.json, ...)
    trials.md, trials.csv   one row per trial: state, parameters, values, duration
    best.yaml | pareto/     the best trial's recipe (or each Pareto-optimal one), runnable
    plots/                  optimisation history, parameter importances, Pareto front
    search.json             what the search is, its state, the best trial(s), importances

Because a trial is a stage folder, a completed trial is never run again; a search stopped by a
signal records its trial for a retry that resumes from that trial's checkpoint; a worker killed
outright is detected by its heartbeat (or, on the same machine, by its missing process) and its
trial is retried the same way. Several workers (processes, machines) share one study through
the storage. Under `accelerate launch`, the main process talks to the study and the others
follow what it broadcasts, so a trial can itself run on several devices.

One concern over ~500 lines: the study's life (trials as stages, resume, retries of dead
trials, workers sharing one storage, outputs); the section's grammar lives in
distill/search_space.py.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import io
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from distill.config import Config, ConfigError, SearchConfig, load_config
from distill.config.search_space import (  # the section's grammar, shared with the config's checks
    MODEL_OBJECTIVES,
    SAMPLERS,
    TEACHER_PREFIXES,
    TEACHER_EXACT,
    STATES,
    MAX_RETRIES,
    SearchError,
    leaf_types,
    parse_duration,
    Param,
    parse_space as _parse_space,
    resolve_objectives,
    direction,
    pruner_name,
    check_section as _check_section,
    value_text,
)

def parse_space(space: Mapping[str, Any], prefix: str = "", leaves: Optional[Mapping[str, Any]] = None) -> list[Param]:
    """The search space, checked against the recipe schema's keys."""
    return _parse_space(space, prefix, leaf_types(Config) if leaves is None else leaves)


def check_section(cfg: Config) -> None:
    """Every check of the search section that needs neither data nor models."""
    _check_section(cfg, leaf_types(Config))


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


def make_sampler(name: str, options: Mapping[str, Any], seed: int) -> Any:
    import optuna

    cls = getattr(optuna.samplers, SAMPLERS[name])
    kwargs = dict(options)
    if "seed" in inspect.signature(cls).parameters:
        kwargs.setdefault("seed", seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**kwargs)
    except TypeError as err:
        raise SearchError(f"search.sampler_options {dict(options)} do not fit {cls.__name__}: {err}") from None


def make_pruner(name: str, options: Mapping[str, Any]) -> Any:
    import optuna

    if name == "none":
        if options:
            raise SearchError("search.pruner_options are set but search.pruner=none")
        return optuna.pruners.NopPruner()
    cls = optuna.pruners.HyperbandPruner if name == "hyperband" else optuna.pruners.MedianPruner
    try:
        return cls(**dict(options))
    except (TypeError, ValueError) as err:
        raise SearchError(f"search.pruner_options {dict(options)} do not fit {cls.__name__}: {err}") from None


# --- one process or several (accelerate launch) ---------------------------------------------------
class Team:
    """The processes of one worker: the main one talks to the study, the others follow what it
    shares (a single process shares with nobody)."""

    def __init__(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # as Accelerator() reads it: processes started on CPU (torchrun, accelerate launch --cpu)
            state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
            self.size, self.main = state.num_processes, state.is_main_process
        else:
            self.size, self.main = 1, True

    def share(self, obj: Any = None) -> Any:
        """The main process's `obj`, on every process."""
        if self.size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]


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
        prune = False
        if self.team.main:
            if self.metric not in metrics:
                raise SearchError(f"the validation metrics {sorted(metrics)} have no '{self.metric}' to prune on")
            if at not in self.reported:  # the loop's last evaluation can repeat an epoch
                self.reported.add(at)
                self.trial.report(float(metrics[self.metric]), step=at)
                prune = self.trial.should_prune()
        if self.team.share(prune):
            raise optuna.TrialPruned(f"{self.metric}={metrics.get(self.metric)} at {'epoch' if self.by_epoch else 'step'} {at}")


def default_runner(cfg: Config, stage: str, on_evaluate: Optional[Callable] = None) -> dict:
    """distill.loop.train.run_stage, with the pruning callback when this build's loop takes one."""
    from distill.loop.train import run_stage

    if on_evaluate is not None and "on_evaluate" in inspect.signature(run_stage).parameters:
        return run_stage(cfg, stage, on_evaluate=on_evaluate)
    return run_stage(cfg, stage)


def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _file_lock(db: Optional[Path]) -> Iterator[None]:
    """An exclusive lock beside a SQLite file (POSIX flock); nothing for other storages."""
    if db is None:
        yield
        return
    import fcntl

    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


# --- the search ----------------------------------------------------------------------------------
class Search:
    """One search: the recipe, the space, the study, and the trials run by this worker."""

    def __init__(self, recipe: str, overrides: Sequence[str] = (), root: Optional[str | Path] = None,
                 runner: Optional[Callable[..., dict]] = None, worker: int = 0, echo: Callable[[str], None] = print):
        self.recipe, self.overrides = str(recipe), list(overrides)
        self.base = load_config(recipe, self.overrides)  # checks the search section too
        s: SearchConfig = self.base.search
        self.cfg = s
        self.leaves = leaf_types(Config)
        self.params = parse_space(s.space, leaves=self.leaves)
        self.objectives = resolve_objectives(self.base)
        self.directions = [direction(o) for o in self.objectives]
        self.pruner = pruner_name(self.base, self.objectives)
        self.budget = parse_duration(s.time_budget) if s.time_budget is not None else None
        self.root = Path(os.path.abspath(root or Path("runs/search") / self.base.task.name))
        self.storage_url = s.storage or f"sqlite:///{self.root / 'study.db'}"
        self.study_name = s.study_name or self.base.task.name
        self.runner = runner or default_runner
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
        make_sampler(s.sampler, s.sampler_options, 0)  # options that do not fit fail here, before any work
        make_pruner(self.pruner, s.pruner_options)

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

    def shared_teacher_dirs(self) -> dict[int, str]:
        """`teachers:` entries to fine-tune once for every trial -> their shared folder (an entry
        with its own `dir` keeps it)."""
        return {i: str(self.root / f"teacher-{i}") for i in self.own_teachers if not self.base.teachers[i].dir}

    def teacher_config(self, params: Mapping[str, Any]) -> Config:
        """The base recipe with only the teacher-changing values of `params`."""
        return self.config_for({p.key: params[p.key] for p in self.teacher_params if p.key in params}, ".")

    def recipe_text(self, params: Mapping[str, Any], header: str) -> str:
        """The user's recipe (interpolations kept) with the command line and `params` applied,
        pointing at the search's teacher and caches, without the search section."""
        from omegaconf import OmegaConf

        node = OmegaConf.load(self.recipe)
        plain = [o for o in self.overrides if not o.startswith("search.")]
        if plain:
            node = OmegaConf.merge(node, OmegaConf.from_dotlist(plain))
        for item in self.shared_overrides(params):
            key, value = item.split("=", 1)
            OmegaConf.update(node, key, value, merge=False)
        for key, value in params.items():
            OmegaConf.update(node, key, value, merge=False)
        for i, folder in self.shared_teacher_dirs().items():
            OmegaConf.update(node, f"teachers.{i}.dir", folder, merge=False)
        if "search" in node:
            node.pop("search")
        return header + OmegaConf.to_yaml(node)

    # --- the study -----------------------------------------------------------------------------
    def storage(self) -> Any:
        if self._storage is None:
            import optuna

            kwargs: dict[str, Any] = {}
            if self._sqlite_path():
                self._sqlite_path().parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
                # several workers on one file: wait for the lock instead of failing at once
                kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
            else:
                kwargs["engine_kwargs"] = {"pool_pre_ping": True}
            # a trial whose worker went silent is queued again (at most MAX_RETRIES times)
            names = inspect.signature(optuna.storages.RDBStorage).parameters
            hook = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in names else "failed_trial_callback"
            kwargs[hook] = lambda study, trial: requeue(study, trial, MAX_RETRIES)

            def connect() -> Any:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        self.storage_url, heartbeat_interval=self.cfg.heartbeat,
                        grace_period=2 * self.cfg.heartbeat, **kwargs)

            # Workers starting together would each create the tables of a new database, and all
            # but one fail on the schema's version stamp: on a SQLite file they take turns under
            # a file lock; on a server, a worker that loses the race retries once the tables exist.
            from sqlalchemy.exc import SQLAlchemyError

            for attempt in range(5):
                try:
                    with _file_lock(self._sqlite_path()):
                        self._storage = connect()
                    break
                except SQLAlchemyError:
                    if attempt == 4:
                        raise
                    time.sleep(1.0 + attempt)
        return self._storage

    def _sqlite_path(self) -> Optional[Path]:
        if self.storage_url.startswith("sqlite:///") and ":memory:" not in self.storage_url:
            return Path(self.storage_url[len("sqlite:///"):])
        return None

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same study: the recipe and command line, less the searched
        keys, the search section and the folders."""
        from distill.config import to_dict

        view = to_dict(self.base)
        for key in ("search", "tracking", "hub", "output_dir", "overwrite", "checkpoint"):
            view.pop(key, None)
        for p in self.params:  # a searched key's recipe value never reaches a trial
            *path, last = p.key.split(".")
            node: Any = view
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(last, None)
        return json.loads(json.dumps(view, default=str))

    def study(self, create: bool = True) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial is reported here instead
        if not create:
            try:
                return optuna.load_study(study_name=self.study_name, storage=self.storage())
            except KeyError:
                raise SearchError(f"no study '{self.study_name}' in {_redact(self.storage_url)} yet") from None
        pruner = make_pruner(self.pruner, self.cfg.pruner_options)
        sampler = make_sampler(self.cfg.sampler, self.cfg.sampler_options, 0)  # checks the options early
        study = optuna.create_study(storage=self.storage(), study_name=self.study_name, load_if_exists=True,
                                    sampler=sampler, pruner=pruner, directions=self.directions)
        # Workers, and a resumed run, must not replay one random sequence (the same first points
        # again): the seed moves with the worker index and the trials the study already holds.
        seed = (self.cfg.seed if self.cfg.seed is not None else self.base.seed) + 7919 * self.worker
        study.sampler = make_sampler(self.cfg.sampler, self.cfg.sampler_options, seed + len(study.get_trials(deepcopy=False)))
        stored = [d.name.lower() for d in study.directions]
        if stored != self.directions:
            raise SearchError(
                f"study '{self.study_name}' in {_redact(self.storage_url)} optimises {stored}, but "
                f"search.objectives={self.objectives} asks for {self.directions}; use another --root, "
                "search.storage or search.study_name"
            )
        attrs = study.user_attrs
        mine = self.identity()
        if "recipe" not in attrs:
            study.set_user_attr("recipe", mine)
            study.set_user_attr("objectives", self.objectives)
        elif attrs["recipe"] != mine:
            diff = sorted(_diff_keys(attrs["recipe"], mine))
            raise SearchError(
                f"study '{self.study_name}' in {_redact(self.storage_url)} was started with another recipe "
                f"(differs in {', '.join(diff[:6])}); use another --root, search.storage or search.study_name"
            )
        elif attrs.get("objectives") != self.objectives:
            raise SearchError(f"study '{self.study_name}' was started with objectives {attrs.get('objectives')}, "
                              f"not {self.objectives}; use another --root or search.study_name")
        return study

    def recipe_setting(self) -> tuple[dict[str, Any], list[str]]:
        """The recipe's own values of the searched keys, as Optuna stores them, and the keys whose
        value lies outside the space (the sampler picks those)."""
        from omegaconf import OmegaConf

        recipe = OmegaConf.structured(self.base)
        params, outside = {}, []
        for p in self.params:
            stored = p.stored_of(OmegaConf.select(recipe, p.key))
            if stored is None:
                outside.append(p.key)
            else:
                params[p.key] = stored
        return params, outside

    def queue_recipe_setting(self, study: Any) -> None:
        """search.start_from_recipe: a new study's first trial is the recipe as written, once for
        all workers (the flag is set under the storage's lock)."""
        if not self.cfg.start_from_recipe:
            return
        with _file_lock(self._sqlite_path()):
            if study.user_attrs.get("recipe_setting_queued") or study.get_trials(deepcopy=False):
                return
            params, outside = self.recipe_setting()
            if params:
                study.enqueue_trial(params, user_attrs={"recipe_setting": True})
                self.echo("[distill search] trial 0 runs the recipe's own setting: "
                          + ", ".join(f"{k}={_fmt(self.param_of(k).value_of(v))}" for k, v in params.items())
                          + (f" ({', '.join(outside)} outside the space: sampled)" if outside else ""))
            study.set_user_attr("recipe_setting_queued", True)

    def recipe_trial(self, study: Any) -> Optional[Any]:
        """The finished trial that ran the recipe's own setting, if any."""
        from optuna.trial import TrialState

        return next((t for t in study.get_trials(deepcopy=False)
                     if t.user_attrs.get("recipe_setting") and t.state == TrialState.COMPLETE), None)

    # --- checks before any training ------------------------------------------------------------
    def preflight(self) -> None:
        """Every endpoint of the space makes a valid recipe, and the stages' inputs (data,
        tokenizers, model configs) check out for the base values and every model choice."""
        from distill.loop.setup import preflight

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

    def ensure_teacher(self, params: Mapping[str, Any]) -> None:
        if not self.has_teacher:
            return
        cfg = self.teacher_config(params)
        if self.team.main:
            self.echo(f"[distill search] teacher -> {self.teacher_dir(params)}")
        self.runner(cfg, "teacher")

    def prepare(self) -> None:
        """Fine-tune the shared teacher(s) once, before any trial."""
        for variant in self.teacher_variants() or []:
            self.ensure_teacher(variant)
        if self.own_teachers:
            cfg = self.config_for({}, ".")
            for i in self.own_teachers:
                if self.team.main:
                    self.echo(f"[distill search] teachers[{i}] -> {cfg.teachers[i].dir}")
                self.runner(cfg, f"teacher-{i}")

    # --- trials --------------------------------------------------------------------------------
    def _by_epoch(self) -> bool:
        return self.base.train.eval_steps == 0

    def run_trial(self, order: Mapping[str, Any], trial: Any = None) -> Optional[list[float]]:
        """Train the trial's student stage (every process), then measure its objectives (main)."""
        params, folder = order["params"], order["folder"]
        cfg = self.config_for(params, folder)
        if self.teacher_variants() is None:  # a teacher per sampled value, fine-tuned on first use
            self.ensure_teacher(params)
        callback = None
        if self.pruner != "none":
            callback = Pruning(trial, self.objectives[0], self._by_epoch(), self.team)
        from distill.errors import NonFiniteLoss

        try:
            results = self.runner(cfg, "student", on_evaluate=callback)
        except NonFiniteLoss as err:
            raise TrialFailed(str(err)) from None
        if not self.team.main:
            return None
        return self.measure(cfg, results, trial)

    def measure(self, cfg: Config, results: Mapping[str, Any], trial: Any) -> list[float]:
        """The objective values of a finished trial; its metrics go to the trial's attributes."""
        from distill.loop.folders import stage_dir

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
            params = {p.key: p.suggest(trial) for p in self.params}
            folder = trial.user_attrs.get("folder") or f"trial-{trial.number}"
            trial.set_user_attr("folder", folder)
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("worker", self.worker)
            resumed = folder != f"trial-{trial.number}"
            self.echo(f"[distill search] trial {trial.number}{f' (resumes {folder})' if resumed else ''}: "
                      + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
            order = self.team.share({"params": params, "folder": folder})
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
        """A non-main process: run the trial the main process shares."""
        import optuna

        order = self.team.share(None)
        try:
            self.run_trial(order, None)
        except (TrialFailed, optuna.TrialPruned):
            pass

    def retry(self, study: Any, number: int) -> None:
        """Queue a stopped trial again with its values and folder (its checkpoint resumes)."""
        requeue(study, next(t for t in study.get_trials(deepcopy=False) if t.number == number))

    def fail_dead_trials(self, study: Any) -> None:
        """Trials left running by a process that is gone: on this machine, a missing process
        says so at once; elsewhere the heartbeat says so after 2 x search.heartbeat seconds."""
        import optuna
        from optuna.trial import TrialState

        storage = self.storage()
        host = socket.gethostname()
        study_id = storage.get_study_id_from_name(self.study_name)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("host") == host and "pid" in t.user_attrs and not _pid_alive(int(t.user_attrs["pid"])):
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
                if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    self.echo(f"[distill search] trial {t.number} was left running by a stopped process: retrying it")
                    self.retry(study, t.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)

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

    def run(self, max_trials: Optional[int] = None) -> Any:
        """Fine-tune the teacher(s), then run trials until the budget is spent; returns the study
        (None on non-main processes)."""
        if self.cfg.trials is None and self.budget is None and max_trials is None:
            raise SearchError("the search has no end: set search.trials (e.g. 30) and/or search.time_budget (e.g. 2h)")
        study, error = None, None
        if self.team.main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                study = self.study()
                self.queue_recipe_setting(study)
                self.write_info(study)
                self.preflight()
                self.fail_dead_trials(study)
            except Exception as err:  # every process must hear of it, or the others would wait forever
                error = err
        if not self.team.share(error is None):
            if error is not None:
                raise error
            raise SearchError("stopped: the main process found a problem (see its message)")
        self.prepare()
        deadline = time.monotonic() + self.budget if self.budget else None
        done = 0
        while self.team.share(self.should_continue(study, deadline, done, max_trials) if self.team.main else None):
            if self.team.main:
                try:
                    study.optimize(self.objective, n_trials=1, catch=(TrialFailed,))
                except _Stopped as stopped:
                    self.retry(study, stopped.number)
                    self.write_outputs(study, plots=False)
                    raise stopped.cause from None
                self.write_outputs(study, plots=False)
            else:
                self.follow()
            done += 1
        if self.team.main:
            self.write_outputs(study, plots=True)
        return study

    # --- outputs -------------------------------------------------------------------------------
    def param_of(self, key: str) -> Optional[Param]:
        return next((p for p in self.params if p.key == key), None)

    def recipe_values(self, trial: Any) -> dict[str, Any]:
        out = {}
        for key, stored in trial.params.items():
            p = self.param_of(key)
            out[key] = p.value_of(stored) if p else stored
        return out

    def best_trials(self, study: Any) -> list[Any]:
        from optuna.trial import TrialState

        if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            return []
        if len(self.objectives) == 1:
            return [study.best_trial]
        return sorted(study.best_trials, key=lambda t: t.number)

    def rows(self, study: Any) -> list[dict[str, Any]]:
        best = {t.number for t in self.best_trials(study)}
        mark = "best" if len(self.objectives) == 1 else "pareto"
        keys = [p.key for p in self.params]
        rows = []
        trials = study.get_trials(deepcopy=False)
        folder_of = {t.number: t.user_attrs.get("folder", f"trial-{t.number}") for t in trials}
        for t in trials:
            state = t.state.name.lower()
            note = t.user_attrs.get("error", "")
            if state == "fail" and not note:
                later = [u.number for u in trials if u.number > t.number and folder_of[u.number] == folder_of[t.number]]
                note = f"stopped (signal or crash); continued by trial {later[0]}" if later else "stopped (signal or crash)"
            if state == "pruned" and t.intermediate_values:
                step = max(t.intermediate_values)
                note = f"at {'epoch' if self._by_epoch() else 'step'} {step}: {self.objectives[0]} {t.intermediate_values[step]:.4g}"
            if t.user_attrs.get("recipe_setting"):
                note = "the recipe's own setting" + ("; " + note if note else "")
            if t.user_attrs.get("folder", f"trial-{t.number}") != f"trial-{t.number}":
                note = (note + "; " if note else "") + f"continues {t.user_attrs['folder']}"
            values = dict(zip(self.objectives, t.values or []))
            duration = t.duration.total_seconds() if t.duration else None
            row = {"trial": t.number, "state": state + (f" ({mark})" if t.number in best else ""),
                   "folder": t.user_attrs.get("folder", f"trial-{t.number}")}
            values_of = self.recipe_values(t)
            row.update({k: values_of.get(k) for k in keys})
            row.update({f"{o} ({MODEL_OBJECTIVES.get(o, 'validation')})": values.get(o) for o in self.objectives})
            row["duration (s)"] = None if duration is None else round(duration, 1)
            row["note"] = note
            rows.append(row)
        return rows

    def table(self, study: Any) -> str:
        rows = self.rows(study)
        head = ["trial", "state", *[p.key for p in self.params],
                *[f"{o} ({MODEL_OBJECTIVES.get(o, 'validation')})" for o in self.objectives], "duration (s)", "note"]
        lines = [f"# Search `{self.study_name}`: {len(rows)} trials",
                 "",
                 f"Objectives: {', '.join(f'{o} ({d})' for o, d in zip(self.objectives, self.directions))}; "
                 f"sampler {self.cfg.sampler}, pruner {self.pruner}; storage {_redact(self.storage_url)}.",
                 "", *self.gain_lines(study),
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            lines.append("| " + " | ".join(_fmt(row.get(h)).replace("|", "\\|") for h in head) + " |")
        return "\n".join(lines) + "\n"

    def gain(self, study: Any) -> Optional[dict[str, Any]]:
        """The recipe's own setting against the best trial (validation), one objective."""
        own, best = self.recipe_trial(study), self.best_trials(study)
        if own is None or not best or len(self.objectives) != 1:
            return None
        top = best[0]
        return {"recipe_trial": own.number, "recipe_value": own.values[0], "best_trial": top.number,
                "best_value": top.values[0], "gain": top.values[0] - own.values[0]}

    def gain_lines(self, study: Any) -> list[str]:
        g = self.gain(study)
        if g is None:
            return []
        o = self.objectives[0]
        if g["best_trial"] == g["recipe_trial"]:
            return [f"The recipe's own setting (trial {g['recipe_trial']}) is still the best: {o} "
                    f"{g['recipe_value']:.4g} on validation.", ""]
        return [f"The recipe's own setting (trial {g['recipe_trial']}): {o} {g['recipe_value']:.4g} on validation; "
                f"the best (trial {g['best_trial']}): {g['best_value']:.4g} ({g['gain']:+.4g}).", ""]

    def write_info(self, study: Any, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        info = {
            "kind": "distill-search",
            "study_name": self.study_name,
            "storage": _redact(self.storage_url),
            "recipe": os.path.abspath(self.recipe),
            "overrides": self.overrides,
            "objectives": self.objectives,
            "directions": self.directions,
            "sampler": self.cfg.sampler,
            "pruner": self.pruner,
            "space": {p.key: p.describe() for p in self.params},
            "trials_wanted": self.cfg.trials,
            "states": {s: sum(t.state == getattr(TrialState, s.upper()) for t in trials) for s in STATES},
            "best": [
                {"trial": t.number, "folder": t.user_attrs.get("folder"), "params": self.recipe_values(t),
                 "values": dict(zip(self.objectives, t.values)),
                 "recipe": "best.yaml" if len(self.objectives) == 1 else f"pareto/trial-{t.number}.yaml"}
                for t in self.best_trials(study)
            ],
            "recipe_setting": self.gain(study),
            **(extra or {}),
        }
        _atomic_write(self.root / "search.json", json.dumps(info, indent=2, default=str))
        return info

    def write_outputs(self, study: Any, plots: bool = True) -> dict[str, Any]:
        """trials.md/.csv, the best recipe(s), search.json and (with plots) the PNG figures."""
        _atomic_write(self.root / "trials.md", self.table(study))
        rows = self.rows(study)
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        _atomic_write(self.root / "trials.csv", buffer.getvalue())
        best = self.best_trials(study)
        for t in best:
            values = ", ".join(f"{o}={v:.4g}" for o, v in zip(self.objectives, t.values))
            name = "best.yaml" if len(self.objectives) == 1 else f"pareto/trial-{t.number}.yaml"
            header = (f"# distill search '{self.study_name}': trial {t.number} ({t.user_attrs.get('folder')}), "
                      f"{'best' if len(best) == 1 and len(self.objectives) == 1 else 'Pareto-optimal'}: {values} "
                      f"(validation)\n# run it: distill run {self.root / name}\n")
            _atomic_write(self.root / name, self.recipe_text(self.recipe_values(t), header))
        if len(self.objectives) > 1 and (self.root / "pareto").is_dir():
            keep = {f"trial-{t.number}.yaml" for t in best}
            for old in (self.root / "pareto").glob("trial-*.yaml"):
                if old.name not in keep:  # a trial that a later one dominates
                    old.unlink()
        extra: dict[str, Any] = {}
        if plots:
            extra["plots"] = self.plot(study)
            extra["importances"] = self.importances(study)
        return self.write_info(study, extra)

    def _targets(self) -> list[tuple[str, Optional[Callable]]]:
        if len(self.objectives) == 1:
            return [(self.objectives[0], None)]
        return [(o, (lambda t, i=i: t.values[i])) for i, o in enumerate(self.objectives)]

    def _importance_problem(self, study: Any) -> Optional[str]:
        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(complete) < 2:
            return f"needs 2 complete trials, the study has {len(complete)}"
        varying = [k for k in {k for t in complete for k in t.params}
                   if len({json.dumps(t.params.get(k), default=str) for t in complete}) > 1]
        if not varying:
            return "no searched parameter varies across the complete trials"
        return None

    def importances(self, study: Any) -> dict[str, Any]:
        """Each parameter's share of the objective's variance (fANOVA when scikit-learn is
        installed, PED-ANOVA otherwise), per objective."""
        import optuna

        problem = self._importance_problem(study)
        if problem:
            return {"skipped": problem}
        out: dict[str, Any] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator, name = _importance_evaluator()
            out["evaluator"] = name
            for objective, target in self._targets():
                try:
                    out[objective] = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
                except (ValueError, RuntimeError) as err:
                    out[objective] = {"skipped": str(err)}
        return out

    def plot(self, study: Any) -> dict[str, str]:
        """PNG figures via Optuna's matplotlib visualisations; a figure that cannot be drawn is
        listed with the reason."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from optuna.visualization import matplotlib as vis
        except ImportError as err:
            return {"all": f"skipped: matplotlib is not installed ({err}); pip install matplotlib"}
        folder = self.root / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        done: dict[str, str] = {}
        multi = len(self.objectives) > 1

        def save(name: str, draw: Callable[[], Any]) -> None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ax = draw()
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                fig.savefig(folder / name, dpi=110)
                done[name] = str(folder / name)
            except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as err:
                done[name] = f"skipped: {err}"
            finally:
                plt.close("all")

        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        for objective, target in self._targets():
            suffix = f"-{objective}" if multi else ""
            if complete:
                save(f"history{suffix}.png", lambda: vis.plot_optimization_history(study, target=target, target_name=objective))
            else:
                done[f"history{suffix}.png"] = "skipped: no complete trial yet"
            problem = self._importance_problem(study)
            if problem:
                done[f"importances{suffix}.png"] = f"skipped: {problem}"
            else:
                evaluator, _ = _importance_evaluator()
                save(f"importances{suffix}.png", lambda: vis.plot_param_importances(
                    study, evaluator=evaluator, target=target, target_name=objective))
        if multi:
            if len(self.objectives) > 3:
                done["pareto.png"] = "skipped: a Pareto plot shows 2 or 3 objectives"
            elif not complete:
                done["pareto.png"] = "skipped: no complete trial yet"
            else:
                save("pareto.png", lambda: vis.plot_pareto_front(study, target_names=self.objectives))
        return done


def requeue(study: Any, trial: Any, max_retries: Optional[int] = None) -> None:
    """Add a waiting copy of a failed trial: the same values, folder and reported evaluations, so
    the next worker to ask for a trial continues it in its folder (from its checkpoint)."""
    import optuna

    retries = int(trial.user_attrs.get("retries", 0))
    if max_retries is not None and retries >= max_retries:
        return
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("error", "host", "pid", "worker")}
    attrs.setdefault("folder", f"trial-{trial.number}")
    attrs["retries"] = retries + 1
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=attrs, intermediate_values=trial.intermediate_values))


def _importance_evaluator() -> tuple[Any, str]:
    import optuna

    try:
        import sklearn  # noqa: F401

        return optuna.importance.FanovaImportanceEvaluator(seed=0), "fanova"
    except ImportError:
        return optuna.importance.PedAnovaImportanceEvaluator(), "ped-anova"


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


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


# --- reading a search folder (distill report) ----------------------------------------------------
def is_search_folder(path: str | Path) -> bool:
    info = Path(path) / "search.json"
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("kind") == "distill-search"
    except (OSError, ValueError):
        return False


def search_report(path: str | Path) -> str:
    """The trials table and best trial(s) of a search folder, from its files alone."""
    root = Path(path)
    info = json.loads((root / "search.json").read_text())
    table = (root / "trials.md").read_text() if (root / "trials.md").is_file() else "(no trials table yet)\n"
    lines = [table.rstrip(), ""]
    states = ", ".join(f"{n} {s}" for s, n in info.get("states", {}).items() if n)
    lines.append(f"States: {states or 'no trials yet'}.")
    for best in info.get("best", []):
        values = ", ".join(f"{k}={v:.4g}" for k, v in best["values"].items())
        lines.append(f"Best: trial {best['trial']} ({values}) -> {root / best['recipe']}")
    for objective, shares in (info.get("importances") or {}).items():
        if isinstance(shares, dict) and shares and all(isinstance(v, (int, float)) for v in shares.values()):
            lines.append(f"Importances ({objective}): " + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()))
    return "\n".join(lines) + "\n"


# --- launch scripts for several workers ----------------------------------------------------------
def worker_command(launcher: str, recipe: str, overrides: Sequence[str], root: Path, extra: str = "") -> str:
    args = " ".join(shlex.quote(x) for x in [recipe, *overrides, "--root", str(root)])
    return f"{launcher} search {args}{extra}"


def launch_files(search: Search, workers: int, launcher: str, options: Sequence[str]) -> dict[str, str]:
    """commands.sh (one machine: the teacher, then N workers in the background) and slurm/
    (a teacher job, an array of N workers after it, a summary job after them; submit.sh)."""
    from distill.study.slurm import SLURM_RUN_STEP, sbatch_header

    cwd = shlex.quote(os.getcwd())
    root = search.root
    base = [search.recipe, *search.overrides]
    prepare = worker_command(launcher, search.recipe, search.overrides, root, " --prepare")
    summary = " ".join(shlex.quote(a) for a in ["python", "-m", "distill", "search", *base, "--root", str(root),
                                                  "--summarize"])
    files: dict[str, str] = {}
    lines = ["#!/usr/bin/env bash",
             f"# distill search '{search.study_name}': the teacher once, then {workers} workers sharing "
             f"{_redact(search.storage_url)}.",
             "# Each worker runs trials until the study holds search.trials of them (or its time budget ends);",
             "# on a machine with several GPUs give each worker its own: CUDA_VISIBLE_DEVICES is set per line.",
             "set -euo pipefail", f"cd {cwd}", prepare, "pids=()"]
    for i in range(workers):
        lines.append(f"CUDA_VISIBLE_DEVICES=${{GPUS[{i}]:-{i}}} "
                     + worker_command(launcher, search.recipe, search.overrides, root, f" --worker {i}") + " & pids+=($!)")
    lines += ['status=0; for pid in "${pids[@]}"; do wait "$pid" || status=$?; done', summary, 'exit "$status"', ""]
    files["commands.sh"] = "\n".join(lines)
    logs = Path(os.path.abspath(root / "slurm" / "logs"))
    slurm = root / "slurm"
    name = re.sub(r"\W", "-", search.study_name)
    teacher = sbatch_header(f"distill-search-{name}-teacher", logs, options)
    teacher += ["set -uo pipefail", f"cd {cwd}", 'REQUEUE_ID="$SLURM_JOB_ID"', SLURM_RUN_STEP, f"run_step {prepare}", ""]
    workers_job = sbatch_header(f"distill-search-{name}", logs, options, array=workers)
    workers_job += ["set -uo pipefail", f"cd {cwd}", 'REQUEUE_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
                    SLURM_RUN_STEP,
                    "run_step " + worker_command(launcher, search.recipe, search.overrides, root,
                                                 ' --worker "$SLURM_ARRAY_TASK_ID"'), ""]
    cpu_options = [o for o in options if not re.match(r"(gres|gpus|gpus-per-\w+|gpu\w*)\b", o)]
    summary_job = sbatch_header(f"distill-search-{name}-summary", logs, cpu_options)
    summary_job += ["set -euo pipefail", f"cd {cwd}", summary, ""]
    files["slurm/teacher.sbatch"] = "\n".join(teacher)
    files["slurm/workers.sbatch"] = "\n".join(workers_job)
    files["slurm/summary.sbatch"] = "\n".join(summary_job)
    files["slurm/submit.sh"] = "\n".join([
        "#!/bin/bash", "# Submit the search: the teacher, then the workers, then the summary.", "set -euo pipefail",
        f"cd {cwd}", f"mkdir -p {shlex.quote(str(logs))}",
        f"t=$(sbatch --parsable {shlex.quote(str(slurm / 'teacher.sbatch'))}); t=${{t%%;*}}",
        f"w=$(sbatch --parsable --dependency=afterok:$t {shlex.quote(str(slurm / 'workers.sbatch'))}); w=${{w%%;*}}",
        f"sbatch --dependency=afterany:$w {shlex.quote(str(slurm / 'summary.sbatch'))}", ""])
    return files


# --- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill search",
        description="Search recipe keys with Optuna (the recipe's `search:` section): every trial is an ordinary "
        "stage in <root>/trial-<n>/, the teacher is fine-tuned once and shared, pruning follows the validation "
        "metric, and a stopped search resumes from its storage. Writes trials.md, best.yaml (or pareto/) and "
        "plots/ in the search folder.",
        epilog="example: distill search recipes/pawsx.yaml search.trials=30 --root runs/search/pawsx",
    )
    p.add_argument("recipe", help="recipe YAML file with a search: section")
    p.add_argument("overrides", nargs="*", help="key=value overrides (search.trials=50, search.storage=URL, ...)")
    p.add_argument("--root", default=None, help="the search folder (default runs/search/<task.name>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="check everything, print the space and the study's "
                      "state; train nothing")
    mode.add_argument("--workers", type=int, default=None, metavar="N",
                      help="write commands.sh and slurm/ for N workers sharing the study, instead of running")
    mode.add_argument("--prepare", action="store_true", help="only fine-tune the shared teacher(s)")
    mode.add_argument("--summarize", action="store_true", help="only write the outputs from the storage")
    p.add_argument("--worker", type=int, default=0, help="this worker's index (seeds its sampler apart)")
    p.add_argument("--max-trials", type=int, default=None, metavar="K", help="run at most K trials in this process")
    p.add_argument("--launcher", default="accelerate launch -m distill",
                   help="how the written scripts start distill (default 'accelerate launch -m distill')")
    p.add_argument("--slurm-opt", action="append", default=[], metavar="OPT",
                   help="an extra #SBATCH option for the scripts, repeatable: --slurm-opt partition=gpu")
    return p


def main(argv: Optional[list[str]] = None, runner: Optional[Callable[..., dict]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow the options
    try:
        import optuna  # noqa: F401
    except ImportError:
        print("distill search: needs Optuna: pip install optuna (or pip install 'distill[search]')", file=sys.stderr)
        return 2
    from distill.errors import DataError, ModelLoadError, Preempted, StageError

    try:
        search = Search(args.recipe, args.overrides, args.root, runner=runner, worker=args.worker)
        if args.workers is not None:
            if args.workers < 1:
                raise SearchError(f"--workers must be >= 1, got {args.workers}")
            if search.storage_url.startswith("sqlite") and args.workers > 1:
                print("distill search: note: SQLite serves workers on one machine (local disk); across machines "
                      "set search.storage to a database URL (postgresql://...)", file=sys.stderr)
            files = launch_files(search, args.workers, args.launcher, [o.lstrip("-") for o in args.slurm_opt])
            for name, text in files.items():
                path = search.root / name
                _atomic_write(path, text)
                if name.endswith((".sh", ".sbatch")):
                    path.chmod(0o755)
            print(f"wrote {search.root / 'commands.sh'} (one machine) and {search.root / 'slurm'}/ "
                  f"(submit with `bash {search.root / 'slurm' / 'submit.sh'}`)")
            return 0
        if args.dry_run:
            search.preflight()
            print(f"search '{search.study_name}' in {search.root} ({_redact(search.storage_url)})")
            print("objectives: " + ", ".join(f"{o} ({d})" for o, d in zip(search.objectives, search.directions)))
            print(f"sampler {search.cfg.sampler}, pruner {search.pruner}, trials {search.cfg.trials}, "
                  f"time budget {search.cfg.time_budget}")
            for p in search.params:
                print(f"  {p.key}: {p.describe()}")
            local = search.storage_url.startswith("sqlite:///")
            if local and not Path(search.storage_url.split(":///", 1)[1]).exists():
                print("no trials yet (the storage does not exist)")
            else:
                try:
                    study = search.study(create=False)
                    print(f"{search.used(study.get_trials(deepcopy=False))} trials so far")
                except SearchError as err:
                    print(err)
            return 0
        if args.summarize:
            study = search.study(create=False)
            info = search.write_outputs(study, plots=True)
            print(search_report(search.root))
            return 0 if info["best"] else 1
        if args.prepare:
            if search.team.main:
                search.root.mkdir(parents=True, exist_ok=True)
                search.preflight()
            search.prepare()
            return 0
        study = search.run(args.max_trials)
        if study is not None:
            print(search_report(search.root))
        return 0
    except ConfigError as err:
        print(f"distill search: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        print(f"distill search: {err.message} The trial is queued again: re-run the same command to resume.",
              file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("distill search: interrupted; the running trial is queued again: re-run the same command to resume",
              file=sys.stderr)
        return 130
    except (DataError, ModelLoadError, StageError, FileNotFoundError) as err:
        print(f"distill search: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
