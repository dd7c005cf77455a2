"""One harness for every evidence table: tasks x axes x modes x seeds, run through the public CLI.

    python scripts/evidence.py SPEC.yaml --out docs/evidence/NAME.md [--root runs/evidence/NAME]
                               [--jobs 1] [--dry-run | --estimate | --report-only] [--overwrite]

A spec (YAML or JSON) names the tasks (a base recipe + overrides), the modes compared (a stage,
`student` or `baseline`, + recipe overrides), the seeds and any axes (a product of named override
sets, e.g. student depth). Every cell is one `python -m distill STAGE RECIPE key=value ...`
subprocess in its own folder `<root>/<task>/<axes>/<mode>/seed-<n>/`; its `metrics.json` is read
back. Each task's teacher is fine-tuned once (per seed with `teacher: {per_seed: true}`) into
`<root>/<task>/teacher` and shared through `teacher.dir`; its outputs through one
`distill.cache_dir`. A finished cell is never redone: re-running the same command picks up where
it stopped (and the CLI resumes a half-trained stage from its checkpoint).

Outputs: `NAME.md` (machine and load in the header, then one table per task: test metric mean
± std, min-max, validation mean, the paired difference to the reference mode, wall time and
training throughput) and `NAME.json` (every run's numbers and command). Text below a line
`<!-- notes -->` in an existing NAME.md is kept when the doc is rewritten.

Spec (see docs/evidence/specs/ for the shipped ones):

    title: Distillation modes vs the student fine-tuned alone
    seeds: [1, 2, 3]
    teacher: {seed: 1, per_seed: false}     # optional
    overrides: [train.epochs=10]            # optional: every stage, teacher included
    tasks:
      pos: {recipe: recipes/evidence/pos_coser.yaml, overrides: [data.max_train_samples=200]}
    axes:                                   # optional: name -> value -> overrides
      depth: {"1": [student.num_layers=1], "2": [student.num_layers=2]}
    modes:                                  # name -> {stage, overrides} or a list of overrides
      finetune: {stage: baseline}
      logits: [distill.kd_weight=1, distill.ce_weight=0]
      hidden: {overrides: {distill.hidden_weight: 1.0}}
      best: {overrides_file: "runs/search/{task}/best.yaml", keys: [train.lr, distill]}
    reference: finetune                     # optional: what "delta" compares with
    speed_reference: logits                 # optional: step time is given relative to it
    exclude:                                # optional: cells left out of the product; an entry
      - {depth: "1", mode: hidden}          # names axis values, a mode and/or a task, and drops
                                            # every cell that matches all it names

Overrides are `key=value` strings or a mapping (nested or dotted keys); OmegaConf interpolations
such as `${task.name}` resolve per task. Axes and modes apply to
the student and baseline stages only; `overrides` and a task's overrides apply to its teacher
too. `output_dir`, `seed`, `teacher.dir` and `distill.cache_dir` belong to the harness.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

STAGES = ("student", "baseline")
MANAGED = ("output_dir", "seed", "teacher.dir", "distill.cache_dir")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
NOTES = "<!-- notes -->"
REQUEUE = 75  # the CLI's exit status after a signal: the stage saved a checkpoint and stopped
EVIDENCE_DATA = Path("runs/evidence-data")  # scripts/make_evidence_data.py's default output
SCRIPTS = Path(__file__).resolve().parent


class SpecError(ValueError):
    """A spec that cannot be run; the message says what and where."""


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    recipe: str
    overrides: list[str]
    metric: Optional[str] = None  # None = the metric the stage reports in info.metric


@dataclass
class Mode:
    name: str
    stage: str
    overrides: list[str]
    # YAML whose values become overrides (e.g. a search's best.yaml); `{task}` in the path is
    # the task's name; read when the plan is made, so it may not exist when the spec is parsed.
    overrides_file: Optional[str] = None
    keys: list[str] = field(default_factory=list)  # the keys (or sections) taken from that file


@dataclass
class Spec:
    name: str
    title: str
    seeds: list[int]
    tasks: list[Task]
    modes: list[Mode]
    axes: dict[str, dict[str, list[str]]]
    overrides: list[str] = field(default_factory=list)
    teacher_seed: Optional[int] = None
    per_seed_teacher: bool = False
    reference: Optional[str] = None
    speed_reference: Optional[str] = None
    exclude: list[dict[str, str]] = field(default_factory=list)  # {axis|"mode"|"task": value}
    path: Optional[str] = None

    def excluded(self, task: str, combo: dict[str, str], mode: str) -> bool:
        """Whether the cell (task, axis values, mode) is left out by an `exclude` entry."""
        cell = {"task": task, "mode": mode, **combo}
        return any(all(cell.get(k) == v for k, v in rule.items()) for rule in self.exclude)


def _value(value: Any) -> str:
    """A Python value as the right-hand side of a `key=value` override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)  # JSON is YAML flow style: OmegaConf reads it
    return str(value)


def _flatten(mapping: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, full + "."))
        else:
            out.append(f"{full}={_value(value)}")
    return out


