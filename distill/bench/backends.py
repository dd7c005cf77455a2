"""Inference back-ends for an exported sequence-classification student, measured side by side.

For a saved model folder: PyTorch eager, torch.compile, ONNX Runtime fp32 (exported with
torch.onnx) and ONNX Runtime int8 (onnxruntime's dynamic quantization); the conversion is
`distill.ship.onnx`'s, the same that `distill export --onnx --int8` ships. Each back-end gets the
same random inputs for latency and the same evaluation texts for accuracy and for agreement
with eager (fraction of equal predictions, largest logit difference). A back-end that cannot be
built on the installed versions is reported as unavailable with the reason, never a crash.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from distill.latency import (
    Timing,
    device_name,
    fixed_threads,
    random_inputs,
    summarize,
    time_calls,
)
from distill.ship.onnx import INPUT_NAMES, OnnxExportError, OnnxModel, export_onnx, quantize_int8

BACKENDS = ("eager", "compile", "onnx", "onnx-int8")

# model inputs, each [batch, seq] -> logits [batch, labels]
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


class BackendUnavailable(RuntimeError):
    """A back-end that cannot be built here; the message is the reason shown in the report."""


@dataclass
class EvalRow:
    text: str
    label: Any = None  # int id or a label name from the model's config; None = unlabeled
    text_pair: str | None = None


@dataclass
class BackendResult:
    """One back-end's speed and its accuracy change against eager on the same inputs."""

    backend: str
    available: bool
    reason: str = ""
    timing: Timing | None = None
    accuracy: float | None = None  # on the labeled eval rows
    agreement: float | None = None  # fraction of eval predictions equal to eager's
    max_logit_diff: float | None = None  # largest |logit - eager logit| over the eval rows
    size_mb: float | None = None  # weights in memory (eager/compile) or the .onnx file
    setup_s: float = 0.0  # export / quantization / first-call compile time
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "timing"}
        out["timing"] = self.timing.as_dict() if self.timing else None
        return out


# --- evaluation data ---------------------------------------------------------------------------
def load_eval(source: str | Path | Sequence[Any]) -> list[EvalRow]:
    """Eval rows from a jsonl file ({"text", "label"[, "text_pair"]} per line) or a list of
    EvalRow / dicts / (text, label) tuples."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"--eval file '{path}' does not exist")
        items: list[Any] = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{n}: not valid JSON ({err.msg}); expected one object per line"
                ) from err
        where = str(path)
    else:
        items, where = list(source), "eval rows"
    rows = []
    for n, item in enumerate(items, 1):
        if isinstance(item, EvalRow):
            rows.append(item)
        elif isinstance(item, dict):
            if "text" not in item:
                raise ValueError(
                    f"{where}, row {n}: no 'text' field (has {sorted(item)}); "
                    'expected {"text": ..., "label": ..., optional "text_pair": ...}'
                )
            rows.append(EvalRow(str(item["text"]), item.get("label"), item.get("text_pair")))
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            rows.append(EvalRow(str(item[0]), item[-1], str(item[1]) if len(item) == 3 else None))
        else:
            raise ValueError(
                f"{where}, row {n}: expected a dict or (text[, text_pair], label), got {item!r:.80}"
            )
    if not rows:
        raise ValueError(f"{where}: no evaluation rows")
    return rows


def label_ids(rows: list[EvalRow], config: Any) -> np.ndarray:
    """Gold label ids [rows] (-1 = unlabeled); names map through the model's label2id."""
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    num_labels = getattr(config, "num_labels", len(label2id))
    ids = []
    for n, row in enumerate(rows, 1):
        if row.label is None:
            ids.append(-1)
        elif isinstance(row.label, (int, np.integer)) and not isinstance(row.label, bool):
            if not 0 <= int(row.label) < num_labels:
                raise ValueError(
                    f"eval row {n}: label {row.label} is outside the model's {num_labels} labels"
                )
            ids.append(int(row.label))
        elif str(row.label) in label2id:
            ids.append(label2id[str(row.label)])
        else:
            raise ValueError(
                f"eval row {n}: label '{row.label}' is not one of the model's labels {sorted(label2id)}"
            )
    return np.array(ids, dtype=np.int64)


def encode(tokenizer: Any, rows: list[EvalRow], names: Sequence[str], max_length: int, batch_size: int
           ) -> list[dict[str, np.ndarray]]:
    """Tokenized eval batches, each padded to its own longest row ([batch, seq] int64 arrays)."""
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pairs = [r.text_pair or "" for r in chunk] if any(r.text_pair for r in chunk) else None
        enc = tokenizer([r.text for r in chunk], pairs, padding=True, truncation=True,
                        max_length=max_length, return_tensors="np")
        batches.append({k: enc[k].astype(np.int64) for k in names if k in enc})
    return batches


