"""The model card of an exported student: Hub metadata plus the evidence of how it was made.

Everything comes from the files a run leaves behind (DESIGN: downstream tools read only
`metrics.json`, `config.yaml` and `summary.json`), never from a training process:
    <run>/<stage>/metrics.json   the model's validation/test scores and run info
    <run>/<stage>/config.yaml    the resolved recipe
    <teacher>/metrics.json       the fine-tuned teacher's scores: `teacher.dir` when the recipe
                                 sets it (a grid's students share one teacher), else <run>/teacher;
                                 with `teachers:` each one's (`teachers[i].dir`, else <run>/teacher-<i>)
    <run>/baseline/metrics.json  the student fine-tuned alone (when run.baseline=true)
    <run>/summary.json           parameters and CPU latency measured at the end of `distill run`
and, for an export with ONNX files, the parity gate's report (`distill.ship.onnx`).
The YAML header is built with huggingface_hub's `ModelCardData`/`EvalResult`, so the Hub reads
the model-index (task, dataset, split, metric values for validation and test).

One concern over ~500 lines: one document, whose sections read the same run evidence.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from distill import models
from distill.config import Config, ConfigError, has_teacher, load_config, main_teacher, stage_train, teacher_list

if TYPE_CHECKING:
    from distill.ship.onnx import ParityReport

log = logging.getLogger("distill.ship.card")

CARD_CONFIG_NAME = "distill_config.yaml"  # the resolved recipe, shipped beside the weights
# How `distill run`'s closing table (distill.study.summary) times each stage, for summary.json
# rows that do not record it themselves.
SUMMARY_LATENCY_WARMUP = 3
SUMMARY_LATENCY_RUNS = 15
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

    def sibling(name: str, folder: Path) -> Optional[dict]:
        path = folder / "metrics.json"
        itself = name == stage_dir.name or folder.resolve() == stage_dir.resolve()
        return _read_json(path) if path.exists() and not itself else None

    teachers = []
    for i, t in enumerate(teacher_list(cfg)):
        name = f"teacher-{i}" if cfg.teachers else "teacher"
        folder = teacher_folder(cfg, stage_dir, i)
        metrics = sibling(name, folder)
        if metrics is None and t.dir and stage_dir.name != name and not t.finetuned:
            log.warning(
                "no teacher metrics at %s (%s.dir): the card has no score for this teacher. Export "
                "from the folder `distill run` ran in, or where the dir points to the teacher stage",
                folder / "metrics.json", f"teachers[{i}]" if cfg.teachers else "teacher",
            )
        teachers.append({"stage": name, "model": t.model, "finetuned": t.finetuned, "metrics": metrics})
    scored = [t["metrics"] for t in teachers if t["metrics"]]
    metric = (_read_json(stage_dir / "metrics.json").get("info") or {}).get("metric") or cfg.task.metric or "accuracy"
    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path) if summary_path.exists() else []
    return RunEvidence(
        stage_dir=stage_dir,
        cfg=cfg,
        metrics=_read_json(stage_dir / "metrics.json"),
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
    from distill.loop.folders import stage_dir as folder_of

    name = f"teacher-{index}" if cfg.teachers else "teacher"
    t = teacher_list(cfg)[index] if has_teacher(cfg) else cfg.teacher
    return folder_of(cfg, name) if t.dir else stage_dir.parent / name


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
    (albeto-base-6 -> albert-base-6-spanish), `<teacher>-<k>-layers` for layer-subset students."""
    if cfg.student.model:
        return models.short_name(cfg.student.model)
    k = len(cfg.student.from_teacher_layers) or cfg.student.num_layers
    return f"{models.short_name(main_teacher(cfg).model or 'teacher')}-{k}-layers"


def repo_name(cfg: Config, org: str) -> str:
    """`hub.repo_id` with `{org}`, `{student}` and `{task}` filled in."""
    try:
        return cfg.hub.repo_id.format(org=org, student=student_name(cfg), task=cfg.task.name)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"hub.repo_id='{cfg.hub.repo_id}' has an unknown or malformed placeholder ({err}); "
            "use only {org}, {student} and {task}, e.g. '{org}/{student}-distilled-{task}'"
        ) from None


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
# Body
# ---------------------------------------------------------------------------------------------


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.4f}"


