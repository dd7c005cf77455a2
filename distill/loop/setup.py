"""Building a stage once from its plan: data, models, teachers, objective, loaders.

`setup_stage(plan, accelerator)` turns a `StagePlan` into a `Stage`: the task, its raw data and
features, the model to train and its tokenizer, the teacher (online or cached, one interface),
the objective (the weighted loss terms) and the loaders. It writes nothing, so a bad input never
costs an earlier result. `check_models` is the part that needs only model configs and
tokenizers; `loop.preflight` runs it for every stage before the first one trains.
"""

from __future__ import annotations

import copy
import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader

from distill import models
from distill.config import DistillConfig, TrainConfig
from distill.errors import StageError
from distill.launch import board, main_first, precision_note
from distill.data.features import load_data, make_loader, prepare_data
from distill.objective.losses import POSITION_TERMS, GoldTerm, HiddenStateLoss, HiddenTerm, Objective, Reads, SoftLabelTerm, Term
from distill.loop.folders import check_writable
from distill.loop.plan import StagePlan
from distill.tasks import get_task
from distill.tasks.base import Task
from distill.teachers.teacher import CachedTeacher, EnsembleTeacher, Teacher, make_teacher, place_teacher, with_cached_targets

log = logging.getLogger("distill")


@dataclass
class Stage:
    """Everything a stage trains with, built once by `setup_stage`."""

    name: str
    out: Path
    train: TrainConfig
    task: Task
    raw: DatasetDict
    features: dict[str, Dataset]
    model: torch.nn.Module
    tokenizer: Any
    objective: Objective
    teacher: Optional[Teacher] = None
    teacher_source: Optional[str | list[str]] = None  # several teachers: one source each, in order
    # entries for metrics.json's info beyond the loop's own (the teachers and how they combine)
    info: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # labelled / transfer / augmented training rows
    train_loader: Optional[DataLoader] = None
    eval_loaders: dict[str, DataLoader] = field(default_factory=dict)
    capture: Any = None


def teachers_apart(plan: StagePlan, task: Task, tokenizer: Any, teacher_toks: Sequence[Any]) -> list[int]:
    """The teachers that tokenize unlike teacher `main` (in order; [] for one teacher).

    The training batches carry one teacher's inputs: the main teacher's (the one the hidden,
    attention and relation terms follow), as `teacher_` columns when it tokenizes unlike the
    student. Every other teacher of the main teacher's tokenizer reads them too; a teacher of
    another tokenizer gets its own copy of the task and of the training features
    (`teacher_inputs`), runs once into the teacher cache, and is read back by the batch's
    feature ids. That works wherever one teacher across tokenizers does (classification;
    tagging, whose targets are per word). Refused, before anything is built: QA with several
    teachers unless they all share the student's tokenizer, and `distill.teacher_outputs=online`
    with teachers apart (their targets exist only in the cache).
    """
    if len(teacher_toks) <= 1:
        return []
    teachers, main = plan.teachers, plan.main
    if task.family == "qa":
        for i, tok in enumerate(teacher_toks):
            if not models.same_tokenizer(tokenizer, tok):
                raise StageError(
                    f"QA with several teachers needs teachers that share the student's tokenizer; "
                    f"{teachers[i].key} ({teachers[i].model}) uses {type(tok).__name__} of vocabulary "
                    f"{len(tok)}, the student {type(tokenizer).__name__} of vocabulary {len(tokenizer)}. "
                    "Use one teacher across tokenizers, or teachers of the student's tokenizer"
                )
        return []
    apart = [
        i for i, tok in enumerate(teacher_toks) if i != main and not models.same_tokenizer(teacher_toks[main], tok)
    ]
    if apart and plan.distill.teacher_outputs == "online":
        names = ", ".join(f"teachers[{i}] ({teachers[i].model})" for i in apart)
        raise StageError(
            f"{names} tokenize{'s' if len(apart) == 1 else ''} unlike teachers[{main}] "
            f"({teachers[main].model}), whose inputs the training batches carry "
            f"(distill.intermediate_teacher={main}); a teacher of another tokenizer runs once on its "
            "own tokenization into the teacher cache, so distill.teacher_outputs=online cannot serve "
            "it. Set distill.teacher_outputs=auto (or cached), or distil from teachers of one tokenizer"
        )
    return apart


def distinct_tokenizers(toks: Sequence[Any]) -> list[Any]:
    """`toks` without repeats (by what they do), in order."""
    seen: set[str] = set()
    out = []
    for tok in toks:
        digest = models.tokenizer_digest(tok)
        if digest not in seen:
            seen.add(digest)
            out.append(tok)
    return out