def overrides_of(raw: Any, where: str) -> list[str]:
    """`key=value` strings from a list of them or from a (nested) mapping."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        items = _flatten(raw)
    elif isinstance(raw, list):
        items = []
        for i, item in enumerate(raw):
            if not isinstance(item, str) or "=" not in item or item.startswith("="):
                raise SpecError(f"{where}[{i}]: expected 'key=value' (e.g. train.lr=1e-4), got {item!r}")
            items.append(item)
    else:
        raise SpecError(f"{where}: expected a list of 'key=value' strings or a mapping, got {type(raw).__name__}")
    for item in items:
        key = item.split("=", 1)[0].strip()
        if key in MANAGED:
            raise SpecError(f"{where}: '{key}' is set by the harness (one folder per cell, shared teacher); remove it")
    return items


def _name(value: Any, where: str) -> str:
    text = str(value)
    if not NAME.match(text):
        raise SpecError(
            f"{where}: name {text!r} must start with a letter or digit and use only letters, digits "
            "and . _ + - (it becomes a folder name)"
        )
    return text


def _mapping(raw: Any, where: str, required: bool = True) -> dict:
    if raw is None and not required:
        return {}
    if not isinstance(raw, dict) or (required and not raw):
        raise SpecError(f"{where}: expected a non-empty mapping, got {raw!r}")
    return raw


def _check_keys(raw: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def from_file(path: str, keys: list[str], where: str) -> list[str]:
    """Overrides taken from a YAML file (e.g. the best recipe a search wrote), limited to `keys`
    (a key or a section prefix each); the harness's own keys are left out."""
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"{where}: {path} not found")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecError(f"{where}: {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{where}: {path} must hold a mapping")
    items = [i for i in _flatten(data) if i.split("=", 1)[0] not in MANAGED]
    if keys:
        items = [i for i in items if any(i.split("=", 1)[0] == k or i.startswith(k + ".") for k in keys)]
    if not items:
        raise SpecError(f"{where}: {path} gives no override under {keys or 'any key'}")
    return items


def mode_overrides(mode: Mode, task: str) -> list[str]:
    """A mode's overrides for one task: its file's (if any), then its own."""
    if not mode.overrides_file:
        return list(mode.overrides)
    path = mode.overrides_file.replace("{task}", task)
    return from_file(path, mode.keys, f"spec.modes.{mode.name}.overrides_file") + mode.overrides


def parse_spec(raw: Any, name: Optional[str] = None, path: Optional[str] = None) -> Spec:
    """A spec mapping -> Spec, checked: every problem names its place in the spec."""
    raw = _mapping(raw, "spec")
    _check_keys(
        raw,
        {"name", "title", "seeds", "tasks", "modes", "axes", "overrides", "teacher", "reference", "speed_reference",
         "exclude"},
        "spec",
    )
    name = _name(raw.get("name") or name or "evidence", "spec.name")
    seeds = raw.get("seeds", [1])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SpecError(f"spec.seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"spec.seeds: {seeds} repeats a seed")

    tasks = []
    for key, body in _mapping(raw.get("tasks"), "spec.tasks").items():
        where = f"spec.tasks.{key}"
        body = {"recipe": body} if isinstance(body, str) else _mapping(body, where)
        _check_keys(body, {"recipe", "overrides", "metric"}, where)
        if not body.get("recipe"):
            raise SpecError(f"{where}: needs 'recipe' (a recipe YAML path)")
        tasks.append(Task(_name(key, where), str(body["recipe"]), overrides_of(body.get("overrides"), f"{where}.overrides"), body.get("metric")))

    modes = []
    for key, body in _mapping(raw.get("modes"), "spec.modes").items():
        where = f"spec.modes.{key}"
        if body is None or isinstance(body, list):
            body = {"overrides": body or []}
        body = _mapping(body, where, required=False)
        _check_keys(body, {"stage", "overrides", "overrides_file", "keys"}, where)
        stage = body.get("stage", "student")
        if stage not in STAGES:
            raise SpecError(f"{where}.stage: {stage!r} is not one of {', '.join(STAGES)}")
        keys = body.get("keys") or []
        if not isinstance(keys, list) or (keys and not body.get("overrides_file")):
            raise SpecError(f"{where}.keys: a list of recipe keys or sections, used with overrides_file")
        file = body.get("overrides_file")
        modes.append(Mode(_name(key, where), stage, overrides_of(body.get("overrides"), f"{where}.overrides"),
                          str(file) if file else None, [str(k) for k in keys]))

    axes: dict[str, dict[str, list[str]]] = {}
    for key, values in _mapping(raw.get("axes"), "spec.axes", required=False).items():
        where = f"spec.axes.{key}"
        values = _mapping(values, where)
        axes[_name(key, where)] = {
            _name(v, f"{where}.{v}"): overrides_of(o, f"{where}.{v}") for v, o in values.items()
        }

    teacher = _mapping(raw.get("teacher"), "spec.teacher", required=False)
    _check_keys(teacher, {"seed", "per_seed"}, "spec.teacher")
    teacher_seed = teacher.get("seed", seeds[0])
    if not isinstance(teacher_seed, int):
        raise SpecError(f"spec.teacher.seed: expected an integer, got {teacher_seed!r}")
    mode_names = [m.name for m in modes]
    reference = raw.get("reference")
    if reference is None:
        reference = next((m.name for m in modes if m.stage == "baseline"), None)
    for key, value in (("reference", reference), ("speed_reference", raw.get("speed_reference"))):
        if value is not None and value not in mode_names:
            raise SpecError(f"spec.{key}: {value!r} is not a mode ({', '.join(mode_names)})")
    exclude = raw.get("exclude") or []
    if not isinstance(exclude, list):
        raise SpecError(f"spec.exclude: expected a list of mappings (e.g. {{depth: '1', mode: hidden}}), got {exclude!r}")
    known = {"task": [t.name for t in tasks], "mode": mode_names, **{a: list(v) for a, v in axes.items()}}
    rules = []
    for i, rule in enumerate(exclude):
        where = f"spec.exclude[{i}]"
        rule = _mapping(rule, where)
        _check_keys(rule, set(known), where)
        for key, value in rule.items():
            if str(value) not in known[key]:
                raise SpecError(f"{where}.{key}: {value!r} is not one of {', '.join(known[key])}")
        rules.append({k: str(v) for k, v in rule.items()})
    return Spec(
        name=name,
        title=str(raw.get("title") or name),
        seeds=list(seeds),
        tasks=tasks,
        modes=modes,
        axes=axes,
        overrides=overrides_of(raw.get("overrides"), "spec.overrides"),
        teacher_seed=teacher_seed,
        per_seed_teacher=bool(teacher.get("per_seed", False)),
        reference=reference,
        speed_reference=raw.get("speed_reference"),
        exclude=rules,
        path=path,
    )


def load_spec(path: str | Path) -> Spec:
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"spec not found: {file}")
    try:
        raw = yaml.safe_load(file.read_text())  # JSON is YAML too
    except yaml.YAMLError as err:
        raise SpecError(f"{file}: malformed YAML/JSON: {err}") from None
    return parse_spec(raw, name=file.stem, path=str(file))


