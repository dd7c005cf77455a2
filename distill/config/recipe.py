"""The typed schema of a recipe, and how a recipe becomes a validated config.

A recipe YAML is merged over these dataclasses (OmegaConf structured configs), then
`key=value` overrides are merged over the recipe. Unknown keys and wrong types stop the run
before any work with a message naming the key and the closest valid one.

One concern over ~500 lines: the schema and every check that can be made without data or
models (a check next to its key, so none is forgotten).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


from distill.errors import ConfigError
from distill.config.search_space import check_section, leaf_types


@dataclass
class TaskConfig:
    family: str = "classification"  # classification | tagging | qa
    name: str = "task"  # short task name used in paths, tables and Hub names (e.g. pawsx)
    metric: Optional[str] = None  # headline metric; None = the family's default
    # Label names in id order, for data that stores labels as bare ids (e.g. jsonl tag ids);
    # empty = from the dataset's ClassLabel feature or the sorted unique values.
    labels: list[str] = field(default_factory=list)
    # tagging
    label_all_tokens: bool = False  # later sub-tokens of a word get the word's (I-) label
    # qa
    n_best: int = 20
    max_answer_length: int = 30
    normalization: str = "squad"  # squad | mlqa (Spanish article/punctuation rules)
    # SQuAD v2: questions with no answer are trained towards CLS and answered "" when the null
    # score beats the best span by more than the threshold; false = such rows are refused.
    version_2_with_negative: bool = False
    null_score_diff_threshold: float = 0.0


@dataclass
class SplitsConfig:
    train: Optional[str] = "train"
    validation: Optional[str] = "validation"
    test: Optional[str] = "test"


@dataclass
class SplitSource:
    """One split taken from elsewhere (e.g. MLQA trains on translated SQuAD, TAR/XQuAD tests on
    XQuAD): a Hub id (+ config, revision, split name) or a local file."""

    source: str = "???"
    name: Optional[str] = None
    revision: Optional[str] = None
    split: str = "train"  # the split of `source` to take (Hub datasets)


@dataclass
class TransferSource:
    """Unlabelled rows the teacher labels for the student (docs/transfer-and-augmentation.md):
    local `files` (any format `data` reads, plus `text`: one example per line) or a Hub
    `source` (+ config `name`, `split`, `revision`). `columns` maps the task's input roles
    (text, text_pair | tokens or text | question, context) to this source's columns; empty =
    `data.columns`."""

    files: list[str] = field(default_factory=list)
    format: Optional[str] = None  # None = from the extension (.txt = text, one example per line)
    source: Optional[str] = None
    name: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    max_samples: Optional[int] = None  # the first N rows of this source
    columns: dict[str, str] = field(default_factory=dict)


@dataclass
class DataConfig:
    # Hub dataset id or a local path (file or directory); for per-split files use `files`.
    source: Optional[str] = None
    name: Optional[str] = None  # Hub config name (e.g. "es")
    revision: Optional[str] = None  # e.g. "refs/convert/parquet" for script-based datasets
    files: dict[str, str] = field(default_factory=dict)  # split -> local file
    # split -> a source of its own, over what `source` / `files` give for that split
    split_sources: dict[str, SplitSource] = field(default_factory=dict)
    format: Optional[str] = None  # jsonl | json | csv | tsv | parquet | conll | conllu | squad; None = from extension
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    # task input -> dataset column, e.g. {text: premise, text_pair: hypothesis, label: label}
    columns: dict[str, str] = field(default_factory=dict)
    # column names of a header-less csv/tsv, in order (MLDoc ships `label<TAB>text`)
    column_names: list[str] = field(default_factory=list)
    max_length: int = 128
    doc_stride: int = 32  # qa and long tagging sentences: overlap between windows (QA recipes: 128)
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # Take the validation split from train when the dataset has none: a fraction of train in
    # (0, 1), or a whole number of rows (>= 1); 0 = off.
    validation_from_train: float = 0.0
    # Rows with a null or empty text, label, word or tag: false = stop naming split, file and
    # row; true = drop them and print how many went.
    drop_invalid: bool = False
    # Unlabelled transfer sets for the student stage (teacher-labelled, no gold loss).
    transfer: list[TransferSource] = field(default_factory=list)


@dataclass
class AugmentConfig:
    """TinyBERT-style whole-word replacement of the training rows, for the student stage
    (docs/transfer-and-augmentation.md). Augmented rows are teacher-labelled, no gold loss."""

    copies: int = 0  # augmented copies per training row; 0 = off
    method: str = "embedding"  # embedding (nearest input embeddings) | mlm (masked-LM top-k)
    p: float = 0.3  # probability that a word is replaced in a copy
    top_k: int = 8  # candidates per word
    model: Optional[str] = None  # mlm: a model with an MLM head (required); embedding: None = the teacher
    seed: Optional[int] = None  # None = the recipe's seed
    batch_size: int = 32  # rows per generation batch (does not change the rows)
    max_length: int = 128  # mlm: tokens of context around a masked word
    keep_words: list[str] = field(default_factory=list)  # never replaced (e.g. stopwords)
    include_transfer: bool = False  # also augment the transfer rows
    cache_dir: Optional[str] = None  # None = <output_dir>/augment_cache


@dataclass
class TeacherConfig:
    model: Optional[str] = None  # hub id or path; None = no teacher (plain fine-tuning)
    # True when `model` is already fine-tuned on the task: the teacher stage is skipped.
    finetuned: bool = False
    # Where the teacher stage writes (and distillation reads) the fine-tuned teacher; None =
    # <output_dir>/teacher. Point every student of a task at one folder to share one teacher.
    dir: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Teacher-stage hyperparameters; None = the value in `train`.
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    epochs: Optional[int] = None
    # QA distillation with a teacher that tokenizes differently: the teacher's own windows
    # (tokens, overlap); None = data.max_length / data.doc_stride. Raise them when the teacher's
    # tokenizer needs more tokens for the same text, so its windows cover the student's.
    max_length: Optional[int] = None
    doc_stride: Optional[int] = None
    # Seed of this teacher's fine-tuning stage; None = the recipe's seed (differently seeded
    # teachers of one model make an ensemble, see `teachers`).
    seed: Optional[int] = None


@dataclass
class StudentConfig:
    model: Optional[str] = None  # catalog name (albeto-tiny, albeto-base-6), hub id or path
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Build the student from a subset of the teacher's layers (BERT/RoBERTa teachers).
    from_teacher_layers: list[int] = field(default_factory=list)
    num_layers: Optional[int] = None  # with model unset: that many teacher layers, spread uniformly
    # Extra config changes applied when loading the student (e.g. {hidden_dropout_prob: 0.0}).
    config_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DistillConfig:
    ce_weight: float = 0.0  # weight of the gold-label cross-entropy
    kd_weight: float = 1.0  # weight of the soft-label term
    kd_loss: str = "kl"  # kl | ce | mse
    temperature: float = 1.0
    hidden_weight: float = 0.0
    hidden_loss: str = "mse"  # mse | cosine
    # Student layer i (1-based; 0 = embeddings) is matched to teacher layer layer_map[i-1];
    # empty = uniform spread (works for any depth ratio).
    layer_map: list[int] = field(default_factory=list)
    include_embeddings: bool = False
    # TinyBERT attention-score maps of mapped layers (same head counts, same tokenizer)
    attention_weight: float = 0.0
    # MiniLMv2 self-attention relations (Q-Q, K-K, V-V) of one teacher layer and the student's last
    relation_weight: float = 0.0
    relation_heads: int = 0  # 0 = the default rule (see distill/intermediate.py)
    relation_layer: int = 0  # teacher layer (1-based) the relations follow; 0 = its last
    # TinyBERT's two phases: the first N epochs train the intermediate terms (hidden, attention,
    # relations) alone, the rest the prediction terms (ce, kd); 0 = one phase with every term
    intermediate_epochs: int = 0
    teacher_outputs: str = "auto"  # auto | cached | online
    # Several teachers (`teachers:`): how their soft targets combine (distill/ensemble.py):
    # mean of probabilities at T | weighted (teacher_weights, one per teacher) | confident (per
    # row, the teacher with the lowest entropy); which teacher the hidden/attention/relation
    # terms follow (and the student is cut from), counted from 0.
    teacher_combine: str = "mean"
    teacher_weights: list[float] = field(default_factory=list)
    intermediate_teacher: int = 0
    cache_hidden_states: bool = False
    cache_dir: Optional[str] = None  # None = <output_dir>/teacher_cache


@dataclass
class TrainConfig:
    lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: Optional[int] = None  # None = 2 x batch_size
    epochs: int = 3
    max_steps: int = -1  # > 0 stops after that many optimizer steps
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    eval_steps: int = 0  # 0 = evaluate at every epoch end
    select_metric: Optional[str] = None  # None = the task metric; "loss" = validation loss
    patience: int = 0  # 0 = no early stopping
    group_by_length: bool = True
    logging_steps: int = 10
    checkpoint_steps: int = 0  # 0 = checkpoint at epoch ends only
    keep_checkpoints: int = 2
    num_workers: int = 0  # DataLoader worker processes (pinned memory when on a GPU)
    compile: bool = False  # torch.compile the trained model


@dataclass
class RunConfig:
    # Also fine-tune the student alone (no teacher) in stage `baseline`: the number KD must beat.
    baseline: bool = False


@dataclass
class TrackingConfig:
    report_to: list[str] = field(default_factory=lambda: ["wandb"])
    project: str = "distill"
    run_name: Optional[str] = None


@dataclass
class HubExportConfig:
    """Files `distill export` / `distill push` (and `distill run` with hub.push) write beside the
    safetensors, each checked by the parity gate on the validation split (docs/benchmarks.md)."""

    onnx: bool = False  # model.onnx: fp32, dynamic batch and sequence axes
    int8: bool = False  # model.int8.onnx: ONNX Runtime dynamic quantisation (implies onnx)
    int8_margin: float = 0.5  # points of the task metric int8 may lose before the export fails


@dataclass
class HubConfig:
    push: bool = False
    # `{student}`, `{task}` and `{org}` are filled in; the default reproduces the study's naming.
    repo_id: str = "{org}/{student}-distilled-{task}"
    org: Optional[str] = None
    private: bool = False
    license: str = "apache-2.0"
    language: list[str] = field(default_factory=lambda: ["es"])
    export: HubExportConfig = field(default_factory=HubExportConfig)


@dataclass
class SearchLatencyConfig:
    """How `distill search` times a trial's model for the `latency` objective."""

    batch: int = 1
    seq: int = 64
    runs: int = 30
    warmup: int = 5
    threads: Optional[int] = None  # None = torch's current thread count
    device: Optional[str] = None  # None = cuda when available, else cpu