# the columns that say which student feature a row is: equal in every teacher's copy of the
# training features, or one teacher's cached targets would be read for another's words
ALIGNMENT_COLUMNS = ("feature_id", "example_id", "word_offset", "num_words", "input_ids")


def _column(ds: Dataset, col: str) -> Any:
    """One column's values as Arrow (zero-copy; compared by content, whatever the chunking)."""
    return ds.select_columns([col]).with_format("arrow")[:].column(col)


def check_aligned(main_features: Dataset, own: Dataset, who: str) -> None:
    """A teacher's own copy of the training features names the same student features, row for
    row, as the main copy (StageError otherwise: never train on misaligned targets)."""
    if len(own) != len(main_features):
        raise StageError(
            f"{who}'s copy of the training features has {len(own)} features, the student's "
            f"{len(main_features)}: its cached targets cannot be read by the student's feature ids"
        )
    for col in ALIGNMENT_COLUMNS:
        present = (col in main_features.column_names, col in own.column_names)
        if present == (False, False):
            continue
        if not all(present) or not _column(main_features, col).equals(_column(own, col)):
            raise StageError(
                f"{who}'s copy of the training features does not line up with the student's "
                f"(column '{col}' differs): its cached targets would be read for other words. The "
                "teachers' tokenizers must give the same windows; distil from teachers of one tokenizer"
            )


def teacher_inputs(
    plan: StagePlan, task: Task, tokenizer: Any, teacher_toks: Sequence[Any], apart: Sequence[int],
    raw_train: Dataset, train_features: Dataset, accelerator: Accelerator,
) -> list[tuple[Task, Dataset]]:
    """(task, training features) each teacher runs on, in teacher order: the stage's own for the
    main teacher and those of its tokenizer; for each other tokenizer (`apart`), a copy of the
    task bound to (student, that tokenizer) over the same planning tokenizers, whose features of
    the same training rows are checked to name the same student features (`check_aligned`)."""
    out = [(task, train_features)] * len(teacher_toks)
    own: dict[str, tuple[Task, Dataset]] = {}
    for i in apart:
        digest = models.tokenizer_digest(teacher_toks[i])
        if digest not in own:
            copy_task = copy.copy(task)  # the labels and columns `setup` read, bound anew
            bind_tokenizers(copy_task, tokenizer, teacher_toks[i], plan_tokenizers=task.plan_tokenizers)
            features = prepare_data(copy_task, {"train": raw_train}, accelerator)["train"]
            check_aligned(train_features, features, f"teachers[{i}] ({plan.teachers[i].model})")
            own[digest] = (copy_task, features)
        out[i] = own[digest]
    return out


def ensemble_info(plan: StagePlan, sources: Sequence[str]) -> dict[str, Any]:
    """What metrics.json's info records about several teachers (empty for one)."""
    if len(sources) <= 1:
        return {}
    d = plan.distill
    return {
        "teachers": list(sources),
        "teacher_combine": d.teacher_combine,
        "teacher_weights": list(d.teacher_weights) if d.teacher_combine == "weighted" else None,
        "intermediate_teacher": d.intermediate_teacher,
    }


def bind_tokenizers(
    task: Task, tokenizer: Any, teacher_tok: Any, position_terms: Sequence[str] = (), plan_tokenizers: Sequence[Any] = (),
    teacher_windows: tuple[Optional[int], Optional[int]] = (None, None), kd_loss: str = "kl", teacher_key: str = "teacher",
) -> None:
    """Give the task its tokenizers (the other teachers' to plan features over, and the teacher's
    own QA windows, `teacher_key` naming it); refuse a teacher/student pair the task or a term
    cannot align."""
    if teacher_tok is None or models.same_tokenizer(tokenizer, teacher_tok):
        try:
            task.bind(tokenizer, plan_tokenizers=plan_tokenizers)
        except ValueError as err:
            raise StageError(f"the teachers' tokenizers cannot be planned over for {task.family}: {err}") from None
        return
    if position_terms:
        names = ", ".join(f"distill.{'relation' if t == 'relations' else t}_weight" for t in position_terms)
        raise StageError(
            f"the {'/'.join(position_terms)} term compares token positions, which needs teacher and "
            f"student with the same tokenizer ({type(teacher_tok).__name__} of vocabulary "
            f"{len(teacher_tok)} vs {type(tokenizer).__name__} of vocabulary {len(tokenizer)}); "
            f"set {names}=0 or pick a student that shares the teacher's tokenizer"
        )
    if task.family == "qa" and kd_loss == "mse":
        raise StageError(
            "distill.kd_loss=mse compares raw logits position by position, which means nothing "
            "between tokenizers that split the context differently; QA across tokenizers "
            "compares distributions: use distill.kd_loss=kl or ce."
        )
    try:
        task.bind(tokenizer, teacher_tok, plan_tokenizers=plan_tokenizers, teacher_windows=teacher_windows, teacher_key=teacher_key)
    except ValueError as err:
        raise StageError(f"teacher and student tokenizers cannot be aligned for {task.family}: {err}") from None