def _params(n: Optional[int]) -> str:
    if not n:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def metric_words(metric: str) -> str:
    """How a metric reads in a sentence: 'accuracy', 'F1', 'exact match'."""
    name = METRIC_NAMES.get(metric, metric)
    return name if name.isupper() else name.lower()


def versus_teacher(ev: RunEvidence) -> str:
    """One sentence on what distillation kept: share of the teacher's score, size and speed."""
    metric = ev.metric
    own = ev.metrics.get("test", {}).get(metric)
    ref = (ev.teacher or {}).get("test", {}).get(metric)
    if not ev.distilled or own is None or not ref:
        return ""
    whose = "its best teacher's" if len(ev.teachers) > 1 else "its teacher's"
    parts = [f"{own / ref:.0%} of {whose} {metric_words(metric)} ({ref:.4f})"]
    own_params, ref_params = ev.info.get("parameters"), (ev.teacher.get("info") or {}).get("parameters")
    if own_params and ref_params:
        parts.append(f"{own_params / ref_params:.0%} of its parameters")
    row, teacher_row = _summary_row(ev, ev.stage), _teacher_row(ev)
    if row and teacher_row and row.get("speedup"):
        parts.append(f"{row['speedup']:.2f}× its CPU speed")
    return " That is " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def _model_ref(name: Optional[str]) -> str:
    """A model reference as the card shows it: a Hub link, or 'a local model' for paths
    (local paths say nothing to a reader and may name private folders)."""
    hub = hub_id_of(name)
    return f"[`{hub}`](https://huggingface.co/{hub})" if hub else "a local model"


def _summary_row(ev: RunEvidence, stage: str) -> Optional[dict]:
    return next((r for r in ev.summary if r.get("stage") == stage), None)


def _teacher_row(ev: RunEvidence) -> Optional[dict]:
    """The summary row speeds are relative to: the (first) teacher's."""
    return next((r for r in ev.summary if str(r.get("stage", "")).startswith("teacher")), None)


def describe_student(ev: RunEvidence) -> str:
    cfg, mc = ev.cfg, ev.model_config
    shape = (
        f"{mc.get('model_type', 'transformer')} encoder, {mc.get('num_hidden_layers', '?')} layers, "
        f"hidden size {mc.get('hidden_size', '?')}"
    )
    if cfg.student.model:
        try:
            hub, overrides = models.resolve_student(cfg.student.model)
        except KeyError:
            hub, overrides = hub_id_of(cfg.student.model), {}
        changes = {**overrides, **dict(cfg.student.config_overrides)}
        change = f" with {', '.join(f'`{k}={v}`' for k, v in changes.items())}" if changes else ""
        ref = f"[`{hub}`](https://huggingface.co/{hub})" if hub else "a local model"
        return f"{shape}; initialised from {ref}{change}"
    layers = mc.get("distill_teacher_layers") or list(cfg.student.from_teacher_layers)
    kept = f"layers {layers}" if layers else f"{cfg.student.num_layers} uniformly spread layers"
    which = f"teacher {cfg.distill.intermediate_teacher}, " if len(cfg.teachers) > 1 else "teacher "
    return f"{shape}; initialised from {kept} of the pretrained {which}{_model_ref(main_teacher(cfg).model)}"


def describe_teacher(ev: RunEvidence, index: int = 0) -> str:
    """One teacher: its model, how it was fine-tuned (or that it came fine-tuned), its seed when
    it has its own, and its score."""
    cfg = ev.cfg
    t = teacher_list(cfg)[index]
    if t.finetuned:
        text = f"{_model_ref(t.model)}, already fine-tuned on the task"
    else:
        tc = stage_train(cfg, f"teacher-{index}" if cfg.teachers else "teacher")
        seed = f", seed {t.seed}" if t.seed is not None else ""
        text = (
            f"{_model_ref(t.model)}, fine-tuned on the task in the same run "
            f"({tc.epochs} epoch{'s' if tc.epochs != 1 else ''}, lr {tc.lr:g}, batch {tc.batch_size}{seed})"
        )
    metrics = ev.teachers[index]["metrics"] if index < len(ev.teachers) else None
    score = (metrics or {}).get("test", {}).get(ev.metric)
    if len(ev.teachers) > 1 and score is not None:
        text += f"; {metric_words(ev.metric)} {score:.4f} on `{split_label(cfg, 'test')}`"
    return text