@dataclass
class SearchConfig:
    """`distill search` (docs/search.md); not part of any stage's identity, and ignored by
    every other command."""

    trials: Optional[int] = None  # finished trials the study should hold
    time_budget: Optional[str] = None  # e.g. 2h, 30m, 1h30m, 5400 (seconds), per invocation
    # recipe key -> {low, high, log?, step?} (range) or [choices]
    space: dict[str, Any] = field(default_factory=dict)
    objectives: list[str] = field(default_factory=list)  # empty = the task metric; + latency, macs, parameters
    sampler: str = "tpe"  # tpe | random | nsgaii | nsgaiii | gp | cmaes | qmc
    sampler_options: dict[str, Any] = field(default_factory=dict)  # passed to the Optuna sampler
    pruner: Optional[str] = None  # hyperband | median | none; None = hyperband (single objective)
    pruner_options: dict[str, Any] = field(default_factory=dict)  # passed to the Optuna pruner
    storage: Optional[str] = None  # None = sqlite:///<search folder>/study.db; any Optuna URL
    study_name: Optional[str] = None  # None = task.name
    seed: Optional[int] = None  # sampler seed (+ worker index); None = the recipe's seed
    heartbeat: int = 60  # seconds; a trial silent for 2 heartbeats is failed and retried
    # the first trial of a new study runs the recipe's own values of the searched keys (those
    # inside the space), so trials.md says what the search gained over the recipe as written
    start_from_recipe: bool = True
    latency: SearchLatencyConfig = field(default_factory=SearchLatencyConfig)


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # Several teachers, each like `teacher` (then `teacher` stays unset): fine-tuned in stages
    # teacher-0, teacher-1, ... and combined by distill.teacher_combine.
    teachers: list[TeacherConfig] = field(default_factory=list)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    output_dir: str = "runs/default"
    seed: int = 42
    overwrite: bool = False
    checkpoint: Optional[str] = None  # `distill eval`: the saved model to evaluate