# --- back-ends ---------------------------------------------------------------------------------
def torch_runner(model: nn.Module) -> Runner:
    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        return out.logits.float().numpy()

    return run


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def onnx_runner(path: Path, threads: int) -> Runner:
    session = OnnxModel(path, threads)  # same thread budget as the PyTorch back-ends
    return lambda inputs: session.run(inputs)["logits"]


# --- the comparison ----------------------------------------------------------------------------
def compare_backends(
    model_dir: str | Path,
    eval_data: str | Path | Sequence[Any] | None = None,
    backends: Sequence[str] = BACKENDS,
    *,
    batch: int = 1,
    seq: int = 128,
    warmup: int = 5,
    runs: int = 20,
    threads: int | None = None,
    eval_batch_size: int = 16,
    max_length: int = 128,
    work_dir: str | Path | None = None,
) -> list[BackendResult]:
    """Latency (random inputs at batch x seq, CPU) and eval accuracy/agreement of each back-end.

    `eval_data` None = speed only; eval texts are truncated to `max_length` tokens. ONNX files
    go to `work_dir` (default: a temporary folder).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown back-end(s) {unknown}; choose from {', '.join(BACKENDS)}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(
            f"'{model_dir}' is not a saved model folder (no config.json); back-ends need an "
            "exported sequence-classification model, e.g. the student's model/ folder"
        )
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names = [n for n in INPUT_NAMES if n in tokenizer.model_input_names]
    rows = load_eval(eval_data) if eval_data is not None else []
    gold = label_ids(rows, model.config) if rows else np.zeros(0, dtype=np.int64)
    batches = encode(tokenizer, rows, names, max_length, eval_batch_size) if rows else []
    random = random_inputs(model.config, batch, seq)
    speed_inputs = {k: v.numpy() for k, v in random.items() if k in names}  # [batch, seq] each
    cpu_name = device_name("cpu")
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="distill-bench-")
        work_dir = tmp.name
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)

    results: list[BackendResult] = []
    try:
        with fixed_threads(threads) as used:
            # the reference every back-end is compared with: eager PyTorch fp32
            eager = torch_runner(model)
            eager_logits = None
            if batches:
                eager_logits = np.concatenate([eager(b) for b in batches])  # [rows, labels]
            for name in backends:
                result = BackendResult(name, available=True)
                try:
                    start = time.perf_counter()
                    run = _build(name, model, names, work, used, result)
                    run(speed_inputs)  # the first call is where torch.compile does its work
                    result.setup_s = time.perf_counter() - start
                    if eager_logits is not None:
                        logits = np.concatenate([run(b) for b in batches])  # [rows, labels]
                        _score(result, logits, gold, eager_logits)
                    seconds = time_calls(lambda: run(speed_inputs), warmup, runs)
                    result.timing = summarize(
                        seconds, batch=batch, seq=seq, warmup=warmup, threads=used, device="cpu",
                        device_name=cpu_name, dtype="int8" if name == "onnx-int8" else "fp32",
                    )
                    if result.size_mb is None:
                        result.size_mb = weights_mb
                except BackendUnavailable as err:
                    result.available, result.reason = False, str(err)
                except Exception as err:  # noqa: BLE001 - a broken back-end is reported, not fatal
                    result.available = False
                    result.reason = _first_line(err)
                results.append(result)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def _build(name: str, model: nn.Module, names: list[str], work: Path, threads: int,
           result: BackendResult) -> Runner:
    if name == "eager":
        return torch_runner(model)
    if name == "compile":
        # dynamic: eval batches vary in length; one graph serves them all
        return torch_runner(torch.compile(model, dynamic=True))
    fp32 = work / "model.onnx"
    if not fp32.exists():
        try:
            _, exporter = export_onnx(model, names, fp32)
        except OnnxExportError as err:
            raise BackendUnavailable(str(err)) from None
        result.notes.append(f"exported with the {exporter} exporter")
    if name == "onnx":
        result.size_mb = fp32.stat().st_size / 2**20
        return onnx_runner(fp32, threads)
    int8 = work / "model.int8.onnx"
    if not int8.exists():
        quantize_int8(fp32, int8)
    result.size_mb = int8.stat().st_size / 2**20
    return onnx_runner(int8, threads)


def _score(result: BackendResult, logits: np.ndarray, gold: np.ndarray, eager: np.ndarray) -> None:
    pred = logits.argmax(-1)  # [rows]
    labeled = gold >= 0
    if labeled.any():
        result.accuracy = float((pred[labeled] == gold[labeled]).mean())
    result.agreement = float((pred == eager.argmax(-1)).mean())
    result.max_logit_diff = float(np.abs(logits - eager).max())