COMBINE_WORDS = {
    "mean": "the mean of their probabilities at temperature T",
    "weighted": "a weighted mean of their probabilities at temperature T (weights {weights})",
    "confident": "per row, the distribution of the teacher with the lowest entropy at temperature T",
}


def describe_teachers(ev: RunEvidence) -> list[str]:
    """The card's teacher lines: one teacher in a line; several as a list, with the rule that
    combines their soft targets and the teacher the intermediate terms follow."""
    cfg = ev.cfg
    if len(cfg.teachers) <= 1:
        return [f"- **Teacher:** {describe_teacher(ev)}."]
    d = cfg.distill
    rule = COMBINE_WORDS[d.teacher_combine].format(weights=", ".join(f"{w:g}" for w in d.teacher_weights))
    lines = [f"- **Teachers** ({len(cfg.teachers)}; soft targets combined as {rule}):"]
    lines += [f"  {i}. {describe_teacher(ev, i)}" for i in range(len(cfg.teachers))]
    intermediate = [n for n in ("hidden", "attention", "relations") if n in (ev.info.get("loss_weights") or {})]
    if intermediate:
        lines.append(f"  The {'/'.join(intermediate)} terms follow teacher {d.intermediate_teacher}.")
    return lines


def describe_losses(ev: RunEvidence) -> list[str]:
    d, family = ev.cfg.distill, ev.cfg.task.family
    weights = ev.info.get("loss_weights") or {}
    where = FAMILY_WORDS.get(family, ("", "the logits"))[1]
    kd = {
        "kl": f"T²·KL(softmax(teacher/T) ‖ softmax(student/T)), T = {d.temperature:g}",
        "ce": f"T²·cross-entropy against the teacher's softened distribution, T = {d.temperature:g}",
        "mse": "mean squared error between raw student and teacher logits",
    }[d.kd_loss]
    text = {
        "ce": "cross-entropy with the gold labels",
        "kd": f"soft labels from the {'teachers (combined as above)' if len(ev.cfg.teachers) > 1 else 'teacher'}: {kd}, on {where}",
        "hidden": (
            f"hidden states ({d.hidden_loss}) against the teacher's, through learned projections "
            f"used only in training (not part of this model); layer map "
            f"{list(d.layer_map) or 'uniform'}"
        ),
        "attention": "the teacher's attention scores (pre-softmax Q·Kᵀ/√d) of mapped layers, MSE",
        "relations": (
            f"the teacher's self-attention relations (Q-Q, K-K, V-V; MiniLMv2), KL, teacher layer "
            f"{d.relation_layer or 'last'}, {d.relation_heads or 'default'} relation heads"
        ),
    }
    lines = [f"- `{name}` × {w:g}: {text.get(name, name)}" for name, w in weights.items()]
    if d.intermediate_epochs and weights:
        lines.append(f"- the first {d.intermediate_epochs} epochs trained the intermediate terms alone (two phases)")
    rows = ev.info.get("train_rows") or {}
    if len(rows) > 1:  # transfer sets or augmentation: the student saw more rows than the labels
        lines.append(
            f"- training rows: {rows.get('labelled', 0)} labelled, {rows.get('transfer', 0)} unlabelled "
            f"(transfer sets), {rows.get('augmented', 0)} augmented copies; soft labels on all, gold "
            f"loss on the labelled only; {rows.get('leaked_dropped', 0)} rows equal to validation or "
            "test rows were dropped"
        )
    return lines or ["- not recorded in metrics.json"]


