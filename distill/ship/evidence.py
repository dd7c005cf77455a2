"""What a finished run left on disk about one trained model, and the Hub names derived from it.

Everything comes from the files a run leaves behind (DESIGN: downstream tools read only
`metrics.json`, `config.yaml` and `summary.json`), never from a training process:
    <run>/<stage>/metrics.json   the model's validation/test scores and run info
    <run>/<stage>/config.yaml    the resolved recipe
    <teacher>/metrics.json       the fine-tuned teacher's scores: `teacher.dir` when the recipe
                                 sets it (a grid's students share one teacher), else <run>/teacher;
                                 with `teachers:` each one's (`teachers[i].dir`, else <run>/teacher-<i>)
    <run>/baseline/metrics.json  the student fine-tuned alone (when run.baseline=true)
    <run>/summary.json           parameters and CPU latency measured at the end of `distill run`
A stage folder without metrics.json (an unfinished stage) is refused, not read in part.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from distill import models
from distill.config import (
    TEACHER_STAGE,
    Config,
    ConfigError,
    load_config,
    main_teacher,
    teacher_list,
    teacher_of_stage,
)

log = logging.getLogger("distill.ship.evidence")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATA_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".conll", ".arrow"}
KNOWN_HUB_IDS = {"all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}


class ExportError(RuntimeError):
    """A run folder that cannot be exported; the message says what is missing and what to do."""


@dataclass
class RunEvidence:
    """What a run left on disk about one trained model, read once for the card and the export."""

    stage_dir: Path
    cfg: Config
    metrics: dict[str, Any]  # this stage's metrics.json
    model_config: dict[str, Any]  # the saved model's config.json
    teacher: Optional[dict[str, Any]] = None  # <run>/teacher/metrics.json (several: the best one's)
    baseline: Optional[dict[str, Any]] = None  # <run>/baseline/metrics.json
    summary: list[dict[str, Any]] = field(default_factory=list)  # <run>/summary.json rows
    # every teacher in recipe order: {"stage", "model", "finetuned", "metrics" (None when not
    # fine-tuned in a stage of this run, or its folder is gone)}
    teachers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def info(self) -> dict[str, Any]:
        return self.metrics.get("info", {})

    @property
    def stage(self) -> str:
        return self.info.get("stage") or self.stage_dir.name

    @property
    def distilled(self) -> bool:
        return bool(self.info.get("teacher"))

    @property
    def metric(self) -> str:
        return self.info.get("metric") or self.cfg.task.metric or "accuracy"

    def summary_row(self, stage: str) -> Optional[dict[str, Any]]:
        """`stage`'s row of summary.json (None when the summary did not time it)."""
        return next((r for r in self.summary if r.get("stage") == stage), None)

    def teacher_row(self) -> Optional[dict[str, Any]]:
        """The summary row speeds are relative to: the (first) teacher's."""
        return next((r for r in self.summary if str(r.get("stage", "")).startswith("teacher")), None)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); re-run the stage") from None


def load_evidence(stage_dir: str | Path) -> RunEvidence:
    """Read a finished stage folder (`<output_dir>/student`) and its siblings."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise ExportError(f"{stage_dir} is not a folder: pass a stage folder such as runs/demo/student")
    needed = {
        "model/config.json": "the saved model",
        "metrics.json": "the final scores (written last: its absence means the stage did not finish)",
        "config.yaml": "the resolved recipe",
    }
    missing = [f"{name} ({why})" for name, why in needed.items() if not (stage_dir / name).exists()]
    if missing:
        raise ExportError(
            f"{stage_dir} is not a finished stage folder; missing: {'; '.join(missing)}. "
            "Run `distill run RECIPE` to completion first (it resumes where it stopped)."
        )
    try:
        cfg = load_config(stage_dir / "config.yaml")
    except ConfigError as err:
        raise ExportError(f"{stage_dir / 'config.yaml'} cannot be read as a recipe: {err}") from None
    run_dir = stage_dir.parent
    metrics = _read_json(stage_dir / "metrics.json")

    def sibling(name: str, folder: Path) -> Optional[dict]:
        path = folder / "metrics.json"
        itself = name == stage_dir.name or folder.resolve() == stage_dir.resolve()
        return _read_json(path) if path.exists() and not itself else None

    teachers = []
    for i, t in enumerate(teacher_list(cfg)):
        name = f"teacher-{i}" if cfg.teachers else "teacher"
        folder = teacher_folder(cfg, stage_dir, i)
        scores = sibling(name, folder)
        if scores is None and t.dir and stage_dir.name != name and not t.finetuned:
            log.warning(
                "no teacher metrics at %s (%s.dir): the card has no score for this teacher. Export "
                "from the folder `distill run` ran in, or where the dir points to the teacher stage",
                folder / "metrics.json", f"teachers[{i}]" if cfg.teachers else "teacher",
            )
        teachers.append({"stage": name, "model": t.model, "finetuned": t.finetuned, "metrics": scores})
    scored = [t["metrics"] for t in teachers if t["metrics"]]
    metric = (metrics.get("info") or {}).get("metric") or cfg.task.metric or "accuracy"
    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path) if summary_path.exists() else []
    return RunEvidence(
        stage_dir=stage_dir,
        cfg=cfg,
        metrics=metrics,
        model_config=_read_json(stage_dir / "model" / "config.json"),
        teacher=max(scored, key=lambda m: _score(m, metric), default=None),
        baseline=sibling("baseline", run_dir / "baseline"),
        summary=summary if isinstance(summary, list) else [],
        teachers=teachers,
    )


def _score(metrics: dict, metric: str) -> float:
    """A stage's test score (validation when it has no test split) for picking the best teacher."""
    for split in ("test", "validation"):
        value = metrics.get(split, {}).get(metric)
        if isinstance(value, (int, float)):
            return float(value)
    return float("-inf")


