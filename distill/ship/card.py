"""The model card (README.md) of an exported student: Hub metadata plus how the model was made.

`card_data` builds the YAML header with huggingface_hub's `ModelCardData`/`EvalResult`, so the
Hub reads the model-index (task, dataset, split, metric values for validation and test).
`card_fields` gathers the facts the body states from the run's evidence (`distill.ship.evidence`)
and, for an export with ONNX files, the parity gate's report (`distill.ship.onnx`);
`card_template.md` beside this module holds the wording and layout, rendered by
`ModelCard.from_template`. The card is written in English; its usage snippets run in Spanish
when the recipe's `hub.language` lists `es`, else in English.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from distill import models
from distill.config import Config, has_teacher, main_teacher, stage_train, teacher_list
from distill.ship.evidence import RunEvidence, hub_dataset_id, hub_id_of, load_evidence  # noqa: F401 (load_evidence: read with the card)
from distill.ship.onnx import FILE_LABELS

if TYPE_CHECKING:
    from distill.ship.onnx import ParityReport

TEMPLATE = Path(__file__).with_name("card_template.md")
CARD_CONFIG_NAME = "distill_config.yaml"  # the resolved recipe, shipped beside the weights
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "f1": "F1",
    "precision": "Precision",
    "recall": "Recall",
    "exact_match": "Exact match",
}
FAMILY_WORDS = {
    "classification": ("text classification", "the sequence logits of each example"),
    "tagging": ("token classification", "the logits of the first sub-token of each word"),
    "qa": (
        "extractive question answering",
        "the start and end logits over each window's context tokens (and CLS), averaged",
    ),
}


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def split_label(cfg: Config, role: str) -> str:
    """The split as evaluated: its name, with the slice when max_eval_samples cut it.

    A validation split carved from train is certain only for local files without one (a Hub
    dataset's own validation split, when it has one, wins over data.validation_from_train).
    """
    d = cfg.data
    if role == "validation" and d.validation_from_train and d.files and not d.files.get("validation"):
        name = f"{cfg.data.splits.train or 'train'} (held-out {cfg.data.validation_from_train:.0%})"
    else:
        name = getattr(cfg.data.splits, role) or role
    n = cfg.data.max_eval_samples
    return f"{name}[:{n}]" if n else name


def scored_metrics(split_metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric task metrics of one split (the gold-label loss is left out of the model-index)."""
    return {k: float(v) for k, v in split_metrics.items() if k != "loss" and isinstance(v, (int, float))}


def card_data(ev: RunEvidence, repo_id: str, pipeline_tag: str) -> ModelCardData:
    cfg = ev.cfg
    dataset = hub_dataset_id(cfg)
    dataset_type = dataset or cfg.task.name
    dataset_name = f"{dataset} ({cfg.data.name})" if dataset and cfg.data.name else (dataset or f"{cfg.task.name} (local files)")
    results = []
    for role in ("validation", "test"):
        for metric, value in scored_metrics(ev.metrics.get(role, {})).items():
            results.append(
                EvalResult(
                    task_type=pipeline_tag,
                    task_name=FAMILY_WORDS.get(cfg.task.family, (cfg.task.family,))[0],
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_config=cfg.data.name if dataset else None,
                    dataset_split=split_label(cfg, role),
                    dataset_revision=cfg.data.revision if dataset else None,
                    metric_type=metric,
                    metric_name=METRIC_NAMES.get(metric, metric),
                    metric_value=round(value, 6),
                )
            )
    tags = ["knowledge-distillation", "distillation"] if ev.distilled else ["fine-tuned"]
    tags += [cfg.task.name, cfg.task.family, ev.model_config.get("model_type", "")]
    return ModelCardData(
        language=list(cfg.hub.language) or None,
        license=cfg.hub.license or None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=[t for i, t in enumerate(tags) if t and t not in tags[:i]],
        datasets=[dataset] if dataset else None,
        base_model=base_model(cfg),
        metrics=sorted({r.metric_type for r in results}) or None,
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
    )


def base_model(cfg: Config) -> Optional[str]:
    """The Hub model the student's weights started from."""
    return hub_id_of(cfg.student.model) if cfg.student.model else hub_id_of(main_teacher(cfg).model)


# ---------------------------------------------------------------------------------------------
# The facts the body states (the template words them)
# ---------------------------------------------------------------------------------------------


def metric_words(metric: str) -> str:
    """How a metric reads in a sentence: 'accuracy', 'F1', 'exact match'."""
    name = METRIC_NAMES.get(metric, metric)
    return name if name.isupper() else name.lower()


def versus_teacher(ev: RunEvidence) -> list[str]:
    """What distillation kept, as phrases: share of the teacher's score, of its size, its speed."""
    metric = ev.metric
    own = ev.metrics.get("test", {}).get(metric)
    ref = (ev.teacher or {}).get("test", {}).get(metric)
    if not ev.distilled or own is None or not ref:
        return []
    whose = "its best teacher's" if len(ev.teachers) > 1 else "its teacher's"
    parts = [f"{own / ref:.0%} of {whose} {metric_words(metric)} ({ref:.4f})"]
    own_params, ref_params = ev.info.get("parameters"), (ev.teacher.get("info") or {}).get("parameters")
    if own_params and ref_params:
        parts.append(f"{own_params / ref_params:.0%} of its parameters")
    row = ev.summary_row(ev.stage)
    if row and ev.teacher_row() and row.get("speedup"):
        parts.append(f"{row['speedup']:.2f}× its CPU speed")
    return parts


def results_rows(ev: RunEvidence) -> list[dict[str, Any]]:
    """The results table: each teacher, this model and the baseline, where they were scored."""
    metric = ev.metric
    if len(ev.teachers) > 1:
        candidates = [(t["stage"], f"teacher {i} (fine-tuned)", t["metrics"]) for i, t in enumerate(ev.teachers)]
    else:
        candidates = [("teacher", "teacher (fine-tuned)", ev.teacher)]
    candidates.append((ev.stage, "this model (distilled)" if ev.distilled else "this model", ev.metrics))
    if ev.stage != "baseline":
        candidates.append(("baseline", "same student fine-tuned without a teacher", ev.baseline))
    timed = ev.teacher_row() is not None  # speeds are relative to the teacher's timing
    rows = []
    for stage, label, m in candidates:
        if not m:
            continue
        srow = ev.summary_row(stage) or {}
        rows.append({
            "label": label,
            "parameters": (m.get("info") or {}).get("parameters") or srow.get("parameters"),
            "validation": m.get("validation", {}).get(metric),
            "test": m.get("test", {}).get(metric),
            "speedup": srow.get("speedup") if timed else None,
        })
    return rows


def speed_fields(ev: RunEvidence) -> Optional[dict[str, Any]]:
    """How the closing summary timed this model against the teacher (None: it did not). The
    warm-up and run counts are those summary.json recorded (absent from older summaries)."""
    own, teacher = ev.summary_row(ev.stage), ev.teacher_row()
    if not (own and teacher and own.get("latency_ms") and teacher.get("latency_ms")):
        return None
    return {
        "threads": own.get("threads"), "seq": ev.cfg.data.max_length, "runs": own.get("runs"),
        "warmup": own.get("warmup"), "teacher_ms": teacher["latency_ms"], "own_ms": own["latency_ms"],
    }


def student_fields(ev: RunEvidence) -> dict[str, Any]:
    """The student's shape and where its weights started: a model (with config changes), or
    layers of the teacher."""
    cfg, mc = ev.cfg, ev.model_config
    shape = {
        "model_type": mc.get("model_type", "transformer"),
        "layers": mc.get("num_hidden_layers", "?"),
        "hidden": mc.get("hidden_size", "?"),
    }
    if cfg.student.model:
        try:
            hub, overrides = models.resolve_student(cfg.student.model)
        except KeyError:
            hub, overrides = hub_id_of(cfg.student.model), {}
        changes = {**overrides, **dict(cfg.student.config_overrides)}
        return {**shape, "cut_from_teacher": False, "source": hub, "changes": changes, "cut": cfg.student.num_layers,
                "vocab": ev.info.get("vocab")}
    return {
        **shape,
        "cut_from_teacher": True,
        "source": hub_id_of(main_teacher(cfg).model),
        "layers_kept": mc.get("distill_teacher_layers") or list(cfg.student.from_teacher_layers),
        "num_layers": cfg.student.num_layers,
        "teacher_index": cfg.distill.intermediate_teacher,
        "vocab": ev.info.get("vocab"),
    }


def teacher_fields(ev: RunEvidence) -> list[dict[str, Any]]:
    """Each teacher: its Hub id (None: a local model), whether it came fine-tuned, how this run
    fine-tuned it, and its test score."""
    cfg = ev.cfg
    out = []
    for i, t in enumerate(teacher_list(cfg)):
        tc = stage_train(cfg, f"teacher-{i}" if cfg.teachers else "teacher")
        metrics = ev.teachers[i]["metrics"] if i < len(ev.teachers) else None
        out.append({
            "model": hub_id_of(t.model), "finetuned": t.finetuned, "epochs": tc.epochs, "lr": tc.lr,
            "batch_size": tc.batch_size, "seed": t.seed, "score": (metrics or {}).get("test", {}).get(ev.metric),
        })
    return out


def loss_fields(ev: RunEvidence) -> dict[str, Any]:
    """The loss terms and weights the stage trained with, and the settings their lines name."""
    d, family = ev.cfg.distill, ev.cfg.task.family
    return {
        "weights": ev.info.get("loss_weights") or {},
        "where": FAMILY_WORDS.get(family, ("", "the logits"))[1],
        "kd_loss": d.kd_loss,
        "temperature": d.temperature,
        "hidden_loss": d.hidden_loss,
        "layer_map": list(d.layer_map),
        "relation_layer": d.relation_layer,
        "relation_heads": d.relation_heads,
        "intermediate_epochs": d.intermediate_epochs,
        # transfer sets or augmentation: the student saw more rows than the labelled ones
        "rows": ev.info.get("train_rows") or {},
    }


def onnx_fields(report: "ParityReport") -> dict[str, Any]:
    """The ONNX files beside PyTorch on the same split: scores, distance, size, latency."""
    ref_ms = report.files["pytorch"].latency_ms
    files = [
        {
            "file": r.file, "runtime": FILE_LABELS.get(name, name), "score": r.metrics.get(report.metric),
            "max_abs_diff": r.max_abs_diff, "size_mb": r.size_mb, "latency_ms": r.latency_ms,
            "speedup": ref_ms / r.latency_ms if ref_ms and r.latency_ms else None,
        }
        for name, r in report.files.items()
    ]
    int8 = "int8" in report.files
    return {
        "split": report.split, "examples": report.examples, "metric": report.metric,
        "metric_words": metric_words(report.metric), "atol": report.atol, "margin": report.margin,
        "files": files, "int8": int8, "failures": report.failures, "latency": report.latency,
        "usage_file": "model.int8.onnx" if int8 and not report.failures else "model.onnx",
    }


def card_fields(ev: RunEvidence, repo_id: str, pipeline_tag: str, onnx: Optional["ParityReport"] = None) -> dict[str, Any]:
    """Everything `card_template.md` states, from the run's evidence (and the parity report)."""
    cfg = ev.cfg
    dataset = hub_dataset_id(cfg)
    if dataset:
        data_ref = f"[`{dataset}`](https://huggingface.co/datasets/{dataset})" + (f" (config `{cfg.data.name}`)" if cfg.data.name else "")
    else:
        data_ref = f"the `{cfg.task.name}` data (local files)"
    labels = ev.model_config.get("id2label") or {}
    info = ev.info
    train = stage_train(cfg, ev.stage if ev.stage == "teacher" else "student")
    return {
        "title": repo_id.split("/")[-1],
        "repo_id": repo_id,
        "pipeline_tag": pipeline_tag,
        "spanish": "es" in cfg.hub.language,
        "parameters": info.get("parameters"),
        "model_type": ev.model_config.get("model_type", "transformer"),
        "task_words": FAMILY_WORDS.get(cfg.task.family, (cfg.task.family,))[0],
        "data_ref": data_ref,
        "distilled": ev.distilled,
        "metric": ev.metric,
        "metric_words": metric_words(ev.metric),
        "validation_split": split_label(cfg, "validation"),
        "test_split": split_label(cfg, "test"),
        "own_test": ev.metrics.get("test", {}).get(ev.metric),
        "versus": versus_teacher(ev),
        "results": results_rows(ev),
        "speed": speed_fields(ev),
        "labels": [labels[k] for k in sorted(labels, key=int)] if cfg.task.family != "qa" else [],
        "student": student_fields(ev),
        "teachers": teacher_fields(ev),
        "combine": {
            "rule": cfg.distill.teacher_combine,
            "weights": ", ".join(f"{w:g}" for w in cfg.distill.teacher_weights),
            "intermediate_teacher": cfg.distill.intermediate_teacher,
            "intermediate_terms": [n for n in ("hidden", "attention", "relations") if n in (info.get("loss_weights") or {})],
        },
        "loss": loss_fields(ev),
        "train": train,
        "steps": info.get("steps"),
        "best_step": info.get("best_step"),
        "select_metric": info.get("select_metric") or train.select_metric or ev.metric,
        "family": cfg.task.family,
        "max_length": cfg.data.max_length,
        "doc_stride": cfg.data.doc_stride,
        "seed": cfg.seed,
        "max_train_samples": cfg.data.max_train_samples,
        "onnx": onnx_fields(onnx) if onnx is not None else None,
        "config_name": CARD_CONFIG_NAME,
        "reproduce": {
            "tuned_teachers": len([t for t in teacher_list(cfg) if not t.finetuned]),
            "several_teachers": bool(cfg.teachers),
            "has_teacher": has_teacher(cfg),
            "baseline": cfg.run.baseline and has_teacher(cfg),
        },
        "local_data": [s for s in (cfg.data.source, *cfg.data.files.values()) if s and not dataset],
    }


def build_card(ev: RunEvidence, repo_id: str, pipeline_tag: str, onnx: Optional["ParityReport"] = None) -> ModelCard:
    """The README.md of an export: metadata from `card_data`, body from `card_template.md` (with
    the ONNX section when the export holds ONNX files)."""
    data = card_data(ev, repo_id, pipeline_tag)
    if onnx is not None:
        data.tags = [*(data.tags or []), "onnx"]
    return ModelCard.from_template(data, template_path=str(TEMPLATE), **card_fields(ev, repo_id, pipeline_tag, onnx))


def card_body(ev: RunEvidence, repo_id: str, pipeline_tag: str, onnx: Optional["ParityReport"] = None) -> str:
    """The card's markdown without its metadata header."""
    return build_card(ev, repo_id, pipeline_tag, onnx).text