# ---------------------------------------------------------------------------------------------
# The plan: one Run per subprocess
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    task: str
    stage: str  # teacher | student | baseline
    seed: int
    dir: Path  # the run's output_dir (the stage writes into dir/stage, the teacher into teacher.dir)
    command: list[str]
    mode: Optional[str] = None  # None for a teacher
    axes: dict[str, str] = field(default_factory=dict)
    result: dict = field(default_factory=dict)  # filled by collect()
    problem: Optional[str] = None  # why it cannot run as planned (e.g. a missing overrides_file)

    @property
    def stage_dir(self) -> Path:
        return self.dir if self.stage == "teacher" else self.dir / self.stage

    @property
    def label(self) -> str:
        axes = " ".join(f"{k}={v}" for k, v in self.axes.items())
        return " ".join(x for x in (self.task, axes, self.mode or "teacher", f"seed={self.seed}") if x)


def axis_combos(spec: Spec) -> list[dict[str, str]]:
    names = list(spec.axes)
    return [dict(zip(names, values)) for values in itertools.product(*(spec.axes[n] for n in names))]


def combo_dir(combo: dict[str, str]) -> str:
    return "_".join(f"{k}-{v}" for k, v in combo.items()) or "default"


def teacher_dir(spec: Spec, root: Path, task: str, seed: int) -> Path:
    return root / task / (f"teacher-seed-{seed}" if spec.per_seed_teacher else "teacher")


def plan(spec: Spec, root: Path, python: str = "python") -> tuple[list[Run], list[Run]]:
    """(teacher runs, cells). Cells are ordered seed first, so a stopped table still holds
    complete comparisons for its first seeds."""
    teachers: list[Run] = []
    cells: list[Run] = []
    tseeds = spec.seeds if spec.per_seed_teacher else [spec.teacher_seed]
    for task in spec.tasks:
        base = [*task.overrides, *spec.overrides]
        for seed in tseeds:
            tdir = teacher_dir(spec, root, task.name, seed)
            cmd = [python, "-m", "distill", "teacher", task.recipe, *base,
                   f"teacher.dir={tdir}", f"output_dir={root / task.name}", f"seed={seed}"]
            teachers.append(Run(task.name, "teacher", seed, tdir, cmd))
    for seed in spec.seeds:
        for task in spec.tasks:
            tdir = teacher_dir(spec, root, task.name, seed if spec.per_seed_teacher else spec.teacher_seed)
            for combo in axis_combos(spec):
                axis_overrides = [o for name, value in combo.items() for o in spec.axes[name][value]]
                for mode in spec.modes:
                    if spec.excluded(task.name, combo, mode.name):
                        continue
                    problem = None
                    try:
                        overrides = mode_overrides(mode, task.name)
                    except SpecError as err:
                        overrides, problem = list(mode.overrides), str(err)
                    out = root / task.name / combo_dir(combo) / mode.name / f"seed-{seed}"
                    cmd = [python, "-m", "distill", mode.stage, task.recipe, *task.overrides, *spec.overrides,
                           *axis_overrides, *overrides, f"teacher.dir={tdir}",
                           f"distill.cache_dir={root / task.name / 'teacher_cache'}",
                           f"output_dir={out}", f"seed={seed}"]
                    cells.append(Run(task.name, mode.stage, seed, out, cmd, mode.name, dict(combo), problem=problem))
    return teachers, cells


