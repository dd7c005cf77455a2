"""The checks of a config that go beyond types: choices, ranges and combinations of keys, each
error naming the key (and the entry of a list) and what to do. Everything here runs before any
data or model is read (`distill.loop.preflight` checks what needs them)."""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import fields
from pathlib import Path

from omegaconf import OmegaConf

from distill.errors import ConfigError
from distill.config.search_space import check_section, leaf_types
from distill.config.schema import Config, DistillConfig, SearchConfig, TeacherConfig, VocabConfig, has_teacher, stage_train, teacher_list


FAMILIES = ("classification", "tagging", "qa")


CHOICES = {
    "task.family": FAMILIES,
    "task.normalization": ("squad", "mlqa"),
    "distill.kd_loss": ("kl", "ce", "mse"),
    "distill.hidden_loss": ("mse", "cosine"),
    "distill.teacher_outputs": ("auto", "cached", "online"),
    "distill.teacher_combine": ("mean", "weighted", "confident"),
    "distill.cache_hidden_dtype": ("float32", "float16", "bfloat16"),
    "data.format": (None, "jsonl", "json", "csv", "tsv", "conll", "conllu", "squad", "parquet"),
}


def validate(cfg: Config) -> None:
    """Checks that go beyond types: choices, ranges and combinations."""
    flat = {
        "task.family": cfg.task.family,
        "task.normalization": cfg.task.normalization,
        "distill.kd_loss": cfg.distill.kd_loss,
        "distill.hidden_loss": cfg.distill.hidden_loss,
        "distill.teacher_outputs": cfg.distill.teacher_outputs,
        "distill.teacher_combine": cfg.distill.teacher_combine,
        "distill.cache_hidden_dtype": cfg.distill.cache_hidden_dtype,
        "data.format": cfg.data.format,
    }
    for key, value in flat.items():
        if value not in CHOICES[key]:
            options = ", ".join(str(c) for c in CHOICES[key] if c is not None)
            raise ConfigError(f"{key}={value!r} is not one of: {options}")
    d = cfg.distill
    if d.temperature <= 0:
        raise ConfigError(f"distill.temperature must be > 0, got {d.temperature}")
    weight_names = ("ce_weight", "kd_weight", "hidden_weight", "attention_weight", "relation_weight")
    for name in weight_names:
        if getattr(d, name) < 0:
            raise ConfigError(f"distill.{name} must be >= 0, got {getattr(d, name)}")
    if has_teacher(cfg) and all(getattr(d, name) == 0 for name in weight_names):
        raise ConfigError(
            f"all loss weights are zero (distill.{', '.join(weight_names)}): "
            "nothing would be trained; set at least one > 0"
        )
    if d.intermediate_epochs:
        if d.intermediate_epochs >= stage_train(cfg, "student").epochs:
            raise ConfigError(
                f"distill.intermediate_epochs={d.intermediate_epochs} leaves no epoch for the "
                f"prediction terms (train.epochs={cfg.train.epochs}); use fewer intermediate epochs"
            )
        if d.hidden_weight == d.attention_weight == d.relation_weight == 0:
            raise ConfigError(
                "distill.intermediate_epochs > 0 needs an intermediate term: set "
                "distill.hidden_weight, attention_weight or relation_weight > 0"
            )
        if d.ce_weight == d.kd_weight == 0:
            raise ConfigError("distill.intermediate_epochs > 0 needs a prediction term after it: set ce_weight or kd_weight > 0")
    t = cfg.train
    checks = {
        "train.lr": t.lr > 0,
        "train.batch_size": t.batch_size > 0,
        "train.epochs": t.epochs > 0,
        "train.grad_accum": t.grad_accum > 0,
        "train.warmup_ratio": 0 <= t.warmup_ratio < 1,
        "train.keep_checkpoints": t.keep_checkpoints >= 1,
        "data.max_length": cfg.data.max_length > 8,
        "data.doc_stride": cfg.task.family == "classification" or 0 < cfg.data.doc_stride < cfg.data.max_length,
        # counts the loop divides by or compares with: a bad one would fail only mid-training
        "train.logging_steps": t.logging_steps >= 1,
        "train.eval_steps": t.eval_steps >= 0,
        "train.checkpoint_steps": t.checkpoint_steps >= 0,
        "train.patience": t.patience >= 0,
        "train.max_grad_norm": t.max_grad_norm >= 0,
        "train.weight_decay": t.weight_decay >= 0,
        "train.eval_batch_size": t.eval_batch_size is None or t.eval_batch_size > 0,
        "teacher.lr": cfg.teacher.lr is None or cfg.teacher.lr > 0,
        "teacher.batch_size": cfg.teacher.batch_size is None or cfg.teacher.batch_size > 0,
        "teacher.epochs": cfg.teacher.epochs is None or cfg.teacher.epochs > 0,
        "teacher.max_length": cfg.teacher.max_length is None or cfg.teacher.max_length > 8,
        "teacher.doc_stride": cfg.teacher.doc_stride is None
        or 0 < cfg.teacher.doc_stride < (cfg.teacher.max_length or cfg.data.max_length),
        "student.num_layers": cfg.student.num_layers is None or cfg.student.num_layers >= 1,
        "distill.layer_map": all(j >= 1 for j in d.layer_map),  # teacher layers count from 1
        "distill.relation_heads": d.relation_heads >= 0,
        "distill.relation_layer": d.relation_layer >= 0,
        "distill.intermediate_epochs": d.intermediate_epochs >= 0,
        "train.num_workers": t.num_workers >= 0,
        "train.max_skipped_steps": t.max_skipped_steps >= 0,
        "hub.export.int8_margin": cfg.hub.export.int8_margin >= 0,
    }
    for key, ok in checks.items():
        if not ok:
            value = OmegaConf.select(OmegaConf.structured(cfg), key)
            raise ConfigError(f"{key}={value} is out of range")
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(cfg.data, key)
        if value is not None and value <= 0:
            raise ConfigError(f"data.{key} must be a positive number of rows, got {value}")
    if not cfg.student.model and not cfg.student.from_teacher_layers and not cfg.student.num_layers:
        raise ConfigError(
            "no student: set student.model (catalog name, hub id or path), "
            "student.from_teacher_layers=[...] or student.num_layers=N"
        )
    if cfg.student.model and cfg.student.from_teacher_layers:
        raise ConfigError(
            f"student.from_teacher_layers picks layers of the teacher, but student.model="
            f"'{cfg.student.model}' loads another model: cut student.model with student.num_layers=N "
            "(N of its layers, spread uniformly), or unset student.model to cut the teacher"
        )
    if not cfg.student.model and (cfg.student.from_teacher_layers or cfg.student.num_layers) and not has_teacher(cfg):
        raise ConfigError(
            "student.from_teacher_layers/num_layers without student.model cut the teacher: set "
            "teacher.model, or student.model to cut that model instead"
        )
    check_vocab(cfg.student.vocab)
    check_data_and_run(cfg)
    check_teachers(cfg)
    check_transfer_and_augment(cfg)
    if cfg.search != SearchConfig():  # the section's own checks (space keys, ranges, objectives)
        check_section(cfg, leaf_types(Config))