def build_objective(task: Task, d: DistillConfig, student_config: Any, teacher_config: Any = None) -> Objective:
    """The stage's weighted terms: ce alone without a teacher, else the recipe's ce, kd, hidden,
    attention and relation terms with a weight > 0 (built from the two models' configs only)."""
    if teacher_config is None:
        return Objective([GoldTerm()], {"ce": 1.0})
    weights = {
        "ce": d.ce_weight, "kd": d.kd_weight, "hidden": d.hidden_weight,
        "attention": d.attention_weight, "relations": d.relation_weight,
    }
    weights = {k: w for k, w in weights.items() if w > 0}
    s_layers, t_layers = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    terms: list[Term] = []
    try:
        if "ce" in weights:
            terms.append(GoldTerm())
        if "kd" in weights:
            terms.append(SoftLabelTerm(task, d.kd_loss, d.temperature))
        if "hidden" in weights:
            loss = HiddenStateLoss(
                s_layers, t_layers, student_config.hidden_size, teacher_config.hidden_size,
                kind=d.hidden_loss, layer_map=d.layer_map, include_embeddings=d.include_embeddings,
            )
            terms.append(HiddenTerm(loss))
        if "attention" in weights or "relations" in weights:
            from distill.objective.intermediate import intermediate_terms

            terms.extend(intermediate_terms(d, student_config, teacher_config, weights))
    except ValueError as err:
        raise StageError(f"{err} (student has {s_layers} layers, teacher {t_layers})") from None
    return Objective(terms, weights, two_phase=d.intermediate_epochs > 0)


def check_lengths(max_length: int, key: str, *configs: Any) -> None:
    """A length (`key`: data.max_length, or a QA teacher's own max_length) must fit every given
    model's position table (else step 2 crashes on an index)."""
    for config in configs:
        table = getattr(config, "max_position_embeddings", None)
        if table is None:
            continue
        # RoBERTa-style position ids start after the padding index
        usable = table - (config.pad_token_id + 1 if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0)
        if max_length > usable:
            raise StageError(
                f"{key}={max_length} is longer than {getattr(config, '_name_or_path', '') or config.model_type}'s "
                f"position table ({usable} positions): set {key} <= {usable}"
            )


def check_metrics(task: Task, select: Optional[str]) -> None:
    """task.metric and train.select_metric must be metrics the task produces."""
    produced = set(task.metric_names) | {"loss"}
    if not task.metric_names:
        return
    for key, name in (("task.metric", task.metric), ("train.select_metric", select)):
        if name and name not in produced:
            raise StageError(f"{key}='{name}' is not a metric {task.family} produces: {sorted(produced)}")


def cache_settings(plan: StagePlan) -> dict[str, Any]:
    """The preprocessing options the teacher cache's key names (besides the features' content)."""
    return {
        "family": plan.task.family,
        "max_length": plan.data.max_length,
        "doc_stride": plan.data.doc_stride,
        "label_all_tokens": plan.task.label_all_tokens,
    }


