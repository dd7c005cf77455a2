"""Every stage of a command checked before the first one trains.

`preflight(cfg, stages)` plans each stage and runs `setup.check_models` on model configs and
tokenizers only (no weights), so a broken student setting does not surface only after hours of
teacher fine-tuning. A student whose teacher is not fine-tuned yet is checked against the
pretrained teacher, which has the same tokenizer, depth and width (the teacher stage gives it the
data's labels). The rows are checked against the tokenizers' windows (a QA question too long for
a teacher's own `max_length`), transfer files are read (columns, encoding) and a masked LM that
proposes augmentation words is loaded (its head). Every stage repeats its full checks when it
starts; this only moves the failures earlier.
"""

from __future__ import annotations

from typing import Any, Sequence

from distill import models
from distill.config import Config
from distill.data.features import load_data
from distill.loop.folders import check_stage_dir, check_writable
from distill.loop.plan import StagePlan, plan_stage
from distill.loop.setup import bind_tokenizers, check_lengths, check_metrics, check_models
from distill.loop.trim import check_trim
from distill.models.load import student_config as load_student_config
from distill.objective.losses import POSITION_TERMS
from distill.tasks import get_task
from distill.tasks.base import Task


def preflight(cfg: Config, stages: Sequence[str]) -> None:
    """Check the inputs of every stage about to run (StageError, DataError, ModelLoadError)."""
    task = get_task(cfg.task, cfg.data)
    raw = load_data(cfg.data, cfg.seed, task)
    if "student" in stages and cfg.data.transfer:
        from distill.data.transfer import check_transfer

        check_transfer(raw, cfg.task.family, cfg.data.columns, cfg.data.transfer)
    for name in stages:
        plan = plan_stage(cfg, name)
        if check_stage_dir(plan) == "complete":
            continue
        check_writable(plan.folder, keep=False)
        check_metrics(task, plan.train.select_metric)
        check_model_configs(plan, task, raw)
        if plan.kind == "student" and plan.augment.copies > 0 and plan.augment.method == "mlm":
            from distill.data.augment import load_model

            load_model("mlm", plan.augment.model)  # a masked LM with its trained head


def check_model_configs(plan: StagePlan, task: Task, raw: Any = None) -> None:
    """`setup.check_models` on the stage's configs and tokenizers, loaded without weights (`task`
    has read its labels from the data), and, given the raw splits `raw`, that every row fits the
    tokenizers' windows (`task.check_windows`: QA questions, in a teacher's own windows too)."""
    base = plan.base
    if plan.kind == "teacher":
        config = models.load_config(base.model, base.revision, base.trust_remote_code)
        tokenizer = models.load_tokenizer(base.model, base.revision, base.trust_remote_code)
        check_lengths(plan.data.max_length, "data.max_length", config)
        task.bind(tokenizer)  # e.g. a QA model's tokenizer must pad on the right
        if raw is not None:
            task.check_windows(raw)
        return
    configs: list[Any] = []
    toks: list[Any] = []
    for t in plan.teachers:
        # not fine-tuned yet: the pretrained teacher has the same tokenizer, depth and width
        src, revision = (t.source, t.source_revision) if t.ready else (t.model, t.revision)
        configs.append(models.load_config(src, revision, t.trust_remote_code))
        if t.ready:
            models.label_order(configs[-1], task.labels, f"teacher '{src}'")
        toks.append(models.load_tokenizer(src, revision, t.trust_remote_code))
    s = plan.student
    student_config = load_student_config(base, s)  # cut to the student's layers when it is cut
    if s.model:
        tokenizer = models.load_tokenizer(s.model, s.revision, s.trust_remote_code)
    else:
        tokenizer = models.load_tokenizer(base.model, base.revision, base.trust_remote_code)
    objective, apart, planning = check_models(plan, task, student_config, tokenizer, configs, toks)
    if raw is not None:
        task.check_windows(raw)
    check_trim(plan, tokenizer, toks, [n for n in objective.terms if n in POSITION_TERMS])  # student.vocab.trim
    for i in apart:  # each teacher of another tokenizer on its own copy of the task
        bind_tokenizers(get_task(plan.task, plan.data), tokenizer, toks[i], plan_tokenizers=planning)