def teacher_folder(cfg: Config, stage_dir: Path, index: int = 0) -> Path:
    """Teacher `index`'s stage folder, by the stage-folder rule: its `dir` when the recipe sets
    it, else `teacher/` (with `teachers:`, `teacher-<i>/`) beside this stage (= under
    `<output_dir>`, and still right when the whole run folder was moved)."""
    name = f"teacher-{index}" if cfg.teachers else "teacher"
    teachers = teacher_list(cfg)
    t = teachers[index] if teachers else cfg.teacher
    return Path(t.dir) if t.dir else stage_dir.parent / name


def trusts_remote_code(cfg: Config, stage: str) -> bool:
    """Whether the recipe lets `stage`'s saved model run code shipped with it: a teacher stage
    (`teacher`, `teacher-<i>`) follows its teacher's `trust_remote_code`; the student and the
    baseline follow the model they start from (`student.model`, else the teacher a layer-subset
    student is cut from). Passed explicitly, so transformers never asks on the terminal."""
    if stage == "teacher" or TEACHER_STAGE.match(stage):
        return bool(teacher_of_stage(cfg, stage).trust_remote_code)
    return bool((cfg.student if cfg.student.model else main_teacher(cfg)).trust_remote_code)


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def hub_id_of(name: Optional[str]) -> Optional[str]:
    """The Hub id behind a model reference (catalog name, hub id), or None for local paths."""
    if not name:
        return None
    if name in KNOWN_HUB_IDS:
        return KNOWN_HUB_IDS[name]
    try:
        return models.resolve_student(name)[0]
    except KeyError:
        pass
    if Path(name).exists() or name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        return None
    return name


def hub_dataset_id(cfg: Config) -> Optional[str]:
    """The Hub dataset the run trained on, or None when it read local files."""
    src = cfg.data.source
    if not src or cfg.data.files:
        return None
    if Path(src).suffix.lower() in _DATA_SUFFIXES or Path(src).exists() or src.startswith((".", "/", "~")):
        return None
    return src if _HUB_ID.match(src) else None


def student_name(cfg: Config) -> str:
    """The student's part of a Hub name: study naming for catalog students
    (albeto-base-6 -> albert-base-6-spanish), `<model>-<k>-layers` for a cut (of `student.model`,
    or of the teacher when it is unset), and `-trimmed` for a vocabulary trimmed to the task."""
    s = cfg.student
    name = models.short_name(s.model or main_teacher(cfg).model or "teacher")
    k = len(s.from_teacher_layers) or s.num_layers
    if k:
        name += f"-{k}-layers"
    return name + ("-trimmed" if s.vocab.trim else "")


def repo_name(cfg: Config, org: str) -> str:
    """`hub.repo_id` with `{org}`, `{student}` and `{task}` filled in."""
    try:
        return cfg.hub.repo_id.format(org=org, student=student_name(cfg), task=cfg.task.name)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"hub.repo_id='{cfg.hub.repo_id}' has an unknown or malformed placeholder ({err}); "
            "use only {org}, {student} and {task}, e.g. '{org}/{student}-distilled-{task}'"
        ) from None