def add_transfer_rows(plan: StagePlan, raw: DatasetDict, accelerator: Accelerator) -> dict[str, int]:
    """Replace raw["train"] by the student's rows: labelled ∪ transfer sets ∪ augmented copies
    (leak-filtered against validation and test); returns how many of each it holds."""
    from distill.data.transfer import build_student_train_rows

    with main_first(accelerator, "building the student's training rows (transfer sets, augmented copies)"):  # the main process builds (and caches) the augmented rows
        train, counts = build_student_train_rows(
            raw, plan.task.family, plan.data.columns, plan.data.transfer, plan.augment,
            augment_model=plan.base.model,  # the pretrained id: retuning the teacher keeps the cache
            cache_dir=Path(plan.augment.cache_dir or plan.output_dir / "augment_cache"),
            seed=plan.seed,
        )
    raw["train"] = train
    if accelerator.is_main_process:
        print("[distill] student training rows: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return counts


def student_capture(objective: Objective, model: torch.nn.Module) -> Any:
    """The capture of the student's attention projections, when a term of any phase reads Q/K/V
    (imported only then); `Trainee` attaches its hooks once and arms them per forward."""
    qkv = objective.needs("student", every_phase=True).qkv
    if not qkv:
        return None
    from distill.objective.capture import Capture

    return Capture(model, qkv=qkv)


def build_teachers(
    plan: StagePlan, inputs: Sequence[tuple[Task, Dataset]], accelerator: Accelerator, loaded: list[Any],
    objective: Objective, apart: Sequence[int] = (),
) -> Teacher:
    """The stage's teacher from the loaded (model, tokenizer) pairs: one teacher as it is, several
    as an `EnsembleTeacher`. Each is placed, made on its own (task, training features) of
    `inputs` (online or cached: each teacher's cache is its own, keyed by its weights and
    features) and, once cached, released before the next is placed, so cached teachers never
    share the device. Only teacher `main` keeps the layers the terms read; the teachers `apart`
    (another tokenizer than the main one's) are always read from their cache."""
    needs = objective.needs("teacher", every_phase=True)  # the stage's teacher serves every phase
    d, main = plan.distill, plan.main
    built = []
    for i in range(len(loaded)):
        teacher_model = loaded[i][0]
        loaded[i] = None  # the list holds no reference once the teacher is released
        place_teacher(teacher_model, accelerator)
        layers = needs if i == main else Reads()
        task, train_features = inputs[i]
        teacher, keep = make_teacher(
            teacher_model, task, accelerator, train_features,
            mode=d.teacher_outputs,
            cache_root=plan.cache_dir,
            cache_settings=cache_settings(plan),
            hidden_layers=sorted(layers.hidden),
            qkv_layers=sorted(layers.qkv),
            cache_hidden_states=d.cache_hidden_states,
            hidden_dtype=d.cache_hidden_dtype,
            # inference needs no activations for backward: batches 4x the training batch
            batch_size=max(4 * plan.train.batch_size, plan.train.eval_batch_size or 0),
        )
        if i in apart and not isinstance(teacher, CachedTeacher):  # its inputs are not in the batch
            raise StageError(f"teachers[{i}] tokenizes unlike teachers[{main}] and must be read from the teacher cache")
        built.append(teacher)
        if not keep:  # outputs are cached: the teacher need not stay resident while the student trains
            del teacher_model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if len(built) == 1:
        return built[0]
    weights = list(d.teacher_weights) if d.teacher_combine == "weighted" else None
    return EnsembleTeacher(built, inputs[main][0], d.teacher_combine, d.temperature, weights, main)


def check_models(
    plan: StagePlan, task: Task, student_config: Any, tokenizer: Any, teacher_configs: Sequence[Any], teacher_toks: Sequence[Any],
) -> tuple[Objective, list[int], list[Any]]:
    """Every check that needs the models' configs and tokenizers only: the objective (layer maps,
    head counts), the lengths against every position table, each teacher's own QA windows, which
    teachers tokenize apart, and the task bound to its tokenizers (StageError on a mismatch).
    Returns (objective, teachers apart, tokenizers the features are planned over)."""
    main = plan.main
    objective = build_objective(task, plan.distill, student_config, teacher_configs[main] if teacher_configs else None)
    check_lengths(plan.data.max_length, "data.max_length", student_config, *teacher_configs)
    for t, config in zip(plan.teachers, teacher_configs):  # a QA teacher's own windows
        if t.max_length:
            check_lengths(t.max_length, f"{t.key}.max_length", config)
    apart = teachers_apart(plan, task, tokenizer, teacher_toks)
    planning = distinct_tokenizers(teacher_toks) if apart else []  # the windows fit every teacher's tokenizer
    main_tok = teacher_toks[main] if teacher_toks else None
    position = [n for n in objective.terms if n in POSITION_TERMS]
    windows = plan.teachers[main].windows if plan.teachers else (None, None)
    key = plan.teachers[main].key if plan.teachers else "teacher"
    bind_tokenizers(task, tokenizer, main_tok, position, planning, windows, plan.distill.kd_loss, key)
    return objective, apart, planning


def setup_stage(plan: StagePlan, accelerator: Accelerator, raw: Optional[DatasetDict] = None) -> Stage:
    """Build the stage: every input (data, models, tokenizers, label names, layer maps, the
    teacher cache) is checked here, before anything is written into the stage folder. `raw`:
    the splits when the caller has read them already (`data.features.read_raw`)."""
    tcfg = plan.train
    check_writable(plan.folder)
    set_seed(plan.seed)
    task = get_task(plan.task, plan.data)
    raw = load_data(plan.data, plan.seed, task, raw)
    check_metrics(task, tcfg.select_metric)
    head, kwargs = task.model_class(), task.model_kwargs()
    # the student's teachers (frozen, in the data's label order), in the recipe's order
    loaded: list[Any] = []
    sources = [t.require() for t in plan.teachers]
    for t, source in zip(plan.teachers, sources):
        loaded.append(models.load_teacher(source, t.source_revision, t.trust_remote_code, head, task.labels))
    model, tokenizer = models.build_trained_model(plan.kind, plan.base, plan.student, head, kwargs)
    toks = [tok for _, tok in loaded]
    objective, apart, planning = check_models(plan, task, model.config, tokenizer, [m.config for m, _ in loaded], toks)
    rows = {"labelled": len(raw["train"])}
    if loaded and (plan.data.transfer or plan.augment.copies):
        rows = add_transfer_rows(plan, raw, accelerator)  # raw["train"] becomes labelled ∪ transfer ∪ augmented
    info = ensemble_info(plan, sources)
    # --- student.vocab.trim: the student keeps the pieces of this stage's training rows (loop/trim.py);
    # teachers of its tokenizer read its ids, so the task is bound again to the trimmed tokenizer
    if plan.student.vocab.trim and plan.kind != "teacher":
        from distill.loop.trim import trim_stage

        position = [n for n in objective.terms if n in POSITION_TERMS]
        model, tokenizer, info["vocab"] = trim_stage(plan, raw, model, tokenizer, loaded, position, accelerator.is_main_process)
        toks = [tok for _, tok in loaded]
        objective, apart, planning = check_models(plan, task, model.config, tokenizer, [m.config for m, _ in loaded], toks)
    # ---
    features = prepare_data(task, raw, accelerator)
    collate = None
    if len(rows) > 1:
        from distill.data.transfer import GoldCollate, mark_gold

        features["train"] = mark_gold(features["train"], raw["train"])  # no gold loss on transfer rows
        collate = GoldCollate(task.collate)
    capture = student_capture(objective, model)
    teacher = None
    if loaded:
        inputs = teacher_inputs(plan, task, tokenizer, toks, apart, raw["train"], features["train"], accelerator)
        teacher = build_teachers(plan, inputs, accelerator, loaded, objective, apart)
    on_gpu = accelerator.device.type == "cuda"
    loader_args = dict(seed=plan.seed, group_by_length=tcfg.group_by_length, num_workers=tcfg.num_workers, pin_memory=on_gpu)
    # cached teachers' rows join the training batches in the collate (in the workers); two
    # phases restart the workers each epoch, so they gather only what the phase reads
    collate = with_cached_targets(teacher, collate or task.collate)
    eval_bs = tcfg.eval_batch_size or 2 * tcfg.batch_size
    return Stage(
        name=plan.kind, out=plan.folder, train=tcfg, task=task, raw=raw, features=features, model=model, tokenizer=tokenizer,
        objective=objective, teacher=teacher, capture=capture, rows=rows,
        teacher_source=(sources[0] if len(sources) == 1 else sources) or None, info=info,
        train_loader=make_loader(
            task, features["train"], tcfg.batch_size, shuffle=True, collate=collate,
            persistent=not objective.two_phase, **loader_args,
        ),
        eval_loaders={
            s: make_loader(task, features[s], eval_bs, **loader_args) for s in ("validation", "test") if s in features
        },
    )


def make_accelerator(plan: StagePlan) -> Accelerator:
    trackers = [t for t in plan.tracking.report_to if t != "none"]
    if "wandb" in trackers:
        try:
            import wandb  # noqa: F401
        except ImportError:
            log.warning("wandb is not installed; logging to log.jsonl only (pip install 'distill[wandb]')")
            trackers.remove("wandb")
    accelerator = Accelerator(
        gradient_accumulation_steps=plan.train.grad_accum,
        log_with=trackers or None,
        project_dir=str(plan.folder),
        # batches come pinned on a GPU (make_loader): copy them up without waiting
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
    )
    board(accelerator)  # this process beats from now on: the others can tell it is alive while they wait
    note = precision_note(accelerator)  # e.g. fp16 on a CPU: said once, and not recorded as used
    if note and accelerator.is_main_process:
        log.warning("%s", note)
    return accelerator
