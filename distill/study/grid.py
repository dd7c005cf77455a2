"""`distill grid`: tasks x students x settings -> one tree of runs, run here or on a cluster.

    distill grid recipes/pawsx.yaml recipes/xnli.yaml students=albeto-tiny,albeto-base-6 \\
        grid.lr=[5e-5,1e-4] grid.batch_size=[16,32,64] --root runs/study
    ... --dry-run            print the plan and the state of every run
    ... --emit commands      write <root>/commands.sh (`accelerate launch -m distill ...` lines)
    ... --emit slurm         write <root>/slurm/ (a teacher job and a student array per task)
    ... --select             pick the best run per (task, model) and write the report

Each recipe is one task. Its teacher is fine-tuned once, in <root>/<task>/teacher (shared by
every student through `teacher.dir`), then each student x setting runs in
<root>/<task>/<student>/<setting>/ with stages `student` and, with run.baseline=true,
`baseline`. `grid.KEY=[v1,v2]` sweeps a key (`grid.lr` is `train.lr`; `grid.distill.temperature`
names a full key); other `key=value` items override every run. A student is a catalog name, hub
id or path, or an override such as `student.num_layers=2` (a student cut from the teacher). Runs
already complete are skipped: each stage folder is checked the way `distill run` checks it.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill import models
from distill.config import Config, ConfigError, load_config, to_dict, validate
from distill.study.slurm import SLURM_RUN_STEP, sbatch_header
from distill.study.report import ReportError, collect_runs, report, safe_name, select_best, student_ref, write_selection

log = logging.getLogger("distill.grid")

DEFAULT_LAUNCHER = "accelerate launch -m distill"
# short names of common sweep keys in setting folder names (lr5e-5-bs16)
ABBREVIATIONS = {
    "train.lr": "lr",
    "train.batch_size": "bs",
    "train.epochs": "ep",
    "train.weight_decay": "wd",
    "train.warmup_ratio": "wu",
    "distill.temperature": "T",
    "distill.ce_weight": "ce",
    "distill.kd_weight": "kd",
    "distill.hidden_weight": "hid",
    "distill.kd_loss": "kd-",
    "seed": "seed",
}


class GridError(ValueError):
    """A grid that cannot be expanded; the message says what was wrong and what to do."""


# --- the spec on the command line --------------------------------------------------------------
@dataclass
class GridSpec:
    """What the command line asked for, before expansion."""

    recipes: list[str]
    students: list[str] = field(default_factory=list)  # empty = each recipe's own student
    sweep: dict[str, list[Any]] = field(default_factory=dict)  # full key -> values, in order
    overrides: list[str] = field(default_factory=list)  # applied to every run
    items: list[str] = field(default_factory=list)  # the key=value items as given (for re-invoking)


def _parse_value(raw: str, item: str) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]  # type: ignore[index]
    except OmegaConfBaseException as err:
        raise GridError(f"'{item}': cannot read the value '{raw}' ({str(err).splitlines()[0]})") from None


def sweep_key(name: str) -> str:
    """`grid.lr` -> `train.lr`; `grid.distill.temperature` -> `distill.temperature`."""
    key = name[len("grid."):]
    if not key:
        raise GridError("'grid.=...' names no key; write e.g. grid.lr=[5e-5,1e-4]")
    return key if "." in key or key in ("seed",) else f"train.{key}"


def parse_items(items: Sequence[str]) -> GridSpec:
    """Split the positional items into recipes, students, swept keys and plain overrides."""
    spec = GridSpec(recipes=[])
    for item in items:
        if "=" not in item or Path(item).is_file():
            if not Path(item).is_file():
                raise GridError(f"recipe not found: {item} (items without '=' are recipe files)")
            spec.recipes.append(item)
            continue
        spec.items.append(item)
        key, raw = item.split("=", 1)
        if key == "students":
            value = _parse_value(raw, item)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, list) or not value:
                raise GridError(f"'{item}': give students as a list, e.g. students=albeto-tiny,albeto-base-6")
            spec.students.extend(str(v) for v in value)
        elif key.startswith("grid."):
            value = _parse_value(raw, item)
            values = value if isinstance(value, list) else [value]
            if not values:
                raise GridError(f"'{item}': an empty list sweeps nothing")
            spec.sweep[sweep_key(key)] = values
        else:
            spec.overrides.append(item)
    if not spec.recipes:
        raise GridError("no recipe: give at least one recipe file (e.g. recipes/pawsx.yaml)")
    return spec


def override_value(value: Any) -> str:
    """A value written back as `key=value` text that the config parser reads as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def format_setting_value(value: Any) -> str:
    """Folder-name form of a swept value: 5e-05 -> 5e-5, 0.0001 -> 1e-4, 32 -> 32."""
    if isinstance(value, float) and value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    return safe_name(override_value(value))


