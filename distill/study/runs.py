"""The finished runs under a folder, and the choice of the best run of each (block, task, model).

Reads only what the runs wrote: each stage folder's metrics.json and config.yaml. Teachers and
baselines (a model fine-tuned alone) form the Fine-tuning block; students distilled from a
teacher form the Task-specific Knowledge Distillation block. Several runs of one (block, task,
model), e.g. a learning-rate grid, are reduced to the best by the validation value of the run's
`info.select_metric` (lower is better for loss), or taken from the best.json that `distill grid
--select` wrote when it is current. `distill report` (report.py) builds the tables from them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from distill.config.search_space import LOWER_IS_BETTER
from distill.study.published import DISTILLED, FINETUNED

log = logging.getLogger("distill.report")

BEST_FILE = "best.json"
BEST_TREE = "best"
SKIP_DIRS = {"model", "checkpoints", "teacher_cache", ".best-tmp", ".model-tmp", BEST_TREE}


class ReportError(RuntimeError):
    """A run tree that cannot be reported; the message says what was wrong and where."""


# --- runs --------------------------------------------------------------------------------------
def _get(tree: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def student_ref(config: dict[str, Any]) -> str:
    """How a run names its student: the model reference (`<model>-N-layers` for a cut of it), or
    `layers-N` / `layers-0-6-11` for a student cut out of the teacher (the same name whatever the
    teacher, like the study's rows); `-trimmed` when its vocabulary is trimmed to the task."""
    model = _get(config, "student.model")
    trimmed = "-trimmed" if _get(config, "student.vocab.trim") else ""
    n = _get(config, "student.num_layers")
    if model:
        return f"{model}{f'-{n}-layers' if n else ''}{trimmed}"  # a cut of the model: its own row
    layers = _get(config, "student.from_teacher_layers") or []
    if layers:
        return "layers-" + "-".join(str(i) for i in layers) + trimmed
    if n:
        return f"layers-{n}{trimmed}"
    raise ReportError("the config names no student (student.model, from_teacher_layers or num_layers)")


def model_title(ref: str) -> str:
    """A short display name: catalog names and `layers-N` as they are, the last part of a hub
    id or path otherwise."""
    return Path(ref.rstrip("/")).name if "/" in ref else ref


def safe_name(ref: str) -> str:
    """A folder-name form of a model reference (hub ids keep their organisation)."""
    if Path(ref).is_absolute() or ref.startswith("."):
        ref = Path(ref.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", ref).strip("-") or "model"


@dataclass
class Run:
    """One completed stage folder (teacher, student or baseline) and what the report needs of it."""

    path: Path
    stage: str
    task: str
    family: str
    block: str  # finetuned | distilled
    model: str  # model reference (catalog name, hub id, path, layers-N)
    metrics: dict[str, Any]
    config: dict[str, Any] = field(repr=False)

    @property
    def info(self) -> dict[str, Any]:
        return self.metrics.get("info", {})

    @property
    def parameters(self) -> Optional[int]:
        value = self.info.get("parameters")
        return int(value) if value is not None else None

    def selection(self) -> tuple[str, Optional[float]]:
        """(select metric, its validation value or None when the run has no validation score)."""
        metric = self.info.get("select_metric") or self.info.get("metric") or "loss"
        value = self.metrics.get("validation", {}).get(metric)
        return metric, (float(value) if value is not None else None)

    def score(self, split: str, metric: str) -> Optional[float]:
        """A split's metric in percent (as the tables print it), None when missing."""
        value = self.metrics.get(split, {}).get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return 100.0 * float(value)


def _read_config(path: Path) -> dict[str, Any]:
    """config.yaml as a plain dict. The file is the resolved config, so plain YAML is enough for
    the few keys the report reads; skipping schema validation keeps a 600-run tree fast and
    lets runs written by an older schema still be reported."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ReportError(f"{path} is not valid YAML ({err}); re-run that stage") from None
    return raw if isinstance(raw, dict) else {}


def load_run(stage_dir: Path) -> Run:
    """The Run of a stage folder that holds metrics.json and config.yaml."""
    try:
        metrics = json.loads((stage_dir / "metrics.json").read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{stage_dir / 'metrics.json'} is not valid JSON ({err}); re-run that stage") from None
    config = _read_config(stage_dir / "config.yaml")
    info = metrics.get("info", {})
    stage = info.get("stage") or stage_dir.name
    task = info.get("task") or _get(config, "task.name") or "task"
    family = info.get("family") or _get(config, "task.family") or "classification"
    if stage == "teacher":
        model = _get(config, "teacher.model")
        if not model:
            raise ReportError(f"{stage_dir}: a teacher stage whose config.yaml has no teacher.model")
        block = FINETUNED
    else:
        try:
            model = student_ref(config)
        except ReportError as err:
            raise ReportError(f"{stage_dir}: {err}") from None
        # A student stage without a teacher is plain fine-tuning, like a baseline.
        block = DISTILLED if stage == "student" and info.get("teacher") else FINETUNED
    return Run(stage_dir, stage, str(task), str(family), block, str(model), metrics, config)


def collect_runs(root: Path) -> list[Run]:
    """Every completed stage under `root` (folders holding metrics.json and config.yaml), in
    path order. Symlinks are not followed, so a best/ tree is never counted twice."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"no such run folder: {root}")
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        if "metrics.json" in filenames and "config.yaml" in filenames:
            runs.append(load_run(Path(dirpath)))
    return runs


# --- selection ---------------------------------------------------------------------------------
Key = tuple[str, str, str]  # (block, task, model)


def _better(metric: str, new: float, best: float) -> bool:
    return new < best if metric in LOWER_IS_BETTER else new > best


def select_best(runs: Iterable[Run]) -> dict[Key, Run]:
    """The best run of every (block, task, model) by its validation select metric.

    Runs are compared on the metric most of the group selects by (a group mixing metrics is
    reported); runs without a validation value lose to any that has one; ties go to the first
    in path order.
    """
    groups: dict[Key, list[Run]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: str(r.path)):
        groups[(run.block, run.task, run.model)].append(run)
    best: dict[Key, Run] = {}
    for key, group in groups.items():
        metrics = [r.selection()[0] for r in group]
        metric = max(set(metrics), key=metrics.count)
        if len(set(metrics)) > 1:
            log.warning("%s: runs select by different metrics %s; comparing on '%s'",
                        "/".join(key), sorted(set(metrics)), metric)
        chosen: Optional[Run] = None
        chosen_value: Optional[float] = None
        for run in group:
            m, value = run.selection()
            if m != metric or value is None:
                continue
            if chosen_value is None or _better(metric, value, chosen_value):
                chosen, chosen_value = run, value
        if chosen is None:
            chosen = group[0]
            if len(group) > 1:
                log.warning("%s: no run has a validation '%s'; taking %s", "/".join(key), metric, chosen.path)
        best[key] = chosen
    return best


def write_selection(root: Path, best: dict[Key, Run]) -> Path:
    """<root>/best.json (the chosen stage folder of every (block, task, model), with the value it
    won by) and <root>/best/<block>/<task>/<model> symlinks to those folders."""
    root = Path(root)
    entries = []
    tree = root / BEST_TREE
    for (block, task, model), run in sorted(best.items()):
        metric, value = run.selection()
        rel = os.path.relpath(run.path, root)
        entries.append({"block": block, "task": task, "model": model, "stage_dir": rel,
                        "select_metric": metric, "validation_value": value})
        link = tree / block / safe_name(task) / safe_name(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(run.path, link.parent), target_is_directory=True)
    path = root / BEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"runs": entries}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_selection(root: Path, runs: Sequence[Run]) -> Optional[dict[Key, Run]]:
    """The selection in <root>/best.json, or None when there is none or it is out of date (a
    run it lists is gone, or some run finished after it was written)."""
    path = Path(root) / BEST_FILE
    if not path.exists():
        return None
    written = path.stat().st_mtime
    newer = [r.path for r in runs if (r.path / "metrics.json").stat().st_mtime > written]
    if newer:
        log.info("%s is older than %d finished run(s) (e.g. %s); selecting again", path, len(newer), newer[0])
        return None
    by_path = {os.path.normpath(os.path.relpath(r.path, root)): r for r in runs}
    try:
        entries = json.loads(path.read_text())["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        log.warning("%s is unreadable (%s); selecting again", path, err)
        return None
    best: dict[Key, Run] = {}
    for entry in entries:
        run = by_path.get(os.path.normpath(entry["stage_dir"]))
        if run is None:
            log.info("%s lists %s, which is no longer a finished run; selecting again", path, entry["stage_dir"])
            return None
        best[(run.block, run.task, run.model)] = run
    return best
