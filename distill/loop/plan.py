"""A stage, resolved once from the recipe and its name into a `StagePlan`.

    plan = plan_stage(cfg, "teacher-1")    # or "teacher", "student", "baseline"
    plan.kind, plan.folder, plan.seed, plan.train, plan.teachers, plan.identity

The plan answers, in one place, which stage this is (`kind`: which loss terms it trains with),
where it writes, which training section and seed apply, which teachers it distils from (each
with its source, folder, tokenizer settings and windows), which model it starts from, its data
sections and its identity (the config keys that determine its result). `run_stage` builds it;
setup, the loop and the finish step read the plan and its sections, never the whole recipe.

A teacher stage is always the one-teacher case: `teacher-<i>` of a recipe with `teachers:` runs
the recipe with `teacher` set to that entry (its own seed and folder), so a teacher of a list
and the same teacher given alone train, skip and resume alike, and its folder's config.yaml says
which teacher it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from distill.config import (
    TEACHER_STAGE, AugmentConfig, Config, DataConfig, DistillConfig, StudentConfig, TaskConfig, TeacherConfig,
    TrackingConfig, TrainConfig, main_teacher, stage_train, teacher_list, teacher_of_stage, teacher_stage_name, to_dict,
)
from distill.errors import StageError

KINDS = ("teacher", "student", "baseline")  # what a stage trains: see loop/train.py

# Keys that never change a stage's result: bookkeeping, trackers, the Hub, the search around it,
# how often it logs or checkpoints, and whether the teacher's outputs are cached or recomputed.
NOT_IDENTITY = ("tracking", "hub", "overwrite", "checkpoint", "output_dir", "run", "search")
NOT_IDENTITY_TRAIN = ("logging_steps", "checkpoint_steps", "keep_checkpoints", "num_workers", "max_skipped_steps")
NOT_IDENTITY_DISTILL = ("teacher_outputs", "cache_hidden_states", "cache_dir")
# where a teacher's folder lies is not what it holds (a copied or moved teacher is the same one)
NOT_IDENTITY_TEACHER = ("dir",)


@dataclass(frozen=True)
class TeacherPlan:
    """One teacher a student distils from."""

    index: int  # in `teachers:` (0 for the one `teacher:`)
    model: str  # the recipe's id or path: pretrained (fine-tuned by `stage`) or, finetuned, as is
    finetuned: bool
    revision: Optional[str]
    trust_remote_code: bool
    stage: str  # the stage that fine-tunes it: `teacher` or `teacher-<i>`
    folder: Path  # that stage's folder
    max_length: Optional[int]  # its own QA windows (None = data.max_length / data.doc_stride)
    doc_stride: Optional[int]

    @property
    def key(self) -> str:
        """How the recipe names it in messages."""
        return "teacher" if self.stage == "teacher" else f"teachers[{self.index}]"

    @property
    def ready(self) -> bool:
        return self.finetuned or (self.folder / "model").exists()

    @property
    def source(self) -> str:
        """Where the fine-tuned weights are: the given model, or the teacher stage's model/."""
        return self.model if self.finetuned else str(self.folder / "model")

    @property
    def source_revision(self) -> Optional[str]:
        return self.revision if self.finetuned else None

    @property
    def windows(self) -> tuple[Optional[int], Optional[int]]:
        return self.max_length, self.doc_stride

    def require(self) -> str:
        """`source`, or a StageError saying how to get the fine-tuned teacher."""
        if not self.ready:
            run = "`distill teacher`" if self.stage == "teacher" else f"`distill teacher --index {self.index}`"
            raise StageError(
                f"no fine-tuned teacher at {self.folder / 'model'}: run {run} (or `distill run`) first, "
                f"or set {self.key}.finetuned=true with {self.key}.model pointing at a fine-tuned model"
            )
        return self.source