def setting_name(point: dict[str, Any]) -> str:
    """lr5e-5-bs16 for {train.lr: 5e-5, train.batch_size: 16}; `default` with nothing swept."""
    if not point:
        return "default"
    return "-".join(f"{ABBREVIATIONS.get(k, k.split('.')[-1])}{format_setting_value(v)}" for k, v in point.items())


def student_overrides(student: str) -> list[str]:
    """A student item -> the overrides that select it (a model, or a cut of the teacher)."""
    if "=" in student:
        key = student.split("=", 1)[0]
        if not key.startswith("student."):
            raise GridError(f"student '{student}': an override student must set a student.* key "
                            "(e.g. student.num_layers=2)")
        return ["student.model=null", student]
    return [f"student.model={student}", "student.num_layers=null", "student.from_teacher_layers=[]"]


# --- the plan ----------------------------------------------------------------------------------
@dataclass
class GridRun:
    """One job of the grid: a task's teacher, or one student with one setting."""

    kind: str  # teacher | student
    task: str
    recipe: str
    overrides: list[str]
    cfg: Config
    stages: list[str]
    student: str = ""  # folder name of the student
    setting: str = ""  # folder name of the setting
    point: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.task}/teacher" if self.kind == "teacher" else f"{self.task}/{self.student}/{self.setting}"

    @property
    def folder(self) -> Path:
        from distill.loop.plan import stage_dir

        return stage_dir(self.cfg, "teacher") if self.kind == "teacher" else Path(self.cfg.output_dir)

    def stage_states(self) -> dict[str, str]:
        """Each stage's state as the training loop sees it: fresh, resume, complete, overwrite, or
        conflict (the folder holds a run with another config)."""
        from distill.errors import StageError
        from distill.loop.folders import check_stage_dir
        from distill.loop.plan import plan_stage

        states = {}
        for stage in self.stages:
            try:
                states[stage] = check_stage_dir(plan_stage(self.cfg, stage))
            except StageError:
                states[stage] = "conflict"
        return states

    def status(self) -> str:
        """complete | resume | fresh | overwrite | conflict, for the run as a whole."""
        states = set(self.stage_states().values())
        for word in ("conflict", "overwrite"):
            if word in states:
                return word
        if states == {"complete"}:
            return "complete"
        return "resume" if states & {"complete", "resume"} else "fresh"

    def commands(self, launcher: str = DEFAULT_LAUNCHER) -> list[str]:
        """One shell command per stage (`distill student RECIPE key=value ...`)."""
        tail = " ".join(shlex.quote(x) for x in [self.recipe, *self.overrides])
        return [f"{launcher} {stage} {tail}" for stage in self.stages]


def _config(recipe: str, overrides: list[str], label: str) -> Config:
    try:
        return load_config(recipe, overrides)
    except ConfigError as err:
        raise GridError(f"{label}: {err}") from None


class RecipeConfigs:
    """`load_config(recipe, overrides)` for the many override lists of one recipe, merging the
    schema and the recipe once (a 300-run grid plans in seconds, not minutes). Any problem is
    handed to load_config, whose message names the key and the closest valid one."""

    def __init__(self, recipe: str):
        self.recipe = recipe
        self.base: Any = None
        try:
            raw = yaml.safe_load(Path(recipe).read_text()) or {}
            self.base = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(raw))
        except Exception:  # malformed or invalid recipe: load_config explains it below
            self.base = None

    def __call__(self, overrides: list[str], label: str) -> Config:
        if self.base is not None:
            try:
                cfg: Config = OmegaConf.to_object(OmegaConf.merge(self.base, OmegaConf.from_dotlist(overrides)))
                validate(cfg)
                return cfg
            except Exception:
                pass
        return _config(self.recipe, overrides, label)