def check_vocab(v: VocabConfig) -> None:
    """student.vocab: a count of at least 1, corpus files that exist, settings only with trim."""
    if v.min_count < 1:
        raise ConfigError(f"student.vocab.min_count={v.min_count} is out of range: a piece must occur at least once")
    if not v.trim and (v.corpus or v.keep or v.min_count != 1):
        raise ConfigError(
            "student.vocab.corpus/keep/min_count shape a vocabulary trim, which is off: set "
            "student.vocab.trim=true, or drop them"
        )
    missing = [p for p in v.corpus if not Path(p).expanduser().is_file()]
    if missing:
        raise ConfigError(f"student.vocab.corpus names files that do not exist: {missing}")


def check_teachers(cfg: Config) -> None:
    """`teachers:` and the keys that combine them: each error names the entry and key."""
    d = cfg.distill
    if cfg.teachers:
        default = TeacherConfig()
        set_keys = [f"teacher.{f.name}={getattr(cfg.teacher, f.name)!r}" for f in fields(TeacherConfig)
                    if getattr(cfg.teacher, f.name) != getattr(default, f.name)]
        if set_keys:
            raise ConfigError(
                f"teacher and teachers are both set ({', '.join(set_keys)}): with `teachers:` list "
                "every teacher there (the first is teachers[0]) and leave `teacher:` out"
            )
        folders: dict[str, int] = {}
        seen: dict[tuple, int] = {}
        for i, t in enumerate(cfg.teachers):
            where = f"teachers[{i}]"
            if not t.model:
                raise ConfigError(f"{where}.model is not set: every teacher needs a hub id or path")
            _check_teacher_values(t, where, cfg.data.max_length)
            folder = os.path.normpath(t.dir or os.path.join(cfg.output_dir, f"teacher-{i}"))
            if folder in folders:
                raise ConfigError(
                    f"{where} and teachers[{folders[folder]}] write the same stage folder {folder}: "
                    f"give each teacher its own dir"
                )
            folders[folder] = i
            same = (t.model, t.revision, t.finetuned, t.seed, t.lr, t.batch_size, t.epochs)
            if same in seen:
                raise ConfigError(
                    f"{where} and teachers[{seen[same]}] are the same teacher (model {t.model}, same "
                    "seed and settings) and would give the same targets twice: give one another "
                    f"seed ({where}.seed=...), model or settings"
                )
            seen[same] = i
        if len(cfg.teachers) > 1 and d.kd_weight == 0:
            raise ConfigError(
                f"{len(cfg.teachers)} teachers combine only through the soft-label term, and "
                f"distill.kd_weight=0: only teachers[{d.intermediate_teacher}] would be used. Set "
                "distill.kd_weight > 0, or list one teacher"
            )
    else:
        _check_teacher_values(cfg.teacher, "teacher", cfg.data.max_length)
    count = len(teacher_list(cfg))
    if not 0 <= d.intermediate_teacher < max(count, 1):
        raise ConfigError(
            f"distill.intermediate_teacher={d.intermediate_teacher} is out of range: the recipe has "
            f"{count} teacher{'s' if count != 1 else ''} (use 0..{max(count, 1) - 1})"
        )
    weights = list(d.teacher_weights)
    if d.teacher_combine != "weighted":
        if weights:
            raise ConfigError(
                f"distill.teacher_weights={weights} is used only by distill.teacher_combine=weighted "
                f"(it is {d.teacher_combine}): remove the weights or set teacher_combine=weighted"
            )
        return
    if len(weights) != count:
        raise ConfigError(
            f"distill.teacher_combine=weighted needs one weight per teacher: distill.teacher_weights "
            f"has {len(weights)} ({weights}) for {count} teacher{'s' if count != 1 else ''}"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"distill.teacher_weights={weights}: weights must be finite and >= 0, with at least one > 0"
        )