@dataclass(frozen=True)
class StagePlan:
    """Everything that says what a stage is, before anything is loaded."""

    name: str  # as asked: teacher, teacher-<i>, student, baseline
    kind: str  # teacher | student | baseline
    folder: Path
    recipe: Config  # the stage's own config: saved as config.yaml, sent to the trackers
    train: TrainConfig  # the training section that applies (a teacher's lr/batch/epochs over `train`)
    seed: int
    teachers: tuple[TeacherPlan, ...]  # the student's teachers, in order (empty for other stages)
    main: int  # the teacher the hidden/attention/relation terms follow
    base: TeacherConfig  # the pretrained model a teacher stage trains / a cut student is cut from
    identity: dict[str, Any]

    # the sections the stage's parts read
    @property
    def task(self) -> TaskConfig:
        return self.recipe.task

    @property
    def data(self) -> DataConfig:
        return self.recipe.data

    @property
    def student(self) -> StudentConfig:
        return self.recipe.student

    @property
    def distill(self) -> DistillConfig:
        return self.recipe.distill

    @property
    def augment(self) -> AugmentConfig:
        return self.recipe.augment

    @property
    def tracking(self) -> TrackingConfig:
        return self.recipe.tracking

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output_dir)

    @property
    def overwrite(self) -> bool:
        return self.recipe.overwrite

    @property
    def cache_dir(self) -> Path:
        d = self.recipe.distill.cache_dir
        return Path(d) if d else self.output_dir / "teacher_cache"

    @property
    def main_teacher(self) -> Optional[TeacherPlan]:
        return self.teachers[self.main] if self.teachers else None


def plan_stage(cfg: Config, name: str) -> StagePlan:
    """Resolve stage `name` of the recipe `cfg` (StageError for a name the recipe has not)."""
    recipe, kind = _resolve(cfg, name)
    teachers: tuple[TeacherPlan, ...] = ()
    if kind == "student":
        teachers = tuple(
            TeacherPlan(
                index=i, model=t.model or "", finetuned=t.finetuned, revision=t.revision,
                trust_remote_code=t.trust_remote_code, stage=teacher_stage_name(recipe, i),
                folder=stage_dir(recipe, teacher_stage_name(recipe, i)), max_length=t.max_length, doc_stride=t.doc_stride,
            )
            for i, t in enumerate(teacher_list(recipe))
        )
    return StagePlan(
        name=name, kind=kind, folder=stage_dir(recipe, kind), recipe=recipe, train=stage_train(recipe, kind),
        seed=recipe.seed, teachers=teachers,
        main=recipe.distill.intermediate_teacher if len(teachers) > 1 else 0,
        base=main_teacher(recipe), identity=stage_view(recipe, kind),
    )


def _resolve(cfg: Config, name: str) -> tuple[Config, str]:
    """(the stage's config, its kind) for a stage name."""
    match = TEACHER_STAGE.match(name)
    if match:
        if not cfg.teachers:
            raise StageError(f"stage '{name}' needs `teachers:`; this recipe's one teacher is stage 'teacher'")
        teacher_of_stage(cfg, name)  # in range
        return teacher_stage_config(cfg, int(match.group(1))), "teacher"
    if name == "teacher":
        if cfg.teachers:
            names = ", ".join(f"teacher-{i}" for i in range(len(cfg.teachers)))
            raise StageError(f"the recipe lists {len(cfg.teachers)} teachers: name one of the stages {names}")
        if not cfg.teacher.model:
            raise StageError("the teacher stage needs teacher.model (a hub id or path)")
        return teacher_stage_config(cfg, 0), "teacher"
    if name not in KINDS:
        raise StageError(f"unknown stage '{name}' ({', '.join(KINDS)}, or teacher-<i> with `teachers:`)")
    return cfg, name


