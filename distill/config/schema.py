"""The typed schema of a recipe: one dataclass per section (OmegaConf structured configs), and
the questions every layer asks of a config (its teachers, which one the intermediate terms
follow, a teacher stage's training section, the config as YAML or a dict)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from distill.errors import ConfigError


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
class VocabConfig:
    """Trimming the student's vocabulary to the pieces its task's text uses (distill/models/vocab.py)."""

    trim: bool = False
    min_count: int = 1  # a piece is kept when the training text uses it this often
    corpus: list[str] = field(default_factory=list)  # text files whose pieces are kept too (.txt lines, .jsonl strings)
    keep: list[str] = field(default_factory=list)  # pieces kept whatever the text


@dataclass
class StudentConfig:
    model: Optional[str] = None  # catalog name (albeto-tiny, albeto-base-6), hub id or path
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Build the student from a subset of the teacher's layers (any encoder layout; with model unset).
    from_teacher_layers: list[int] = field(default_factory=list)
    # That many layers, spread uniformly: of student.model when set, else of the teacher.
    num_layers: Optional[int] = None
    # Extra config changes applied when loading the student (e.g. {hidden_dropout_prob: 0.0}).
    config_overrides: dict[str, Any] = field(default_factory=dict)
    vocab: VocabConfig = field(default_factory=VocabConfig)


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
    relation_heads: int = 0  # 0 = the default rule (see distill/objective/intermediate.py)
    relation_layer: int = 0  # teacher layer (1-based) the relations follow; 0 = its last
    # TinyBERT's two phases: the first N epochs train the intermediate terms (hidden, attention,
    # relations) alone, the rest the prediction terms (ce, kd); 0 = one phase with every term
    intermediate_epochs: int = 0
    teacher_outputs: str = "auto"  # auto | cached | online
    # Several teachers (`teachers:`): how their soft targets combine (distill/teachers/ensemble.py):
    # mean of probabilities at T | weighted (teacher_weights, one per teacher) | confident (per
    # row, the teacher with the lowest entropy); which teacher the hidden/attention/relation
    # terms follow (and the student is cut from), counted from 0.
    teacher_combine: str = "mean"
    teacher_weights: list[float] = field(default_factory=list)
    intermediate_teacher: int = 0
    cache_hidden_states: bool = False
    # how cached hidden states are stored: float32 | float16 | bfloat16 (16-bit: half the disk
    # and transfer; bfloat16 keeps float32's range, float16 clamps to +-65504)
    cache_hidden_dtype: str = "float32"
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
    # fp16: consecutive optimizer steps the gradient scaler may skip (overflow) before the run
    # stops; a skipped step is normal, a long run of them is not. 0 = never stop for skips
    max_skipped_steps: int = 25


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