def check_configs(spec: Spec, teachers: list[Run], cells: list[Run]) -> tuple[list[str], dict[str, bool]]:
    """Every distinct configuration loaded through the recipe schema (no training): returns the
    problems, each naming its cell, and which tasks need a teacher stage."""
    from distill.config import load_config  # lazily: the harness itself needs only the CLI

    problems: list[str] = []
    needs_teacher: dict[str, bool] = {}
    seen: set[tuple] = set()
    for run in teachers + cells:
        key = (run.task, run.stage, run.mode, tuple(run.axes.items()))
        if key in seen:
            continue
        seen.add(key)
        if run.problem:
            problems.append(f"{run.task} {run.mode}: {run.problem}")
            continue
        recipe, overrides = run.command[4], run.command[5:]
        try:
            cfg = load_config(recipe, overrides)
        except Exception as err:  # ConfigError, and anything a half-built key might raise
            problems.append(f"{run.label.replace(f' seed={run.seed}', '')} ({run.stage}): {err}")
            continue
        if run.stage == "teacher":
            needs_teacher[run.task] = bool(cfg.teacher.model) and not cfg.teacher.finetuned
            missing = [f for f in cfg.data.files.values() if not Path(f).exists()]
            if missing:
                problems.append(f"{run.task}: data file(s) not found: {', '.join(missing)}")
        elif run.stage == "student" and not cfg.teacher.model:
            problems.append(f"{run.label} (student): the recipe has no teacher.model; use stage: baseline")
    return problems, needs_teacher


def ensure_data(spec: Spec) -> None:
    """Write the evidence data (scripts/make_evidence_data.py) when a task's files under
    runs/evidence-data/ are missing; other missing files are reported by check_configs."""
    from distill.config import load_config

    missing = []
    for task in spec.tasks:
        try:
            cfg = load_config(task.recipe, [*task.overrides, *spec.overrides])
        except Exception:
            continue  # reported with its cell by check_configs
        missing += [f for f in cfg.data.files.values() if not Path(f).exists()]
    if missing and all(Path(f).is_relative_to(EVIDENCE_DATA) for f in missing):
        sys.path.insert(0, str(SCRIPTS))
        import make_evidence_data

        print(f"[evidence] writing the evidence data under {EVIDENCE_DATA} (missing: {missing[0]}, ...)", flush=True)
        make_evidence_data.build(make_evidence_data.DEFAULT_CONLLU, EVIDENCE_DATA)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _side(run: Run, suffix: str) -> Path:
    """The harness's own files for a run, outside the stage folder (which overwrite=true clears):
    `<cell>/harness.<suffix>`, or `<teacher dir>.harness.<suffix>` beside a teacher."""
    if run.stage == "teacher":
        return run.dir.parent / f"{run.dir.name}.harness.{suffix}"
    return run.dir / f"harness.{suffix}"


def _record_path(run: Run) -> Path:
    return _side(run, "json")


def portable(command: list[str]) -> list[str]:
    """The command as recorded: the interpreter's path is not part of a cell's identity."""
    return ["python", *command[1:]]


def recipe_hash(run: Run, raw: bool = False) -> Optional[str]:
    """The hash of the recipe's settings (its YAML read, comments and layout aside): a recipe
    with another value is another run even with the same command; an edited comment is not.
    `raw`: the file's bytes, as records written before settings were hashed hold it."""
    path = Path(run.command[4]) if len(run.command) > 4 else None  # python -m distill STAGE RECIPE ...
    if not path or not path.is_file():
        return None
    if raw:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return recipe_hash(run, raw=True)  # the stage itself will say what is wrong with it
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def same_run(run: Run, record: dict) -> bool:
    if record.get("command") != portable(run.command):
        return False
    if "recipe_settings_sha256" in record:
        return record["recipe_settings_sha256"] == recipe_hash(run)
    return record.get("recipe_sha256") == recipe_hash(run, raw=True)


def read_record(run: Run) -> Optional[dict]:
    path = _record_path(run)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_done(run: Run) -> bool:
    record = read_record(run)
    return bool(
        record
        and record.get("returncode") == 0
        and same_run(run, record)
        and (run.stage_dir / "metrics.json").exists()
    )


def conflicts(runs: list[Run]) -> list[str]:
    """Cells whose folder holds a finished run of another command or recipe (the spec or the
    recipe changed)."""
    out = []
    for run in runs:
        record = read_record(run)
        if record and not same_run(run, record) and (run.stage_dir / "metrics.json").exists():
            what = "command" if record.get("command") != portable(run.command) else f"version of {run.command[4]}"
            out.append(f"{run.label}: {run.dir} was run with another {what} ({_record_path(run)}); "
                       "pass --overwrite to replace it")
    return out


def child_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


