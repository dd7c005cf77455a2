"""ONNX and int8 files of a trained model, and the parity gate that decides whether they ship.

`export_onnx` writes the task head's outputs by name (`logits`, or `start_logits`/`end_logits`)
with dynamic batch and sequence axes; `quantize_int8` applies ONNX Runtime's dynamic
quantisation (weights int8, activations quantised per call). `check_parity` runs the files with
ONNX Runtime beside the PyTorch model on the validation split the model was selected on, and
`measure_files` times each one. `distill export --onnx --int8` and `distill bench --backends`
both use these functions: one place converts a model.

The gate: fp32 ONNX must reproduce PyTorch's outputs to `FP32_ATOL` (largest absolute
difference over the positions a task reads), because it is meant to be the same function; int8
is expected to round, so it is judged by the task metric, which may drop at most `INT8_MARGIN`
points (0.5 = half a point of accuracy or F1) below PyTorch's on that split.

Not supported: models over 2 GB (each graph is written as one file, without external data),
static int8 quantisation with calibration data, and GPU execution providers (files are checked
and timed on CPU).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger("distill.onnx")

ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
PARITY_NAME = "onnx_parity.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
NOT_OUTPUTS = ("loss", "hidden_states", "attentions")  # model-output fields an export leaves out

# fp32 ONNX vs PyTorch: the same graph, so only float reordering separates them (1e-7 to 1e-5
# on the models tested); 1e-3 leaves room for deeper models yet catches any wrong operation.
FP32_ATOL = 1e-3
# int8 vs PyTorch: points of the task metric (x 100) int8 may lose on the validation split.
INT8_MARGIN = 0.5
# the latency each file is shown with: batch 1, warm-up, then timed runs, round-robin over files
LATENCY_WARMUP = 5
LATENCY_RUNS = 20
LATENCY_THREADS = 1

FILE_LABELS = {"pytorch": "PyTorch fp32", "onnx": "ONNX Runtime fp32", "int8": "ONNX Runtime int8"}


class OnnxExportError(RuntimeError):
    """A model that cannot be converted here; the message gives each exporter's reason."""


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def input_names(tokenizer: Any) -> list[str]:
    """The model inputs the tokenizer produces, in the order the exported graph takes them."""
    produced = set(getattr(tokenizer, "model_input_names", INPUT_NAMES))
    names = [n for n in INPUT_NAMES if n in produced]
    if names[:2] != ["input_ids", "attention_mask"]:
        raise OnnxExportError(
            f"the tokenizer produces {sorted(produced)}; an export needs input_ids and attention_mask"
        )
    return names


class HeadOutputs(nn.Module):
    """(input_ids, attention_mask[, token_type_ids]) -> the head's output tensors, as a tuple
    in `outputs` order: what the exported graph computes."""

    def __init__(self, model: nn.Module, outputs: Sequence[str]):
        super().__init__()
        self.model, self.outputs = model, tuple(outputs)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, ...]:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}  # [batch, seq] each
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        return tuple(out[name] for name in self.outputs)  # [batch, labels] | [batch, seq(, labels)]