def expand(spec: GridSpec, root: str | Path) -> list[GridRun]:
    """Every run of the grid in execution order: per task, the teacher, then students x settings."""
    root = Path(os.path.normpath(root))
    keys = list(spec.sweep)
    points = [dict(zip(keys, values)) for values in itertools.product(*(spec.sweep[k] for k in keys))]
    plan: list[GridRun] = []
    tasks: dict[str, str] = {}
    for recipe in spec.recipes:
        configs = RecipeConfigs(recipe)
        base = configs(list(spec.overrides), recipe)
        task = base.task.name
        if task in tasks:
            raise GridError(f"{recipe} and {tasks[task]} both have task.name={task}: their runs would "
                            "share folders; give each recipe its own task.name")
        tasks[task] = recipe
        if base.teachers and any(not t.finetuned for t in base.teachers):
            raise GridError(f"{recipe}: the grid fine-tunes one teacher per task; fine-tune the "
                            "`teachers:` with `distill run` first and mark them finetuned: true")
        task_root = root / safe_name(task)
        students = spec.students or [None]
        first = student_overrides(students[0]) if students[0] else []
        shared: list[str] = []
        if base.teacher.model and not base.teacher.finetuned:
            shared.append(f"teacher.dir={task_root / 'teacher'}")
            over = [*spec.overrides, *first, *shared, f"output_dir={task_root}"]
            plan.append(GridRun("teacher", task, recipe, over, configs(over, f"{task} teacher"), ["teacher"]))
        if base.teacher.model and not base.distill.cache_dir:
            # one teacher-output cache per task: every student with the same tokenizer reuses it
            shared.append(f"distill.cache_dir={task_root / 'teacher_cache'}")
        names: dict[str, str] = {}
        for student in students:
            chosen = student_overrides(student) if student else []
            probe = configs([*spec.overrides, *chosen], f"{task} student {student}")
            ref = student_ref(to_dict(probe))
            # catalog names get the study's names (albert-base-6-spanish), paths their last part
            name = safe_name(models.short_name(ref) if probe.student.model else ref)
            if name in names:
                raise GridError(f"students '{names[name]}' and '{student}' would share the folder "
                                f"{task_root / name}; give them different names")
            names[name] = str(student)
            for point in points:
                setting = setting_name(point)
                over = [*spec.overrides, *chosen, *(f"{k}={override_value(v)}" for k, v in point.items()),
                        *shared, f"output_dir={task_root / name / setting}"]
                cfg = configs(over, f"{task} {name} {setting}")
                stages = ["student"] + (["baseline"] if cfg.run.baseline and cfg.teacher.model else [])
                plan.append(GridRun("student", task, recipe, over, cfg, stages, name, setting, point))
    return plan


def describe(plan: Sequence[GridRun]) -> str:
    """The plan as a table: run, stages, state."""
    rows = [(r.label, ",".join(r.stages), r.status()) for r in plan]
    width = max([len(r[0]) for r in rows] + [3])
    lines = [f"{'run':<{width}}  {'stages':<16}  state"]
    lines += [f"{label:<{width}}  {stages:<16}  {state}" for label, stages, state in rows]
    counts: dict[str, int] = {}
    for _, _, state in rows:
        counts[state] = counts.get(state, 0) + 1
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


# --- running here ------------------------------------------------------------------------------
def run_plan(plan: Sequence[GridRun]) -> list[tuple[GridRun, str]]:
    """Run every unfinished run in this process, one after another; returns the failures.

    A failed teacher skips its task's students; any other failure is recorded and the grid goes
    on. A stop signal (the loop's checkpoint-and-exit) ends the grid: re-run it to resume.
    """
    from distill.loop.train import run_stage

    failures: list[tuple[GridRun, str]] = []
    failed_teachers: set[str] = set()
    for run in plan:
        if run.kind == "student" and run.task in failed_teachers:
            failures.append((run, "its teacher failed"))
            continue
        state = run.status()
        if state == "complete":
            print(f"[distill grid] {run.label}: complete, skipping", flush=True)
            continue
        if state == "conflict":
            failures.append((run, f"{run.folder} holds a run with a different config; use another --root "
                                  "or add overwrite=true"))
            if run.kind == "teacher":
                failed_teachers.add(run.task)
            continue
        print(f"[distill grid] {run.label}: {state} -> {run.folder}", flush=True)
        try:
            for stage in run.stages:
                run_stage(run.cfg, stage)
        except Exception as err:  # one broken run must not stop the other runs of the grid
            log.error("%s failed: %s: %s", run.label, type(err).__name__, err)
            failures.append((run, f"{type(err).__name__}: {err}"))
            if run.kind == "teacher":
                failed_teachers.add(run.task)
    return failures