class Runner:
    """Runs cells as subprocesses, `jobs` at a time, recording each one's wall time; stops
    scheduling new ones after a failure (with fail_fast), a requeue exit or Ctrl-C."""

    def __init__(self, jobs: int, overwrite: bool, fail_fast: bool):
        self.jobs, self.overwrite, self.fail_fast = jobs, overwrite, fail_fast
        self.env = child_env(jobs)
        self.stop = threading.Event()
        self.stop_code = 0
        self.lock = threading.Lock()
        self.children: set[subprocess.Popen] = set()
        self.failed: list[Run] = []

    def run_one(self, run: Run, index: int, total: int) -> None:
        if self.stop.is_set() or is_done(run):
            return
        command = run.command + (["overwrite=true"] if self.overwrite else [])
        resumed = (run.stage_dir / "checkpoints").exists()
        recipe = recipe_hash(run)  # before the run: the version the stage reads
        _side(run, "log").parent.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        with open(_side(run, "log"), "a", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(portable(command))}\n")
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
            with self.lock:
                self.children.add(proc)
            code = proc.wait()
            with self.lock:
                self.children.discard(proc)
        wall = time.perf_counter() - start
        record = {
            "command": portable(run.command),
            "recipe_settings_sha256": recipe,
            "returncode": code,
            "wall_s": round(wall, 2),
            "resumed": resumed,
            "load_1min_before": round(load, 2),
            "load_1min_after": round(os.getloadavg()[0], 2),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _record_path(run).write_text(json.dumps(record, indent=2) + "\n")
        score = ""
        if code == 0 and (run.stage_dir / "metrics.json").exists():
            metrics = json.loads((run.stage_dir / "metrics.json").read_text())
            metric = metrics.get("info", {}).get("metric")
            if metric and metric in metrics.get("test", {}):
                score = f"test {metric} {metrics['test'][metric]:.4f}, "
        status = "ok" if code == 0 else f"FAILED (exit {code}; see {_side(run, 'log')})"
        print(f"[evidence] [{index}/{total}] {run.label}: {score}{wall:.1f} s {status}", flush=True)
        if code != 0:
            with self.lock:
                self.failed.append(run)
            if code == REQUEUE or code < 0:
                self.stop_code = REQUEUE
                self.stop.set()
            elif self.fail_fast:
                self.stop_code = 1
                self.stop.set()

    def run_all(self, runs: list[Run]) -> None:
        todo = [r for r in runs if not is_done(r)]
        if not todo:
            return
        if self.jobs == 1:
            for i, run in enumerate(todo, 1):
                self.run_one(run, i, len(todo))
            return
        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(lambda args: self.run_one(*args), [(r, i, len(todo)) for i, r in enumerate(todo, 1)]))

    def interrupt(self) -> None:
        """Ask every running stage to checkpoint and stop (it exits with the requeue status)."""
        self.stop.set()
        self.stop_code = REQUEUE
        with self.lock:
            for proc in self.children:
                proc.send_signal(signal.SIGTERM)


# ---------------------------------------------------------------------------------------------
# Reading results back, and aggregating them
# ---------------------------------------------------------------------------------------------


def samples_per_s(stage_dir: Path) -> Optional[float]:
    """Median training throughput over the logging windows of log.jsonl (robust to the windows
    that include an evaluation or the teacher cache being built)."""
    path = stage_dir / "log.jsonl"
    if not path.exists():
        return None
    values = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record.get("train/samples_per_s"), (int, float)):
            values.append(float(record["train/samples_per_s"]))
    return statistics.median(values) if values else None


def collect(run: Run) -> dict:
    """The run's numbers, from its stage folder and the harness record."""
    record = read_record(run) or {}
    out: dict[str, Any] = {
        "task": run.task, "stage": run.stage, "mode": run.mode, "axes": run.axes, "seed": run.seed,
        "dir": str(run.dir), "log": str(_side(run, "log")), "command": portable(run.command), "status": "missing",
        "wall_s": None, "resumed": record.get("resumed"), "returncode": record.get("returncode"),
    }
    metrics_path = run.stage_dir / "metrics.json"
    if metrics_path.exists() and (not record or same_run(run, record)):
        metrics = json.loads(metrics_path.read_text())
        out.update(status="done", validation=metrics.get("validation", {}), test=metrics.get("test", {}),
                   info=metrics.get("info", {}), samples_per_s=samples_per_s(run.stage_dir))
        if record.get("returncode") == 0 and not record.get("resumed"):
            out["wall_s"] = record.get("wall_s")  # a resumed run's time covers only its last part
    elif record.get("returncode") not in (None, 0):
        out["status"] = "failed"
    run.result = out
    return out