def example_inputs(config: Any, names: Sequence[str], batch: int = 2, seq: int = 11) -> tuple[torch.Tensor, ...]:
    """Inputs the exporter traces with. Row 1 is padded, so the masking path is the one traced
    (an all-ones mask lets some models skip it, and a graph traced that way ignores padding)."""
    generator = torch.Generator().manual_seed(0)
    low = min(5, config.vocab_size - 1)  # clear of the usual special-token ids
    ids = torch.randint(low, config.vocab_size, (batch, seq), generator=generator)  # [batch, seq]
    mask = torch.ones(batch, seq, dtype=torch.long)  # [batch, seq]
    mask[1:, seq // 2 :] = 0
    pad = getattr(config, "pad_token_id", None)
    if pad is not None:
        ids = ids.masked_fill(mask == 0, pad)
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(values[n] for n in names)


def output_names(model: nn.Module, example: Sequence[torch.Tensor], names: Sequence[str]) -> list[str]:
    """The tensors the model's head returns (logits; start_logits and end_logits for QA)."""
    with torch.no_grad():
        out = model(**dict(zip(names, example)))
    found = [k for k, v in out.items() if k not in NOT_OUTPUTS and isinstance(v, torch.Tensor)]
    if not found:
        raise OnnxExportError(f"{type(model).__name__} returned no output tensor to export")
    return found


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence exporter and quantiser chatter (progress prints, tracer warnings, advice, notes
    about optional packages such as torchvision)."""
    loggers = [logging.getLogger(name) for name in ("", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _varying_axes(wrapper: HeadOutputs, config: Any, names: Sequence[str]) -> list[dict[int, str]]:
    """Per output, the axes that follow the batch and sequence length (for the TorchScript
    exporter, which needs them named): found by running two input shapes."""
    with torch.no_grad():
        a = wrapper(*example_inputs(config, names, batch=2, seq=11))
        b = wrapper(*example_inputs(config, names, batch=3, seq=13))
    axes = []
    for x, y in zip(a, b):
        named = {0: "batch"}
        named.update({d: "seq" for d in range(1, x.dim()) if x.shape[d] != y.shape[d]})
        axes.append(named)
    return axes


def export_onnx(model: nn.Module, names: Sequence[str], path: str | Path) -> tuple[list[str], str]:
    """Write `model` (a task model) to `path` as ONNX with dynamic batch and sequence axes.

    Returns (output names, exporter used). The torch.export-based exporter (needs `onnxscript`)
    is tried first: it traces the exact computation. The TorchScript exporter is the fallback;
    with transformers 5 its graphs can drift from eager PyTorch (it traces mask creation with
    the example's shapes), which the parity gate then reports. Both failing raises
    OnnxExportError with each one's reason.
    """
    path = Path(path)
    model = model.eval()
    example = example_inputs(model.config, names)  # [2, 11] each
    outputs = output_names(model, example, names)
    wrapper = HeadOutputs(model, outputs)
    reasons = []
    try:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        with quiet():
            torch.onnx.export(
                wrapper, example, str(path), input_names=list(names), output_names=outputs,
                dynamic_shapes=tuple({0: batch, 1: seq} for _ in names), dynamo=True, external_data=False,
            )
        return outputs, "torch.export"
    except Exception as err:  # noqa: BLE001 - any failure means "try the other exporter"
        reasons.append(f"torch.export exporter: {_first_line(err)}")
    try:
        axes = {n: {0: "batch", 1: "seq"} for n in names}
        axes.update(zip(outputs, _varying_axes(wrapper, model.config, names)))
        with quiet():
            torch.onnx.export(
                wrapper, example, str(path), input_names=list(names), output_names=outputs,
                dynamic_axes=axes, dynamo=False, external_data=False,
            )
        return outputs, "torchscript"
    except Exception as err:  # noqa: BLE001
        reasons.append(f"torchscript exporter: {_first_line(err)}")
    raise OnnxExportError("ONNX export failed (" + "; ".join(reasons) + ")")


def require_packages() -> None:
    """Fail at once, naming what to install, when the packages an ONNX export needs are missing
    (a run with hub.push and hub.export.onnx calls this before training)."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"ONNX exports need {', '.join(missing)}: pip install 'distill[bench]' "
            "(or onnx onnxruntime onnxscript)"
        )


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    """Dynamic int8 quantisation of an ONNX model: weights stored int8, activations quantised
    on the fly per call (no calibration data needed)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


class OnnxModel:
    """An ONNX Runtime CPU session called like the PyTorch model: keyword inputs in, an object
    with the named outputs (`.logits`, `.start_logits`, ...) as float tensors out."""

    def __init__(self, path: str | Path, threads: Optional[int] = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads  # the same thread budget as PyTorch's
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        # outputs whose axis 1 follows the input length (token logits, start/end logits): the
        # exporters name it ("seq"), while a label axis has a fixed size
        self.per_token = {o.name for o in self.session.get_outputs() if len(o.shape) > 1 and isinstance(o.shape[1], str)}

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Numpy (or torch) int arrays [batch, seq] -> each output as a numpy array."""
        feeds = {}
        for name in self.inputs:
            value = inputs.get(name)
            if value is None and name == "token_type_ids":
                value = np.zeros_like(np.asarray(inputs["input_ids"]))  # one-segment input
            if value is None:
                raise KeyError(f"{self.path.name} needs input '{name}'; got {sorted(inputs)}")
            feeds[name] = (value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)).astype(np.int64)
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))

    def __call__(self, **inputs: Any) -> SimpleNamespace:
        return SimpleNamespace(**{k: torch.from_numpy(v).float() for k, v in self.run(inputs).items()})


# ---------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------


@dataclass
class LatencySettings:
    """How each file's latency was taken (printed on the card next to the numbers)."""

    batch: int = 1
    seq: int = 128
    threads: int = LATENCY_THREADS
    warmup: int = LATENCY_WARMUP
    runs: int = LATENCY_RUNS
    device_name: str = ""