def _check_teacher_values(t: TeacherConfig, where: str, max_length: int) -> None:
    checks = {
        "lr": t.lr is None or t.lr > 0,
        "batch_size": t.batch_size is None or t.batch_size > 0,
        "epochs": t.epochs is None or t.epochs > 0,
        "max_length": t.max_length is None or t.max_length > 8,
        "doc_stride": t.doc_stride is None or 0 < t.doc_stride < (t.max_length or max_length),
        "seed": t.seed is None or 0 <= t.seed < 2**32,
    }
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(f"{where}.{key}={getattr(t, key)} is out of range")


TRANSFER_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "conll", "conllu", "squad", "text")


# input roles a transfer source can map, per task family (labels never: transfer rows have none)
TRANSFER_ROLES = {
    "classification": ("text", "text_pair"),
    "tagging": ("tokens", "text"),
    "qa": ("question", "context", "id"),
}


def check_transfer_and_augment(cfg: Config) -> None:
    """`data.transfer` entries and the `augment` section: each error names the entry and key."""
    roles = TRANSFER_ROLES.get(cfg.task.family, ())
    for i, src in enumerate(cfg.data.transfer):
        where = f"data.transfer[{i}]"
        if bool(src.files) == bool(src.source):
            raise ConfigError(
                f"{where}: set exactly one of 'files' (local files) or 'source' (Hub id or local "
                f"file), got {'both' if src.files else 'neither'}"
            )
        if src.format is not None and src.format not in TRANSFER_FORMATS:
            raise ConfigError(f"{where}.format={src.format!r} is not one of: {', '.join(TRANSFER_FORMATS)}")
        if src.max_samples is not None and src.max_samples <= 0:
            raise ConfigError(f"{where}.max_samples must be a positive number of rows, got {src.max_samples}")
        if not src.split:
            raise ConfigError(f"{where}.split is empty; name the split to read (e.g. train)")
        for role, col in src.columns.items():
            if role not in roles:
                why = " (transfer rows have no labels)" if role in ("label", "tags", "answers") else ""
                raise ConfigError(
                    f"{where}.columns.{role}: not an input role of task.family={cfg.task.family}"
                    f"{why}; use {', '.join(roles)}"
                )
            if not col:
                raise ConfigError(f"{where}.columns.{role} is empty; name the source's column")
    a = cfg.augment
    if a.method not in ("embedding", "mlm"):
        raise ConfigError(f"augment.method={a.method!r} is not one of: embedding, mlm")
    checks = {
        "augment.copies": a.copies >= 0,
        "augment.p": 0 < a.p <= 1,
        "augment.top_k": a.top_k >= 1,
        "augment.batch_size": a.batch_size >= 1,
        "augment.max_length": a.max_length >= 8,
    }
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(f"{key}={getattr(a, key.split('.')[1])} is out of range")
    if a.copies and a.method == "mlm" and not a.model:
        raise ConfigError(
            "augment.method=mlm needs augment.model: a Hub id or path of a model with a masked-LM "
            "head (e.g. dccuchile/bert-base-spanish-wwm-cased)"
        )
    wants = [k for k, on in (("data.transfer", bool(cfg.data.transfer)), ("augment.copies", a.copies > 0)) if on]
    if wants and not has_teacher(cfg):
        raise ConfigError(f"{' and '.join(wants)} need teacher.model: the teacher labels those rows")
    teacher_terms = [f.name for f in fields(DistillConfig) if f.name.endswith("_weight") and f.name != "ce_weight"]
    if wants and all(getattr(cfg.distill, name) == 0 for name in teacher_terms):
        raise ConfigError(
            f"{' and '.join(wants)} add rows without gold labels, which only the teacher's terms "
            f"train on: set one of distill.{', '.join(teacher_terms)} > 0"
        )