def stats(values: list[float]) -> dict[str, Optional[float]]:
    """n, mean, sample standard deviation (n-1; None for one value), min, max."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def task_metric(spec_task: Task, results: list[dict]) -> Optional[str]:
    if spec_task.metric:
        return spec_task.metric
    for r in results:
        metric = r.get("info", {}).get("metric")
        if metric:
            return metric
    return None


def summarize(spec: Spec, teachers: list[dict], cells: list[dict]) -> list[dict]:
    """One row per task x axes x mode: the metric's statistics over seeds, the paired
    difference to the reference mode (same task, axes and seed), wall time and throughput."""
    rows = []
    for task in spec.tasks:
        mine = [c for c in cells if c["task"] == task.name and c["status"] == "done"]
        metric = task_metric(task, mine + [t for t in teachers if t["task"] == task.name])
        for combo in axis_combos(spec):
            group = [c for c in mine if c["axes"] == combo]

            def by_seed(mode: Optional[str], split: str = "test") -> dict[int, float]:
                return {c["seed"]: c[split][metric] for c in group
                        if c["mode"] == mode and metric in c.get(split, {})}

            ref = by_seed(spec.reference) if spec.reference else {}
            speed_ref = [c["samples_per_s"] for c in group
                         if c["mode"] == spec.speed_reference and c.get("samples_per_s")]
            for mode in spec.modes:
                if spec.excluded(task.name, combo, mode.name):
                    continue
                test = by_seed(mode.name)
                deltas = [test[s] - ref[s] for s in sorted(test) if s in ref]
                runs = [c for c in group if c["mode"] == mode.name]
                walls = [c["wall_s"] for c in runs if c.get("wall_s") is not None]
                sps = [c["samples_per_s"] for c in runs if c.get("samples_per_s")]
                row = {
                    "task": task.name, "axes": combo, "mode": mode.name, "stage": mode.stage, "metric": metric,
                    "test": stats(list(test.values())),
                    "validation": stats(list(by_seed(mode.name, "validation").values())),
                    "delta": stats(deltas) if spec.reference and mode.name != spec.reference else None,
                    "wins": sum(d > 0 for d in deltas),
                    "wall_s_median": statistics.median(walls) if walls else None,
                    "samples_per_s": statistics.median(sps) if sps else None,
                    "step_time_ratio": (statistics.median(speed_ref) / statistics.median(sps))
                    if sps and speed_ref else None,
                    "seeds": sorted(test),
                }
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# The documents
# ---------------------------------------------------------------------------------------------


def _pct(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _mean_std(s: dict, signed: bool = False) -> str:
    if not s or not s["n"]:
        return "–"
    text = _pct(s["mean"], signed)
    return text + (f" ± {100 * s['std']:.2f}" if s["std"] is not None else "")


def machine() -> dict[str, Any]:
    """What the timings depend on: CPU model and count, torch threads, load."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def render_markdown(spec: Spec, header: dict, teachers: list[dict], cells: list[dict], rows: list[dict]) -> str:
    """The evidence doc: how it was made, on what, then one table per task."""
    m_start, m_end = header["machine_start"], header["machine_end"]
    threads = m_start.get("omp_num_threads_runs") or m_start.get("torch_threads")
    lines = [
        f"# {spec.title}",
        "",
        f"Produced by `{header['command']}` ({header['date']}, commit {header['commit']}); every "
        f"number below is in `{header['json']}`, every run's folder under `{header['root']}`.",
        "",
        f"Machine: {m_start['cpu']}, {m_start['cpu_count']} CPUs"
        + (f", GPU {m_start['cuda']}" if m_start.get("cuda") else "")
        + f"; torch {m_start.get('torch', '?')}, {threads} thread(s) per run, {header['jobs']} run(s) at a time. "
        f"Load average (1 / 5 / 15 min): {' / '.join(str(x) for x in m_start['load_average'])} at the start, "
        f"{' / '.join(str(x) for x in m_end['load_average'])} at the end — wall times on a shared machine "
        "move with its load; the ratios of throughput measured in the same table are steadier.",
        "",
        f"Seeds: {', '.join(map(str, spec.seeds))}. Teacher: fine-tuned once per task"
        + (" and seed" if spec.per_seed_teacher else f" (seed {spec.teacher_seed})")
        + " and shared by every mode (`teacher.dir`), its outputs cached once (`distill.cache_dir`).",
        "",
        "| mode | stage | overrides |",
        "|---|---|---|",
    ]
    for mode in spec.modes:
        shown = [f"`{o}`" for o in mode.overrides]
        if mode.overrides_file:
            shown.insert(0, f"{', '.join(mode.keys) or 'every key'} from `{mode.overrides_file}`")
        lines.append(f"| {mode.name} | {mode.stage} | {' '.join(shown) or '–'} |")
    lines += ["", "| task | recipe | overrides |", "|---|---|---|"]
    for task in spec.tasks:
        extra = [*task.overrides, *spec.overrides]
        lines.append(f"| {task.name} | `{task.recipe}` | {' '.join(f'`{o}`' for o in extra) or '–'} |")
    for axis, values in spec.axes.items():
        lines.append("")
        lines.append(f"Axis `{axis}`: " + "; ".join(f"{v} = {' '.join(f'`{o}`' for o in o_) or '–'}" for v, o_ in values.items()))
    if spec.exclude:
        lines += ["", "Not run (left out of the product by the spec): "
                  + "; ".join(" × ".join(f"{k} {v}" for k, v in rule.items()) for rule in spec.exclude) + "."]

    ref = spec.reference
    for task in spec.tasks:
        task_rows = [r for r in rows if r["task"] == task.name]
        metric = task_rows[0]["metric"] if task_rows else None
        lines += ["", f"## {task.name}: test {metric or '(no results yet)'} (%)", ""]
        trs = [t for t in teachers if t["task"] == task.name and t["status"] == "done" and metric in t.get("test", {})]
        if trs:
            s = stats([t["test"][metric] for t in trs])
            walls = [t["wall_s"] for t in trs if t.get("wall_s") is not None]
            lines.append(
                f"Teacher (fine-tuned, {len(trs)} run(s)): test {_mean_std(s)}, validation "
                f"{_mean_std(stats([t['validation'][metric] for t in trs if metric in t.get('validation', {})]))}"
                + (f", {statistics.median(walls):.0f} s" if walls else "") + "."
            )
            lines.append("")
        axis_names = list(spec.axes)
        head = [*axis_names, "mode", "n", "test mean ± std", "min – max", "validation mean ± std"]
        if ref:
            head += [f"Δ vs {ref} (paired)", "wins"]
        head += ["wall s/run (median)", "train samples/s"]
        if spec.speed_reference:
            head.append(f"step time ÷ {spec.speed_reference}")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in task_rows:
            t = r["test"]
            cells_ = [*(r["axes"][a] for a in axis_names), r["mode"], str(t["n"]), _mean_std(t),
                      f"{_pct(t['min'])} – {_pct(t['max'])}" if t["n"] else "–", _mean_std(r["validation"])]
            if ref:
                d = r["delta"]
                cells_ += ["(reference)" if r["mode"] == ref else _mean_std(d, signed=True),
                           f"{r['wins']}/{d['n']}" if d and d["n"] else "–"]
            cells_ += [f"{r['wall_s_median']:.0f}" if r["wall_s_median"] is not None else "–",
                       f"{r['samples_per_s']:.1f}" if r["samples_per_s"] else "–"]
            if spec.speed_reference:
                cells_.append(f"{r['step_time_ratio']:.2f}" if r["step_time_ratio"] else "–")
            lines.append("| " + " | ".join(cells_) + " |")

    lines += [
        "",
        "Scores are percentages: mean ± sample standard deviation over seeds, and the lowest and "
        "highest run. "
        + (f"Δ is paired: for each seed, the mode's test score minus `{ref}`'s on the same task, "
           "axes and seed, then mean ± std of those differences; wins counts the seeds where the "
           "mode scored higher. " if ref else "")
        + "Wall time is the whole subprocess (start-up, data, teacher cache when it is built, "
        "training, evaluation); train samples/s is the median over the logging windows of the "
        "stage's log.jsonl"
        + (f", and step time ÷ {spec.speed_reference} divides the reference mode's throughput by this one's"
           if spec.speed_reference else "")
        + ".",
    ]
    bad = [r for r in teachers + cells if r["status"] != "done"]
    if bad:
        lines += ["", f"Not in the tables ({len(bad)} run(s)):", ""]
        for r in bad:
            where = r.get("log")
            axes = " ".join(f"{k}={v}" for k, v in r["axes"].items())
            lines.append(f"- {' '.join(x for x in (r['task'], axes, r.get('mode') or 'teacher') if x)} "
                         f"seed {r['seed']}: {r['status']} ({where})")
    return "\n".join(lines) + "\n"