def measure_files(
    model: nn.Module, files: dict[str, Path], names: Sequence[str], settings: LatencySettings
) -> dict[str, Any]:
    """Median latency ({"pytorch": Timing, "onnx": Timing, ...}) of the PyTorch model and each
    ONNX file on the same random inputs [batch, seq], timed round-robin (run i of every file
    before run i+1 of any), so a changing machine load hits all of them alike."""
    from distill.latency import device_name, fixed_threads, random_inputs, summarize, time_calls

    inputs = {k: v for k, v in random_inputs(model.config, settings.batch, settings.seq).items() if k in names}
    numpy_inputs = {k: v.numpy() for k, v in inputs.items()}  # [batch, seq] each
    calls: dict[str, Callable[[], Any]] = {"pytorch": lambda: model(**inputs)}
    for name, path in files.items():
        session = OnnxModel(path, settings.threads)
        calls[name] = lambda s=session: s.run(numpy_inputs)
    settings.device_name = device_name("cpu")
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    with fixed_threads(settings.threads), torch.inference_mode():
        for _ in range(settings.warmup):
            for fn in calls.values():
                fn()
        for _ in range(settings.runs):
            for name, fn in calls.items():
                seconds[name] += time_calls(fn, 0, 1)
    return {
        name: summarize(s, batch=settings.batch, seq=settings.seq, warmup=settings.warmup, threads=settings.threads,
                        device="cpu", device_name=settings.device_name, dtype="int8" if name == "int8" else "fp32")
        for name, s in seconds.items()
    }


# ---------------------------------------------------------------------------------------------
# The parity gate
# ---------------------------------------------------------------------------------------------


@dataclass
class FileResult:
    """One file's scores on the validation split and its distance from the PyTorch model."""

    name: str  # pytorch | onnx | int8
    file: str  # file name inside the export
    metrics: dict[str, float]
    max_abs_diff: Optional[float] = None  # largest |output - PyTorch output| over read positions
    size_mb: Optional[float] = None
    latency_ms: Optional[float] = None  # median
    latency_iqr_ms: Optional[float] = None


@dataclass
class ParityReport:
    """What the gate measured and decided; saved as onnx_parity.json and shown on the card."""

    split: str
    examples: int
    features: int
    metric: str
    greater_is_better: bool
    atol: float
    margin: float
    files: dict[str, FileResult]
    latency: LatencySettings
    recorded: Optional[float] = None  # the validation metric metrics.json holds
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    forced: bool = False
    exporter: str = ""

    def score(self, name: str) -> Optional[float]:
        result = self.files.get(name)
        return None if result is None else result.metrics.get(self.metric)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParityReport":
        data = dict(data)
        data["files"] = {k: FileResult(**v) for k, v in data["files"].items()}
        data["latency"] = LatencySettings(**data["latency"])
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n", encoding="utf-8")


def validation_split(cfg: Any, tokenizer: Any) -> tuple[Any, Any, Any]:
    """(task, features, raw rows) of the split the model was selected on, built exactly as in
    training: the recipe's data, subsampling and preprocessing, with the model's tokenizer."""
    from datasets import DatasetDict

    from distill.data.features import load_data, prepare_data
    from distill.tasks import get_task

    task = get_task(cfg.task, cfg.data)
    raw = load_data(cfg.data, cfg.seed, task)  # reads the splits and lets the task read its label names
    if "validation" not in raw:
        raise ValueError(f"the data has no validation split (splits: {sorted(raw)})")
    task.bind(tokenizer)
    features = prepare_data(task, DatasetDict({"validation": raw["validation"]}))["validation"]
    return task, features, raw["validation"]


def check_labels(model: nn.Module, task: Any) -> None:
    """The model's label ids must mean what they mean in the data, or every score is wrong."""
    labels = list((getattr(model.config, "id2label", None) or {}).values())
    if task.labels and labels != list(task.labels):
        raise ValueError(
            f"the model's labels {labels} are not the data's {list(task.labels)} (same order): the "
            "recipe's data is not what this model was trained on"
        )


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, per_token: bool) -> float:
    """Largest |a - b|, over the real (unpadded) positions when the output is per token; inf
    when either holds a non-finite value there."""
    diff = (a.float() - b.float()).abs()  # [batch, labels] | [batch, seq(, labels)]
    if per_token:
        diff = diff[mask.bool()]  # [real tokens(, labels)]
    if diff.numel() == 0:
        return 0.0
    return float("inf") if not torch.isfinite(diff).all() else float(diff.max())