def results_table(ev: RunEvidence, val: str, test: str) -> list[str]:
    metric = ev.metric
    rows = []
    own = "this model (distilled)" if ev.distilled else "this model"
    if len(ev.teachers) > 1:
        candidates = [
            (t["stage"], f"teacher {i} (fine-tuned)", t["metrics"]) for i, t in enumerate(ev.teachers)
        ]
    else:
        candidates = [("teacher", "teacher (fine-tuned)", ev.teacher)]
    candidates.append((ev.stage, own, ev.metrics))
    if ev.stage != "baseline":
        candidates.append(("baseline", "same student fine-tuned without a teacher", ev.baseline))
    for stage, label, m in candidates:
        if not m:
            continue
        srow = _summary_row(ev, stage) or {}
        params = (m.get("info") or {}).get("parameters") or srow.get("parameters")
        speed = srow.get("speedup") if _teacher_row(ev) else None
        rows.append(
            f"| {label} | {_params(params)} | {_fmt(m.get('validation', {}).get(metric))} | "
            f"{_fmt(m.get('test', {}).get(metric))} | {'–' if speed is None else f'{speed:.2f}×'} |"
        )
    head = [
        f"| model | parameters | {metric} ({val}) | {metric} ({test}) | speed vs teacher |",
        "|---|---|---|---|---|",
    ]
    return head + rows


def speed_note(ev: RunEvidence) -> str:
    own, teacher = _summary_row(ev, ev.stage), _teacher_row(ev)
    if not (own and teacher and own.get("latency_ms") and teacher.get("latency_ms")):
        return (
            "Speed was not measured in this run (no teacher row in summary.json); "
            "`distill bench` measures it."
        )
    runs = own.get("runs") or SUMMARY_LATENCY_RUNS
    warmup = own.get("warmup", SUMMARY_LATENCY_WARMUP)
    threads = f", {own['threads']} thread{'s' if own['threads'] != 1 else ''}" if own.get("threads") else ""
    return (
        f"Speed is the teacher's latency over this model's, both timed round-robin on the "
        f"training machine's CPU{threads} at the end of `distill run`: batch 1, sequence length "
        f"{ev.cfg.data.max_length}, random token ids, median of {runs} forwards after {warmup} "
        f"warm-up (teacher {teacher['latency_ms']:.1f} ms, this model {own['latency_ms']:.1f} ms). "
        "Ratios on other hardware and lengths differ; `distill bench` measures them."
    )


QA_SNIPPET = """import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

name = "{repo_id}"
tokenizer = AutoTokenizer.from_pretrained(name)
model = AutoModelForQuestionAnswering.from_pretrained(name).eval()
question = "{question}"
context = "{context}"
inputs = tokenizer(question, context, truncation="only_second", return_offsets_mapping=True, return_tensors="pt")
offsets = inputs.pop("offset_mapping")[0]  # [seq, 2] character spans
in_context = torch.tensor([s == 1 for s in inputs.sequence_ids(0)])  # [seq]
with torch.no_grad():
    out = model(**inputs)
start = out.start_logits[0].masked_fill(~in_context, -1e9)  # [seq]
end = out.end_logits[0].masked_fill(~in_context, -1e9)  # [seq]
span = start[:, None] + end[None, :]  # [seq, seq]: score of (start, end)
valid = torch.ones_like(span, dtype=torch.bool).triu().tril(30)  # end >= start, <= 30 tokens
i, j = divmod(int(span.masked_fill(~valid, -1e9).argmax()), span.size(1))
print(context[offsets[i][0] : offsets[j][1]])"""


def usage_snippet(repo_id: str, pipeline_tag: str, language: list[str]) -> list[str]:
    """A runnable example. Question answering spells out the span search: the
    `question-answering` pipeline is gone from transformers 5 (4.x releases still have it)."""
    texts = example_texts(language)
    if pipeline_tag == "question-answering":
        code = QA_SNIPPET.format(repo_id=repo_id, question=texts["question"], context=texts["context"])
    elif pipeline_tag == "token-classification":
        text = texts["token-classification"]
        code = (
            "from transformers import pipeline\n\n"
            f'tagger = pipeline("token-classification", model="{repo_id}", aggregation_strategy="simple")\n'
            f'print(tagger("{text}"))'
        )
    else:
        text = texts["text-classification"]
        code = (
            "from transformers import pipeline\n\n"
            f'classifier = pipeline("text-classification", model="{repo_id}")\n'
            f'print(classifier("{text}"))'
        )
    return ["```python", code, "```"]