# The roles `data.columns` may map, per task family (role -> dataset column).
COLUMN_ROLES = {
    "classification": ("text", "text_pair", "label"),
    "tagging": ("tokens", "tags"),
    "qa": ("id", "question", "context", "answers"),
}


FAMILIES_WITH_LABELS = ("classification", "tagging")


def _trackers() -> tuple[str, ...]:
    """The tracker names accelerate knows, plus "none" (log.jsonl only)."""
    try:
        from accelerate.utils import LoggerType

        known = tuple(t.value for t in LoggerType)
    except ImportError:  # pragma: no cover - accelerate is a dependency
        known = ("all", "aim", "tensorboard", "wandb", "comet_ml", "mlflow", "clearml", "dvclive")
    return known + ("none",)


def check_data_and_run(cfg: Config) -> None:
    """Values that would otherwise fail after data loading or mid-run: the roles of
    `data.columns`, `task.labels`, `data.validation_from_train`, `seed`, `tracking.report_to`."""
    roles = COLUMN_ROLES[cfg.task.family]
    for role, col in cfg.data.columns.items():
        if role not in roles:
            close = difflib.get_close_matches(role, roles, n=1, cutoff=0.5)
            hint = f" Did you mean 'data.columns.{close[0]}'?" if close else ""
            raise ConfigError(
                f"data.columns.{role}: '{role}' is not a column role of {cfg.task.family} "
                f"(roles: {', '.join(roles)}).{hint}"
            )
        if not isinstance(col, str) or not col.strip():
            raise ConfigError(f"data.columns.{role}={col!r}: name a column of the data")
    labels = list(cfg.task.labels)
    if labels and cfg.task.family not in FAMILIES_WITH_LABELS:
        raise ConfigError(f"task.labels: {cfg.task.family} has no labels (only {', '.join(FAMILIES_WITH_LABELS)} do)")
    repeated = sorted({name for name in labels if labels.count(name) > 1})
    if repeated:
        raise ConfigError(f"task.labels names {repeated} more than once; each label once, in id order")
    if any(not str(name).strip() for name in labels):
        raise ConfigError(f"task.labels={labels} holds an empty name")
    v = cfg.data.validation_from_train
    if not (v == 0 or 0 < v < 1 or (v >= 1 and float(v).is_integer())):
        raise ConfigError(
            f"data.validation_from_train={v:g}: use a fraction of the training split in (0, 1), "
            "a whole number of rows (e.g. 500), or 0 for none"
        )
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} is out of range: use an integer in 0..{2**32 - 1}")
    known = _trackers()
    for name in cfg.tracking.report_to:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"tracking.report_to: unknown tracker '{name}' (known: {', '.join(known)}).{hint}"
            )