def stage_dir(cfg: Config, stage: str) -> Path:
    """`<output_dir>/<stage>`; a teacher stage (`teacher`, or `teacher-<i>` of `teachers:`) goes
    to its teacher's `dir` when set."""
    if stage == "teacher" and cfg.teacher.dir:
        return Path(cfg.teacher.dir)
    if TEACHER_STAGE.match(stage):
        teacher = teacher_of_stage(cfg, stage)
        if teacher.dir:
            return Path(teacher.dir)
    return Path(cfg.output_dir) / stage


def teacher_stages(cfg: Config) -> list[str]:
    """The stages that fine-tune the recipe's teachers (those not `finetuned` already), in order:
    `teacher` for the one `teacher:`, `teacher-<i>` for each entry of `teachers:`."""
    if not cfg.teachers:
        return ["teacher"] if cfg.teacher.model and not cfg.teacher.finetuned else []
    return [f"teacher-{i}" for i, t in enumerate(cfg.teachers) if not t.finetuned]


def teacher_stage_config(cfg: Config, index: int) -> Config:
    """The config that fine-tunes teacher `index` as an ordinary `teacher` stage: `teacher` is
    that teacher (its folder resolved), `teachers` is empty, and the teacher's own `seed` (when
    set) replaces the recipe's. The one `teacher:` without a seed of its own gives `cfg` itself."""
    teachers = teacher_list(cfg)
    if not 0 <= index < len(teachers):
        raise StageError(f"no teacher {index}: the recipe has {len(teachers)} (0..{len(teachers) - 1})")
    t = teachers[index]
    seed = cfg.seed if t.seed is None else t.seed
    if not cfg.teachers:
        return cfg if seed == cfg.seed else replace(cfg, seed=seed)
    t = replace(t, dir=str(stage_dir(cfg, f"teacher-{index}")))
    # the combination keys mean nothing to one teacher (and are not part of its identity)
    d = replace(cfg.distill, intermediate_teacher=0, teacher_combine="mean", teacher_weights=[])
    return replace(cfg, teacher=t, teachers=[], distill=d, seed=seed)


def stage_view(cfg: Config, kind: str) -> dict[str, Any]:
    """The part of the config that determines a stage's outputs (what 'same config' means).

    The teacher stage ignores the student and distillation settings, so every student of a grid
    can share one fine-tuned teacher; the baseline ignores the distillation settings; no stage
    depends on where a teacher's folder lies.
    """
    full = to_dict(cfg)
    if kind == "teacher":
        view = {k: full[k] for k in ("task", "data", "teacher", "seed")}
        # the teacher's windows during distillation (QA across tokenizers) are the student's business
        view["teacher"] = {k: v for k, v in view["teacher"].items() if k not in ("max_length", "doc_stride", "dir")}
        view["train"] = to_dict(stage_train(cfg, "teacher"))  # type: ignore[arg-type]
    else:
        view = {k: v for k, v in full.items() if k not in NOT_IDENTITY}
        view["distill"] = {k: v for k, v in view["distill"].items() if k not in NOT_IDENTITY_DISTILL}
        view["teacher"] = {k: v for k, v in view["teacher"].items() if k not in NOT_IDENTITY_TEACHER}
        view["teachers"] = [{k: v for k, v in t.items() if k not in NOT_IDENTITY_TEACHER} for t in view["teachers"]]
        if "augment" in view:
            view["augment"] = {k: v for k, v in view["augment"].items() if k not in ("batch_size", "cache_dir")}
    if kind != "student":  # transfer sets and augmented rows are the student's alone
        view.pop("distill", None)
        view.pop("augment", None)
        view["data"] = {k: v for k, v in view["data"].items() if k != "transfer"}
    view["train"] = {k: v for k, v in view["train"].items() if k not in NOT_IDENTITY_TRAIN}
    return view


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two identities (for the message that refuses
    a folder holding another run)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[str] = []
        for k in sorted(set(before) | set(after), key=str):
            out += changed_keys(before.get(k), after.get(k), f"{prefix}{k}.")
        return out
    return [] if before == after else [prefix.rstrip(".")]