# --- launch scripts ----------------------------------------------------------------------------
def select_command(spec: GridSpec, root: Path, compare: bool) -> str:
    """The command that selects the best runs and writes the report once the grid is done."""
    args = ["python", "-m", "distill", "grid", *spec.recipes, *spec.items, "--root", str(root), "--select"]
    if compare:
        args.append("--compare-published")
    return " ".join(shlex.quote(a) for a in args)


def commands_script(plan: Sequence[GridRun], spec: GridSpec, root: Path, launcher: str, compare: bool) -> str:
    """A shell script running every unfinished run in order (teachers before their students)."""
    todo = [r for r in plan if r.status() != "complete"]
    lines = [
        "#!/usr/bin/env bash",
        f"# distill grid: {len(todo)} of {len(plan)} runs to do (complete ones are left out; re-running a",
        "# line resumes or skips its stage). A task's students read the teacher the lines before them wrote.",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
    ]
    for run in todo:
        lines += ["", f"# {run.label}", *run.commands(launcher)]
    lines += ["", "# best run per (task, model), then the tables", select_command(spec, root, compare), ""]
    return "\n".join(lines)


def slurm_scripts(plan: Sequence[GridRun], spec: GridSpec, root: Path, launcher: str, options: Sequence[str],
                  compare: bool) -> dict[str, str]:
    """File name -> content: per task a teacher job and a student array (one task per run), a
    select job, and submit.sh that chains them with dependencies."""
    cwd = shlex.quote(os.getcwd())
    slurm = root / "slurm"
    logs = Path(os.path.abspath(slurm / "logs"))  # SLURM does not create the folder of --output
    files: dict[str, str] = {}
    submit = ["#!/bin/bash", "# Submit the grid: teachers, then their students, then the selection.",
              "set -euo pipefail", f"cd {cwd}", f"mkdir -p {shlex.quote(str(logs))}", "jobs=()"]
    tasks = list(dict.fromkeys(r.task for r in plan))
    for task in tasks:
        teacher = [r for r in plan if r.task == task and r.kind == "teacher" and r.status() != "complete"]
        students = [r for r in plan if r.task == task and r.kind == "student" and r.status() != "complete"]
        var = re.sub(r"\W", "_", task)
        dependency = ""
        if teacher:
            name = f"{safe_name(task)}.teacher.sbatch"
            body = sbatch_header(f"distill-{task}-teacher", logs, options)
            body += ["set -uo pipefail", f"cd {cwd}", 'REQUEUE_ID="$SLURM_JOB_ID"', SLURM_RUN_STEP]
            body += [f"# {teacher[0].label}", *(f"run_step {c}" for c in teacher[0].commands(launcher)), ""]
            files[name] = "\n".join(body)
            submit.append(f"t_{var}=$(sbatch --parsable {shlex.quote(str(slurm / name))}); t_{var}=${{t_{var}%%;*}}")
            dependency = f"--dependency=afterok:$t_{var} "
        if students:
            name = f"{safe_name(task)}.students.sbatch"
            body = sbatch_header(f"distill-{task}-students", logs, options, array=len(students))
            body += ["set -uo pipefail", f"cd {cwd}",
                     'REQUEUE_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"', SLURM_RUN_STEP,
                     'case "$SLURM_ARRAY_TASK_ID" in']
            for i, run in enumerate(students):
                steps = " && ".join(f"run_step {c}" for c in run.commands(launcher))
                body += [f"  {i})  # {run.label}", f"    {steps} ;;"]
            body += ['  *) echo "no run for array index $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac", ""]
            files[name] = "\n".join(body)
            submit.append(f"s_{var}=$(sbatch --parsable {dependency}{shlex.quote(str(slurm / name))}); "
                          f"jobs+=(${{s_{var}%%;*}})")
    cpu_options = [o for o in options if not re.match(r"(gres|gpus|gpus-per-\w+|gpu\w*)\b", o)]
    select = sbatch_header("distill-select", logs, cpu_options)
    select += ["set -euo pipefail", f"cd {cwd}", select_command(spec, root, compare), ""]
    files["select.sbatch"] = "\n".join(select)
    submit += [
        'after=""',
        'if [ "${#jobs[@]}" -gt 0 ]; then after="--dependency=afterany:$(IFS=:; echo "${jobs[*]}")"; fi',
        f"sbatch $after {shlex.quote(str(slurm / 'select.sbatch'))}",
        "",
    ]
    files["submit.sh"] = "\n".join(submit)
    return files


def write_files(folder: Path, files: dict[str, str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        path = folder / name
        path.write_text(text)
        if name.endswith((".sh", ".sbatch")):
            path.chmod(0o755)
        paths.append(path)
    return paths


# --- selection and report ----------------------------------------------------------------------
def select_and_report(root: Path, compare: bool = False) -> Optional[Path]:
    """best.json + best/ for the finished runs under `root`, then the tables in <root>/report."""
    if not root.is_dir():
        print(f"distill grid: nothing to select, {root} does not exist", file=sys.stderr)
        return None
    runs = collect_runs(root)
    if not runs:
        print(f"distill grid: no finished runs under {root} yet", file=sys.stderr)
        return None
    best_file = write_selection(root, select_best(runs))
    _, paths = report(root, compare=compare)
    print(paths["markdown"].read_text())
    print(f"[distill grid] selection: {best_file}; tables: {paths['markdown'].parent}")
    return best_file


# --- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill grid",
        description="Expand recipes (tasks) x students x settings into one tree of runs; run them one "
        "after another here, or write launch commands / SLURM scripts; then select the best run per "
        "(task, model) and write the study's tables.",
        epilog="example: distill grid recipes/pawsx.yaml students=albeto-tiny,albeto-base-6 "
        "grid.lr=[5e-5,1e-4] grid.batch_size=[16,32,64] --root runs/study",
    )
    p.add_argument("items", nargs="+", help="recipe files, students=a,b, grid.KEY=[v1,v2] and key=value overrides")
    p.add_argument("--root", default="runs/grid", help="the output tree (default runs/grid)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and each run's state; run nothing")
    mode.add_argument("--emit", choices=("commands", "slurm"), help="write launch scripts instead of running")
    mode.add_argument("--select", action="store_true", help="only select the best runs and write the report")
    p.add_argument("--launcher", default=DEFAULT_LAUNCHER,
                   help=f"how emitted commands start distill (default '{DEFAULT_LAUNCHER}')")
    p.add_argument("--slurm-opt", action="append", default=[], metavar="OPT",
                   help="an extra #SBATCH option, repeatable: --slurm-opt partition=gpu --slurm-opt gres=gpu:1")
    p.add_argument("--compare-published", action="store_true", help="put the published numbers in the report")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(os.path.normpath(args.root))
    try:
        spec = parse_items(args.items)
        if args.select:
            return 0 if select_and_report(root, args.compare_published) else 1
        plan = expand(spec, root)
        print(describe(plan), flush=True)
        if args.dry_run:
            return 0
        if args.emit == "commands":
            (path,) = write_files(root, {"commands.sh": commands_script(plan, spec, root, args.launcher,
                                                                        args.compare_published)})
            print(f"wrote {path}: run it with `bash {path}`")
            return 0
        if args.emit == "slurm":
            options = [o.lstrip("-") for o in args.slurm_opt]
            paths = write_files(root / "slurm", slurm_scripts(plan, spec, root, args.launcher, options,
                                                               args.compare_published))
            print("wrote " + ", ".join(str(p) for p in paths) + f"\nsubmit with `bash {root / 'slurm' / 'submit.sh'}`")
            return 0
        failures = run_plan(plan)
        select_and_report(root, args.compare_published)
    except (GridError, ReportError) as err:
        print(f"distill grid: {err}", file=sys.stderr)
        return 2
    if failures:
        print(f"distill grid: {len(failures)} run(s) did not finish:", file=sys.stderr)
        for run, why in failures:
            print(f"  {run.label}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