ONNX_HEAD = """import numpy as np
import onnxruntime as ort
from huggingface_hub import hf_hub_download
from transformers import AutoConfig, AutoTokenizer

name = "{repo_id}"
tokenizer = AutoTokenizer.from_pretrained(name)
session = ort.InferenceSession(hf_hub_download(name, "{file}"), providers=["CPUExecutionProvider"])
wanted = {{i.name for i in session.get_inputs()}}
"""
ONNX_BODIES = {
    "text-classification": """inputs = tokenizer(["{text}"], return_tensors="np")
logits = session.run(["logits"], {{k: v for k, v in inputs.items() if k in wanted}})[0]  # [batch, labels]
id2label = AutoConfig.from_pretrained(name).id2label
print([id2label[int(i)] for i in logits.argmax(-1)])""",
    "token-classification": """inputs = tokenizer("{text}", return_tensors="np")
logits = session.run(["logits"], {{k: v for k, v in inputs.items() if k in wanted}})[0][0]  # [seq, labels]
id2label = AutoConfig.from_pretrained(name).id2label
tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
print([(t, id2label[int(i)]) for t, i in zip(tokens, logits.argmax(-1)) if t not in tokenizer.all_special_tokens])""",
    "question-answering": """question, context = "{question}", "{context}"
inputs = tokenizer(question, context, truncation="only_second", return_offsets_mapping=True, return_tensors="np")
offsets = inputs.pop("offset_mapping")[0]  # [seq, 2] character spans
feeds = {{k: v for k, v in inputs.items() if k in wanted}}
start, end = (x[0] for x in session.run(["start_logits", "end_logits"], feeds))  # [seq] each
in_context = np.array([s == 1 for s in inputs.sequence_ids(0)])  # [seq]
span = np.where(in_context, start, -1e9)[:, None] + np.where(in_context, end, -1e9)[None, :]  # [seq, seq]
allowed = np.triu(np.ones(span.shape, dtype=bool)) & np.tril(np.ones(span.shape, dtype=bool), 30)  # end >= start, <= 30 tokens
i, j = np.unravel_index(np.where(allowed, span, -1e9).argmax(), span.shape)
print(context[offsets[i][0] : offsets[j][1]])""",
}


def example_texts(language: list[str]) -> dict[str, str]:
    """The sentences the usage snippets run on, in the model's language when it is Spanish."""
    if "es" in language:
        return {
            "text-classification": "El servicio fue excelente y volvería sin dudarlo.",
            "token-classification": "Ana vive en Madrid y trabaja en la Universidad de Chile.",
            "question": "¿Dónde está el Museo del Prado?",
            "context": "El Museo del Prado se encuentra en Madrid.",
        }
    return {
        "text-classification": "Great service, I would come back.",
        "token-classification": "Ana lives in Madrid.",
        "question": "Where is the Prado Museum?",
        "context": "The Prado Museum is in Madrid.",
    }