FAMILIES = ("classification", "tagging", "qa")
CHOICES = {
    "task.family": FAMILIES,
    "task.normalization": ("squad", "mlqa"),
    "distill.kd_loss": ("kl", "ce", "mse"),
    "distill.hidden_loss": ("mse", "cosine"),
    "distill.teacher_outputs": ("auto", "cached", "online"),
    "distill.teacher_combine": ("mean", "weighted", "confident"),
    "data.format": (None, "jsonl", "json", "csv", "tsv", "conll", "conllu", "squad", "parquet"),
}


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        full = f"{prefix}{key}"
        keys.append(full)
        child = node[key] if not OmegaConf.is_missing(node, key) else None
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
            keys.extend(_valid_keys(child, full + "."))
    return keys


def _explain(err: OmegaConfBaseException, where: str) -> ConfigError:
    schema = OmegaConf.structured(Config)
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        close = difflib.get_close_matches(key, _valid_keys(schema), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{where}: unknown key '{key}'.{hint}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"{where}: bad value for '{key}': {msg}")
    return ConfigError(f"{where}: {str(err).splitlines()[0]} (key '{key}')")


def _read_recipe(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{at}: {getattr(err, 'problem', err)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return OmegaConf.create(raw)


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-4)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides: {str(err).splitlines()[0]}") from None


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- recipe YAML <- `key=value` overrides, validated against the schema."""
    cfg = OmegaConf.structured(Config)
    if recipe is not None:
        try:
            cfg = OmegaConf.merge(cfg, _read_recipe(recipe))
        except OmegaConfBaseException as err:
            raise _explain(err, str(recipe)) from None
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, _parse_overrides(list(overrides)))
        except OmegaConfBaseException as err:
            raise _explain(err, "command line") from None
        except TypeError:  # a dotted key that indexes into a list (teachers.1.seed=3)
            raise ConfigError(
                f"command line: cannot merge {list(overrides)}: an override cannot set one entry "
                "of a list (e.g. teachers.1.seed); give the whole list, e.g. "
                "'teachers=[{model: a, seed: 1}, {model: a, seed: 2}]', or edit the recipe"
            ) from None
    try:
        config: Config = OmegaConf.to_object(cfg)  # resolves interpolations, checks types
    except OmegaConfBaseException as err:
        raise _explain(err, str(recipe or "config")) from None
    validate(config)
    return config


def validate(cfg: Config) -> None:
    """Checks that go beyond types: choices, ranges and combinations."""
    flat = {
        "task.family": cfg.task.family,
        "task.normalization": cfg.task.normalization,
        "distill.kd_loss": cfg.distill.kd_loss,
        "distill.hidden_loss": cfg.distill.hidden_loss,
        "distill.teacher_outputs": cfg.distill.teacher_outputs,
        "distill.teacher_combine": cfg.distill.teacher_combine,
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
    if cfg.student.model and (cfg.student.from_teacher_layers or cfg.student.num_layers):
        raise ConfigError(
            "student.model and student.from_teacher_layers/num_layers exclude each other: "
            "the first loads a model, the others cut one out of the teacher"
        )
    if (cfg.student.from_teacher_layers or cfg.student.num_layers) and not has_teacher(cfg):
        raise ConfigError("student.from_teacher_layers/num_layers need teacher.model")
    check_data_and_run(cfg)
    check_teachers(cfg)
    check_transfer_and_augment(cfg)
    if cfg.search != SearchConfig():  # the section's own checks (space keys, ranges, objectives)
        check_section(cfg, leaf_types(Config))


def teacher_list(cfg: Config) -> list[TeacherConfig]:
    """The recipe's teachers in order: `teachers`, else the one `teacher` (none without a model)."""
    if cfg.teachers:
        return list(cfg.teachers)
    return [cfg.teacher] if cfg.teacher.model else []


def has_teacher(cfg: Config) -> bool:
    return bool(teacher_list(cfg))


def main_teacher(cfg: Config) -> TeacherConfig:
    """The teacher the hidden/attention/relation terms follow, and the one a layer-subset
    student is cut from (and augmentation's embeddings come from): teachers[intermediate_teacher],
    or `teacher` when the recipe has one."""
    k = cfg.distill.intermediate_teacher
    return cfg.teachers[k] if cfg.teachers and 0 <= k < len(cfg.teachers) else cfg.teacher


TEACHER_STAGE = re.compile(r"^teacher-(\d+)$")


def teacher_stage_name(cfg: Config, index: int) -> str:
    """`teacher` for the one `teacher:`, `teacher-<index>` for an entry of `teachers:`."""
    return f"teacher-{index}" if cfg.teachers else "teacher"


def teacher_of_stage(cfg: Config, stage: str) -> TeacherConfig:
    """The teacher a stage named `teacher` or `teacher-<i>` fine-tunes."""
    if stage == "teacher":
        return cfg.teacher
    match = TEACHER_STAGE.match(stage)
    if not match:
        raise ConfigError(f"'{stage}' is not a teacher stage (teacher, or teacher-<i> with `teachers:`)")
    i = int(match.group(1))
    if not 0 <= i < len(cfg.teachers):
        raise ConfigError(f"stage '{stage}': the recipe lists {len(cfg.teachers)} teachers (teachers[0..{len(cfg.teachers) - 1}])")
    return cfg.teachers[i]


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


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def stage_train(cfg: Config, stage: str) -> TrainConfig:
    """The training hyperparameters of a stage (teacher overrides applied)."""
    t = OmegaConf.structured(cfg.train)
    if stage == "teacher" or TEACHER_STAGE.match(stage):
        teacher = teacher_of_stage(cfg, stage)
        for key in ("lr", "batch_size", "epochs"):
            value = getattr(teacher, key)
            if value is not None:
                t[key] = value
    return OmegaConf.to_object(t)


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