def write_outputs(spec: Spec, out: Path, header: dict, teachers: list[dict], cells: list[dict], rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render_markdown(spec, header, teachers, cells, rows)
    if out.exists():
        old = out.read_text()
        if NOTES in old:  # hand-written conclusions survive a regeneration
            text += "\n" + old[old.index(NOTES):]
    out.write_text(text)
    data = {
        "spec": {"name": spec.name, "title": spec.title, "path": spec.path, "seeds": spec.seeds,
                 "tasks": [vars(t) for t in spec.tasks], "modes": [vars(m) for m in spec.modes],
                 "axes": spec.axes, "overrides": spec.overrides, "teacher_seed": spec.teacher_seed,
                 "per_seed_teacher": spec.per_seed_teacher, "reference": spec.reference,
                 "speed_reference": spec.speed_reference, "exclude": spec.exclude},
        **header,
        "teachers": teachers,
        "runs": cells,
        "summary": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Estimate
# ---------------------------------------------------------------------------------------------


def estimate(spec: Spec, teachers: list[Run], cells: list[Run], jobs: int) -> tuple[float, list[str]]:
    """Seconds the runs not yet done will take, from the finished ones: the same task and mode
    if measured, else the same task and stage; and the lines that explain it."""
    done = [collect(r) for r in teachers + cells]
    measured: dict[tuple, list[float]] = {}
    for r in done:
        if r["status"] == "done" and r.get("wall_s") is not None:
            measured.setdefault((r["task"], r["mode"]), []).append(r["wall_s"])
            measured.setdefault((r["task"], r["stage"]), []).append(r["wall_s"])
    total, unknown, notes = 0.0, 0, []
    for r in done:
        if r["status"] == "done":
            continue
        times = measured.get((r["task"], r["mode"])) or measured.get((r["task"], r["stage"]))
        if times is None:
            unknown += 1
        else:
            total += statistics.median(times)
    for (task, what), times in sorted(measured.items(), key=lambda kv: str(kv[0])):
        if what in ("teacher", "student", "baseline"):
            notes.append(f"  {task} {what}: {statistics.median(times):.0f} s per run (median of {len(times)})")
    todo = sum(r["status"] != "done" for r in done)
    if todo == unknown:
        notes.append(f"  {todo} run(s) left, none like them measured yet (--estimate measures one per task and stage)")
    else:
        notes.append(
            f"  {todo} run(s) left, about {total / 60 / jobs:.0f} min with --jobs {jobs}"
            + (f" plus {unknown} run(s) with nothing like them measured yet" if unknown else "")
            + " (modes with heavier loss terms take longer than the runs they are estimated from)"
        )
    return total, notes


def probes(teachers: list[Run], cells: list[Run]) -> list[Run]:
    """What --estimate runs: every teacher, then per task the first cell of each stage."""
    picked, seen = list(teachers), set()
    for c in cells:
        if (c.task, c.stage) not in seen:
            seen.add((c.task, c.stage))
            picked.append(c)
    return picked


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/evidence.py",
        description="Run an evidence table (tasks x axes x modes x seeds) through the distill CLI "
        "and write it as markdown + JSON.",
        epilog="Specs and how to run each table: docs/evidence/README.md",
    )
    p.add_argument("spec", help="the table's spec (YAML or JSON)")
    p.add_argument("--out", help="the markdown to write (JSON beside it); default docs/evidence/<name>.md")
    p.add_argument("--root", help="runs folder; default runs/evidence/<name>")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1: CPUs are few)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    what.add_argument("--estimate", action="store_true",
                      help="run the teachers and one cell per task and stage, then print the time the rest needs")
    what.add_argument("--report-only", action="store_true", help="write the doc from the runs already done")
    p.add_argument("--overwrite", action="store_true",
                   help="rerun cells whose folder holds another command's results (passes overwrite=true)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")

    try:
        spec = load_spec(args.spec)
    except SpecError as err:
        print(f"evidence: {err}", file=sys.stderr)
        return 2
    root = Path(args.root or f"runs/evidence/{spec.name}")
    out = Path(args.out or f"docs/evidence/{spec.name}.md")
    teachers, cells = plan(spec, root, python=sys.executable)
    command = "python scripts/evidence.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--report-only",)
    )

    if not args.dry_run and not args.report_only:
        ensure_data(spec)
    problems, needs_teacher = check_configs(spec, teachers, cells)
    teachers = [t for t in teachers if needs_teacher.get(t.task, True)]
    if not args.overwrite:
        problems += conflicts(teachers + cells)
    if args.dry_run:
        for run in teachers + cells:
            state = "done" if is_done(run) else "todo"
            print(f"# {run.label} [{state}]\n{shlex.join(portable(run.command))}")
        print(f"# {len(teachers)} teacher run(s), {len(cells)} cell(s); {sum(is_done(r) for r in teachers + cells)} done")
        for problem in problems:
            print(f"evidence: problem: {problem}", file=sys.stderr)
        return 2 if problems else 0
    if problems and not args.report_only:
        print("evidence: nothing was run; fix these first:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2

    start_machine = machine()
    start_machine["omp_num_threads_runs"] = child_env(args.jobs)["OMP_NUM_THREADS"]
    runner = Runner(args.jobs, args.overwrite, args.fail_fast)
    code = 0
    if not args.report_only:
        previous = signal.signal(signal.SIGTERM, lambda *_: runner.interrupt())
        try:
            if args.estimate:
                runner.run_all(probes(teachers, cells))
                _, notes = estimate(spec, teachers, cells, args.jobs)
                print("[evidence] estimate:\n" + "\n".join(notes), flush=True)
                return runner.stop_code or (1 if runner.failed else 0)
            _, notes = estimate(spec, teachers, cells, args.jobs)
            print("[evidence] before starting:\n" + "\n".join(notes), flush=True)
            runner.run_all(teachers)
            if runner.failed:
                print("[evidence] a teacher failed; its students cannot run", file=sys.stderr)
                bad = {r.task for r in runner.failed}
                cells_to_run = [c for c in cells if c.task not in bad]
            else:
                cells_to_run = cells
            runner.run_all(cells_to_run)
        except KeyboardInterrupt:
            runner.interrupt()
            print("[evidence] interrupted: running stages checkpoint and stop; re-run to resume", file=sys.stderr)
        finally:
            signal.signal(signal.SIGTERM, previous)
        code = runner.stop_code or (1 if runner.failed else 0)

    teacher_results = [collect(t) for t in teachers]
    cell_results = [collect(c) for c in cells]
    rows = summarize(spec, teacher_results, cell_results)
    header = {
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "jobs": args.jobs,
        "root": str(root),
        "json": str(out.with_suffix(".json")),
        "machine_start": start_machine,
        "machine_end": machine(),
    }
    write_outputs(spec, out, header, teacher_results, cell_results, rows)
    done = sum(r["status"] == "done" for r in cell_results)
    print(f"[evidence] {done}/{len(cell_results)} cells done; wrote {out} and {out.with_suffix('.json')}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