def onnx_snippet(repo_id: str, pipeline_tag: str, file: str, language: list[str]) -> list[str]:
    """About ten lines that run `file` with ONNX Runtime and print what the model predicts."""
    texts = example_texts(language)
    body = ONNX_BODIES.get(pipeline_tag, ONNX_BODIES["text-classification"])
    code = ONNX_HEAD.format(repo_id=repo_id, file=file) + body.format(text=texts.get(pipeline_tag, ""), **texts)
    return ["```python", code, "```"]


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def onnx_section(report: "ParityReport", repo_id: str, pipeline_tag: str, language: list[str]) -> list[str]:
    """The ONNX files: their scores beside PyTorch's on the same split, what the parity gate
    checked, the measured latency of each file, and how to run one with ONNX Runtime."""
    metric, split, lat = report.metric, report.split, report.latency
    ref_ms = report.files["pytorch"].latency_ms
    rows = []
    for name, r in report.files.items():
        speed = f"{ref_ms / r.latency_ms:.2f}×" if ref_ms and r.latency_ms else "–"
        diff = "–" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
        score = r.metrics.get(metric)
        rows.append(
            f"| `{r.file}` | {RUNTIMES.get(name, name)} | {_fmt(score)} | {diff} | {r.size_mb:.1f} MB | "
            f"{_ms(r.latency_ms)} | {speed} |"
        )
    has_int8 = "int8" in report.files
    files = "`model.onnx` (fp32)" + (
        " and `model.int8.onnx` (weights quantised to int8 by ONNX Runtime's dynamic quantisation, "
        "activations quantised on the fly)" if has_int8 else ""
    )
    checks = f"`model.onnx` reproduces the PyTorch model's outputs to within {report.atol:g} (largest absolute difference)"
    if has_int8:
        checks += (
            f" and `model.int8.onnx` loses at most {report.margin:g} points of {metric_words(metric)} "
            f"against PyTorch on the same split"
        )
    if report.failures:
        verdict = (
            "**These files failed that check and were published anyway:** "
            + "; ".join(report.failures) + ". Prefer `model.safetensors`."
        )
    else:
        verdict = "Both checks passed." if has_int8 else "The check passed."
    threads = f"{lat.threads} thread{'s' if lat.threads != 1 else ''}"
    usage_file = "model.int8.onnx" if has_int8 and not report.failures else "model.onnx"
    return [
        "## ONNX Runtime and int8",
        "",
        f"The repository also holds {files}, with dynamic batch and sequence axes. Each was run "
        f"beside the PyTorch model on the `{split}` split ({report.examples} examples, the split "
        "the model was selected on):",
        "",
        f"| file | runtime | {metric} ({split}) | max \\|Δ output\\| vs PyTorch | size | latency (ms) | speed vs PyTorch |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"The export checked that {checks}. {verdict}",
        f"Latency: batch {lat.batch}, sequence length {lat.seq}, random token ids, CPU "
        f"({lat.device_name or 'not recorded'}), {threads}, median of {lat.runs} runs after "
        f"{lat.warmup} warm-up, the files timed round-robin on the export machine.",
        "",
        f"With ONNX Runtime (`pip install onnxruntime transformers`; PyTorch is not needed), `{usage_file}`:",
        "",
        *onnx_snippet(repo_id, pipeline_tag, usage_file, language),
        "",
    ]


RUNTIMES = {"pytorch": "PyTorch fp32", "onnx": "ONNX Runtime fp32", "int8": "ONNX Runtime int8"}


def hyperparameters(ev: RunEvidence) -> list[str]:
    cfg, info = ev.cfg, ev.info
    t = stage_train(cfg, ev.stage if ev.stage == "teacher" else "student")
    rows = {
        "learning rate": f"{t.lr:g} (linear decay, warm-up {t.warmup_ratio:g} of the steps)",
        "batch size": f"{t.batch_size} × {t.grad_accum} accumulation",
        "epochs": f"{t.epochs}" + (f" (max {t.max_steps} steps)" if t.max_steps > 0 else ""),
        "optimizer steps": f"{info.get('steps', '–')} (model kept from step {info.get('best_step', '–')})",
        "model selection": f"best validation {info.get('select_metric') or t.select_metric or ev.metric}"
        + (f", early stopping patience {t.patience}" if t.patience else ""),
        "weight decay / grad clip": f"{t.weight_decay:g} / {t.max_grad_norm:g}",
        "max sequence length": f"{cfg.data.max_length}" + (f", doc stride {cfg.data.doc_stride}" if cfg.task.family == "qa" else ""),
        "seed": f"{cfg.seed}",
    }
    if cfg.data.max_train_samples:
        rows["training rows"] = f"first {cfg.data.max_train_samples}"
    return ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows.items()]


def reproduce_note(cfg: Config) -> str:
    stages = []
    tuned = [t for t in teacher_list(cfg) if not t.finetuned]
    if tuned:
        stages.append("fine-tunes the teacher" if len(tuned) == 1 and not cfg.teachers else f"fine-tunes {len(tuned)} teachers")
    stages.append("distils the student" if has_teacher(cfg) else "fine-tunes the model")
    if cfg.run.baseline and has_teacher(cfg):
        stages.append("fine-tunes the same student without a teacher (the baseline)")
    listed = ", ".join(stages[:-1]) + (" and " if len(stages) > 1 else "") + stages[-1]
    return (
        f"It {listed}, writing to the recipe's `output_dir` (change it with `output_dir=...`), "
        f"and prints the closing table of scores, parameters and speed."
    )