def check_parity(
    model: nn.Module,
    files: dict[str, Path],
    cfg: Any,
    tokenizer: Any,
    *,
    names: Sequence[str],
    atol: float = FP32_ATOL,
    margin: float = INT8_MARGIN,
    recorded: Optional[float] = None,
    batch_size: int = 32,
    threads: Optional[int] = None,
    split: Optional[tuple[Any, Any, Any]] = None,
) -> ParityReport:
    """Run the PyTorch model and each ONNX file ({"onnx": path, "int8": path}) on the recipe's
    validation split; score each with the task's metrics; record what fails the gate.

    Failures (in `report.failures`, the caller decides what to do with them): fp32 outputs
    farther than `atol` from PyTorch's; an int8 metric more than `margin` points worse than
    PyTorch's. `recorded` (metrics.json's validation score) only adds a note when the
    recomputed PyTorch score differs from it, e.g. because the data changed since training.
    `split`: what `validation_split(cfg, tokenizer)` returned, when the caller already has it.
    """
    from distill.data.features import make_loader
    from distill.tasks.base import concat_padded

    task, features, raw = split or validation_split(cfg, tokenizer)
    check_labels(model, task)
    sessions = {name: OnnxModel(path, threads) for name, path in files.items()}
    collected: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in ("pytorch", *sessions)}
    diffs = {name: 0.0 for name in sessions}
    loader = make_loader(task, features, batch_size, shuffle=False, seed=cfg.seed)
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            inputs = {k: batch[k] for k in names if k in batch}  # [batch, seq] each
            outputs = {"pytorch": model(**inputs)}
            for name, session in sessions.items():
                outputs[name] = session(**inputs)
                for key in session.outputs:
                    diff = _max_diff(getattr(outputs[name], key), outputs["pytorch"][key], batch["attention_mask"],
                                     key in session.per_token)
                    diffs[name] = max(diffs[name], diff)
            for name, out in outputs.items():
                for key, value in task.eval_outputs(out, batch).items():
                    collected[name].setdefault(key, []).append(value.cpu().numpy())
    metric = task.metric
    results = {}
    for name, chunks in collected.items():
        arrays = {k: concat_padded(v) for k, v in chunks.items()}
        order = np.argsort(arrays["feature_id"], kind="stable")  # feature order, as training scores
        metrics = task.compute_metrics({k: v[order] for k, v in arrays.items()}, features, raw)
        if metric not in metrics:
            raise ValueError(f"the task computes {sorted(metrics)}, not the model's metric '{metric}'")
        if name in files:
            file, size_mb = files[name].name, files[name].stat().st_size / 1e6
        else:  # the safetensors hold the same fp32 weights the model has in memory
            file, size_mb = "model.safetensors", sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
        results[name] = FileResult(
            name=name, file=file, metrics={k: float(v) for k, v in metrics.items()},
            max_abs_diff=diffs.get(name), size_mb=size_mb,
        )
    report = ParityReport(
        split="validation", examples=len(raw), features=len(features), metric=metric,
        greater_is_better=task.greater_is_better(metric), atol=atol, margin=margin, files=results,
        latency=LatencySettings(), recorded=recorded,
    )
    judge(report)
    return report


def metric_drop(report: ParityReport, name: str) -> float:
    """Points (metric x 100) by which a file scores worse than PyTorch (negative: better)."""
    ref, got = report.score("pytorch"), report.score(name)
    change = (got - ref) * 100
    return -change if report.greater_is_better else change


def judge(report: ParityReport) -> None:
    """Fill `report.failures` (and notes) from the measured numbers."""
    report.failures.clear()
    report.notes.clear()
    onnx = report.files.get("onnx")
    if onnx is not None and not onnx.max_abs_diff <= report.atol:  # catches inf/NaN too
        report.failures.append(
            f"{onnx.file} differs from the PyTorch model by up to {onnx.max_abs_diff:.3g} in its outputs "
            f"on the {report.split} split (tolerance {report.atol:g}): the exported graph does not "
            "compute what the model computes"
        )
    int8 = report.files.get("int8")
    if int8 is not None:
        drop = metric_drop(report, "int8")
        if not drop <= report.margin:
            report.failures.append(
                f"{int8.file} scores {report.metric} {report.score('int8'):.4f} on the {report.split} split "
                f"against PyTorch's {report.score('pytorch'):.4f}: {drop:.2f} points worse, more than "
                f"the {report.margin:g}-point margin (on {report.examples} examples one example moves "
                f"a per-example score such as accuracy by {100 / max(report.examples, 1):.2g} points)"
            )
    ref = report.score("pytorch")
    if report.recorded is not None and abs(ref - report.recorded) > 1e-3:
        report.notes.append(
            f"PyTorch scores {report.metric} {ref:.4f} on the {report.split} split now, but metrics.json "
            f"recorded {report.recorded:.4f}: the data may have changed since training"
        )