def card_body(ev: RunEvidence, repo_id: str, pipeline_tag: str, onnx: Optional["ParityReport"] = None) -> str:
    cfg = ev.cfg
    task_words = FAMILY_WORDS.get(cfg.task.family, (cfg.task.family,))[0]
    dataset = hub_dataset_id(cfg)
    data_ref = f"[`{dataset}`](https://huggingface.co/datasets/{dataset})" + (
        f" (config `{cfg.data.name}`)" if cfg.data.name else ""
    ) if dataset else f"the `{cfg.task.name}` data (local files)"
    val, test = split_label(cfg, "validation"), split_label(cfg, "test")
    metric, params = ev.metric, ev.info.get("parameters")
    own_test = ev.metrics.get("test", {}).get(metric)
    title = repo_id.split("/")[-1]
    if ev.distilled:
        who = f"an ensemble of {len(ev.teachers)} fine-tuned teachers" if len(ev.teachers) > 1 else "a fine-tuned teacher"
        how = f"distilled from {who} by task-specific knowledge distillation"
    else:
        how = "fine-tuned on the task without a teacher"
    lines = [
        f"# {title}",
        "",
        f"A {_params(params)}-parameter {ev.model_config.get('model_type', 'transformer')} model for "
        f"{task_words} on {data_ref}, {how}."
        + (f" It scores {metric_words(metric)} {own_test:.4f} on the `{test}` split." if own_test is not None else "")
        + versus_teacher(ev),
        "The repository holds the model alone (no teacher, no training-only layers, no optimizer "
        "state) as safetensors: it loads with plain `transformers`."
        + (" ONNX files for ONNX Runtime sit beside it (see below)." if onnx is not None else ""),
        "",
        "## Results",
        "",
        *results_table(ev, val, test),
        "",
        speed_note(ev),
        "",
    ]
    labels = ev.model_config.get("id2label") or {}
    if cfg.task.family != "qa" and labels:
        names = [labels[k] for k in sorted(labels, key=int)]
        shown = ", ".join(f"`{n}`" for n in names[:30]) + (" …" if len(names) > 30 else "")
        lines += [f"Labels ({len(names)}): {shown}.", ""]
    lines += ["## How it was made", ""]
    lines.append(f"- **Student:** {describe_student(ev)}.")
    if ev.distilled:
        lines += describe_teachers(ev)
    lines += ["- **Loss:** a weighted sum of", *[f"  {line}" for line in describe_losses(ev)]]
    lines += ["", "Training hyperparameters:", "", *hyperparameters(ev), ""]
    lines += ["## Usage", "", *usage_snippet(repo_id, pipeline_tag, list(cfg.hub.language)), ""]
    if onnx is not None:
        lines += onnx_section(onnx, repo_id, pipeline_tag, list(cfg.hub.language))
    local = [s for s in (cfg.data.source, *cfg.data.files.values()) if s and not hub_dataset_id(cfg)]
    lines += [
        "## Reproduce",
        "",
        f"The resolved recipe is in this repository as `{CARD_CONFIG_NAME}`. With the `distill` "
        "package installed:",
        "",
        "```bash",
        f"distill run {CARD_CONFIG_NAME}",
        "```",
        "",
        reproduce_note(cfg),
    ]
    if local:
        lines.append(
            "The recipe reads local data files (" + ", ".join(f"`{p}`" for p in local)
            + "): run it where they exist or point `data.files.<split>` at your copies."
        )
    lines += [
        "",
        "## Limitations",
        "",
        f"Scores hold for {data_ref} as evaluated here; text from other domains or languages will"
        " do worse. The model inherits the biases and errors of its training data"
        + (" and of its teacher." if ev.distilled else "."),
        "",
    ]
    return "\n".join(lines)


def card_repo_id(card_text: str) -> Optional[str]:
    """The repo id a card was written for (its usage snippet loads it)."""
    match = re.search(r'(?:model=|name = )"([^"]+)"', card_text)
    return match.group(1) if match else None


def build_card(ev: RunEvidence, repo_id: str, pipeline_tag: str, onnx: Optional["ParityReport"] = None) -> ModelCard:
    """The README.md of an export: metadata from `card_data`, body from `card_body` (with the
    ONNX section when the export holds ONNX files)."""
    data = card_data(ev, repo_id, pipeline_tag)
    if onnx is not None:
        data.tags = [*(data.tags or []), "onnx"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(ev, repo_id, pipeline_tag, onnx)}")
