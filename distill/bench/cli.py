"""`distill bench`: parameters, MACs, FLOPs and measured latency of encoders, side by side.

    distill bench                                   # the study's speed table, batch 1, seq 128 and 512
    distill bench beto albeto-tiny --seq 512 --runs 50 --threads 2 --plot
    distill bench --analytic-only --all             # counts only, no timing (seconds)
    distill bench runs/x/student/model --backends eager,compile,onnx,onnx-int8 --eval val.jsonl

Writes bench.md, bench.csv and bench.json (and latency.png / score_vs_speedup.png with --plot)
into --out; with --backends, backends.md/.csv/.json instead.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from distill.bench import flops
from distill.latency import DTYPES, Timing, device_name, measure, measure_interleaved
from distill.bench.shapes import EXTRA_MODELS, STUDY_MODELS, BenchModel, ModelNotFound, resolve_model

COLUMNS = [
    "model", "source", "origin", "model_type", "params", "batch", "seq", "gmacs", "gmacs_linear",
    "gflops", "speedup_macs", "latency_ms", "p25_ms", "p75_ms", "iqr_ms", "throughput",
    "speedup_latency", "min_ms", "score", "runs", "warmup", "threads", "device", "device_name", "dtype",
]


class BenchError(RuntimeError):
    """A bench request that cannot run; the message says why and what to do."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill bench",
        description="Parameters, MACs (the study's linear-layer count), FLOPs with attention, and "
        "measured latency of encoder models; speedups against a reference model.",
    )
    p.add_argument("models", nargs="*", help="shape names (beto, albeto-base-6, ...), catalog names, "
                   "local model folders or hub ids; default: the study's speed-table models")
    p.add_argument("--all", action="store_true", help="add the study's other shapes (ALBETO base/large/"
                   "xxlarge, RoBERTa-BNE base/large) to the default list")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    p.add_argument("--seq", type=int, nargs="+", default=[128, 512],
                   help="sequence lengths (default 128 512)")
    p.add_argument("--warmup", type=int, default=10, help="untimed forwards before timing (default 10)")
    p.add_argument("--runs", type=int, default=100, help="timed forwards per point (default 100)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (and ONNX Runtime); default: torch's current count")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--reference", default="beto", help="model the speedups divide by (default beto)")
    p.add_argument("--analytic-only", action="store_true", help="counts only, no timing")
    p.add_argument("--interleave", action="store_true",
                   help="time all models round-robin, run by run: fair ratios on a busy machine")
    p.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--plot", action="store_true", help="draw latency vs sequence length "
                   "(and score vs speedup with --scores)")
    p.add_argument("--scores", default=None,
                   help='JSON file {"model": score, ...} for the score/speedup plot')
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--backends", default=None, help="comma list of eager,compile,onnx,onnx-int8: "
                   "compare inference back-ends of saved sequence-classification model folders")
    p.add_argument("--eval", default=None, help='jsonl of {"text", "label"[, "text_pair"]} rows: '
                   "accuracy and agreement of each back-end")
    p.add_argument("--max-length", type=int, default=128,
                   help="token limit of --eval texts (default 128)")
    return p


# --- rows ------------------------------------------------------------------------------------------
def count_params(config: Any) -> int:
    """Parameters of the bare encoder (`AutoModel`) of `config`, built on the meta device."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def build_model(config: Any, dtype: str, seed: int) -> torch.nn.Module:
    """The bare encoder of `config` with random weights (speed does not depend on the weights)."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    return AutoModel.from_config(config).to(DTYPES[dtype]).eval()


def analytic_row(m: BenchModel, params: int, batch: int, seq: int) -> dict[str, Any]:
    """A result row with the counts filled in (no MAC columns for unsupported architectures)."""
    row: dict[str, Any] = {
        "model": m.name, "source": m.source, "origin": m.origin,
        "model_type": getattr(m.config, "model_type", ""), "params": params, "batch": batch, "seq": seq,
    }
    try:
        c = flops.count(m.config, batch, seq)
    except flops.UnsupportedModelError:
        return row
    row.update(gmacs=c.macs / 1e9, gmacs_linear=c.linear_macs / 1e9, gflops=c.flops / 1e9, _counts=c)
    return row


def add_speedups(rows: list[dict[str, Any]], reference: str) -> None:
    """Speedup columns against the reference model's row at the same (batch, seq)."""
    refs = {(r["batch"], r["seq"]): r for r in rows if r["model"] == reference}
    for r in rows:
        ref = refs.get((r["batch"], r["seq"]))
        if ref is None:
            continue
        if "_counts" in r and "_counts" in ref:
            r["speedup_macs"] = flops.speedup(ref["_counts"], r["_counts"])
        if r.get("latency_ms") and ref.get("latency_ms"):
            r["speedup_latency"] = ref["latency_ms"] / r["latency_ms"]


def _record(row: dict[str, Any], t: Timing) -> None:
    row.update(latency_ms=t.median_ms, p25_ms=t.p25_ms, p75_ms=t.p75_ms, iqr_ms=t.iqr_ms,
               min_ms=t.min_ms, throughput=t.throughput, runs=t.runs, warmup=t.warmup,
               threads=t.threads, device=t.device, device_name=t.device_name, dtype=t.dtype)


def run_bench(
    models: Sequence[str], *, batches: Sequence[int] = (1,), seqs: Sequence[int] = (128, 512),
    warmup: int = 10, runs: int = 100, threads: int | None = None, device: str = "cpu",
    dtype: str = "fp32", reference: str = "beto", analytic_only: bool = False,
    interleave: bool = False, seed: int = 0, log: Any = sys.stderr,
) -> list[dict[str, Any]]:
    """One row per model x batch x seq: params, GMACs, GFLOPs, latency, speedups vs `reference`.

    The reference is measured too (first) when it is not among `models`. `interleave` times all
    points round-robin (fair ratios on a busy machine) instead of one point after another.
    """
    names = list(dict.fromkeys([reference, *models] if reference not in models else models))
    resolved = [resolve_model(n) for n in names]
    if not analytic_only and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: CUDA is not available here; use --device cpu")
    rows, cases = [], []
    for m in resolved:
        params = count_params(m.config)
        points = [analytic_row(m, params, b, s) for b in batches for s in seqs]
        rows.extend(points)
        if analytic_only:
            continue
        model = build_model(m.config, dtype, seed)
        if interleave:  # keep every model; time them together below
            cases += [(m.name, model, row) for row in points]
            continue
        for row in points:
            b, s = row["batch"], row["seq"]
            print(f"timing {m.name} batch {b} seq {s} ...", end=" ", file=log, flush=True)
            try:
                t = measure(model, b, s, warmup=warmup, runs=runs, threads=threads, device=device,
                            seed=seed)
            except ValueError as err:
                raise BenchError(f"{m.name}: {err}") from err
            print(f"{t.median_ms:.2f} ms (IQR {t.iqr_ms:.2f})", file=log, flush=True)
            _record(row, t)
        del model
        gc.collect()
    if cases:
        print(f"timing {len(cases)} points round-robin, {warmup} + {runs} rounds ...", file=log,
              flush=True)
        try:
            timings = measure_interleaved(
                [(model, row["batch"], row["seq"]) for _, model, row in cases], warmup=warmup,
                runs=runs, threads=threads, device=device, seed=seed,
                progress=lambda done, total: print(f"  round {done}/{total}", file=log, flush=True),
            )
        except ValueError as err:
            raise BenchError(str(err)) from err
        for (name, _, row), t in zip(cases, timings):
            print(f"  {name} batch {row['batch']} seq {row['seq']}: {t.median_ms:.2f} ms "
                  f"(IQR {t.iqr_ms:.2f})", file=log)
            _record(row, t)
    add_speedups(rows, reference)
    for r in rows:
        r.pop("_counts", None)
    return rows


# --- output ----------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], reference: str) -> str:
    """The bench table as GitHub markdown (one line per model x batch x seq)."""
    timed = any("latency_ms" in r for r in rows)
    head = ["Model", "Params (M)", "Batch", "Seq", "GMACs", "GFLOPs", f"Speedup (MACs, vs {reference})"]
    if timed:
        head += ["Latency median (ms)", "IQR (ms)", "Seq/s", f"Speedup (measured, vs {reference})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["model"], _fmt(r["params"] / 1e6), r["batch"], r["seq"], _fmt(r.get("gmacs")),
                 _fmt(r.get("gflops")), _fmt(r.get("speedup_macs"))]
        if timed:
            cells += [_fmt(r.get("latency_ms")), _fmt(r.get("iqr_ms")), _fmt(r.get("throughput"), 1),
                      _fmt(r.get("speedup_latency"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment(threads: int | None, device: str, load_before: float | None) -> dict[str, Any]:
    """Where the numbers were taken; the load averages say how busy the machine was."""
    import transformers

    return {
        "device": device, "device_name": device_name(device), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "threads": threads or torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": load_average(),
    }


def write_outputs(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any], reference: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = meta["environment"]
    load = env.get("load_average_before")
    busy = f" 1-minute load average before the run: {load:.2f}." if load is not None else ""
    header = (f"Device: {env['device_name']}, {env['threads']} threads, torch {env['torch']}.{busy} "
              "GMACs: linear layers (+LayerNorm) as the study counted; GFLOPs: 2 x (linear + attention "
              "matmul) MACs. Random weights, random token ids, no padding.\n\n")
    (out / "bench.md").write_text(header + markdown_table(rows, reference), encoding="utf-8")
    with open(out / "bench.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench.json").write_text(json.dumps({**meta, "rows": rows}, indent=2), encoding="utf-8")


def plot_latency(rows: list[dict[str, Any]], path: Path) -> bool:
    """Median latency vs sequence length per model (first batch size), IQR as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("latency_ms")]
    if not timed:
        return False
    batch = timed[0]["batch"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r["model"] for r in timed):
        pts = [r for r in timed if r["model"] == model and r["batch"] == batch]
        pts.sort(key=lambda r: r["seq"])
        median = [r["latency_ms"] for r in pts]
        below = [r["latency_ms"] - r["p25_ms"] for r in pts]
        above = [r["p75_ms"] - r["latency_ms"] for r in pts]
        ax.errorbar([r["seq"] for r in pts], median, yerr=[below, above], marker="o", capsize=3,
                    label=model)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(f"median latency, batch {batch} (ms)")
    ax.set_yscale("log")
    threads = timed[0]["threads"]
    ax.set_title(f"{timed[0]['device_name']}, {threads} thread{'' if threads == 1 else 's'}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_scores(rows: list[dict[str, Any]], scores: dict[str, float], path: Path) -> bool:
    """Score vs speedup (measured when timed, else MACs) at batch 1 and the longest sequence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq = max(r["seq"] for r in rows)
    batch = min(r["batch"] for r in rows)
    points = {r["model"]: r for r in rows
              if r["seq"] == seq and r["batch"] == batch and r["model"] in scores}
    key = "speedup_latency" if any(r.get("speedup_latency") for r in points.values()) else "speedup_macs"
    points = {m: r for m, r in points.items() if r.get(key)}
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for model, r in points.items():
        ax.scatter(r[key], scores[model])
        ax.annotate(model, (r[key], scores[model]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    kind = "measured" if key == "speedup_latency" else "MAC"
    ax.set_xlabel(f"{kind} speedup (batch {batch}, seq {seq})")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def read_scores(path: str) -> dict[str, float]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BenchError(f"--scores {path}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise BenchError(
            f'--scores {path}: expected an object {{"model name": score, ...}} with numbers'
        )
    return {str(k): float(v) for k, v in data.items()}


# --- back-ends -------------------------------------------------------------------------------------
def backends_table(results: dict[str, list[Any]]) -> str:
    head = ["Model", "Back-end", "Median (ms)", "IQR (ms)", "Speedup vs eager", "Size (MB)",
            "Accuracy", "Agreement with eager", "Max |Δlogit|", "Setup (s)", "Note"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * 8 + "---|"]
    for model, res in results.items():
        eager = next((r.timing.median_ms for r in res if r.backend == "eager" and r.timing), None)
        for r in res:
            t = r.timing
            speed = eager / t.median_ms if (eager and t) else None
            note = r.reason if not r.available else "; ".join(r.notes)
            cells = [model, r.backend, _fmt(t.median_ms if t else None, 3),
                     _fmt(t.iqr_ms if t else None, 3), _fmt(speed), _fmt(r.size_mb, 1),
                     _fmt(r.accuracy, 4), _fmt(r.agreement, 4),
                     "–" if r.max_logit_diff is None else f"{r.max_logit_diff:.1e}",
                     _fmt(r.setup_s, 1), note.replace("|", "/")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_backends(args: argparse.Namespace, out: Path) -> int:
    from distill.bench.backends import BACKENDS, compare_backends

    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        raise BenchError(f"--backends: unknown {bad}; choose from {','.join(BACKENDS)}")
    if not args.models:
        raise BenchError("--backends needs one or more saved model folders as MODELS")
    results = {}
    for model in args.models:
        if not (Path(model) / "config.json").exists():
            raise BenchError(f"--backends: '{model}' is not a saved model folder (no config.json)")
        print(f"back-ends of {model}: {', '.join(names)} ...", file=sys.stderr, flush=True)
        results[model] = compare_backends(
            model, args.eval, names, batch=args.batch[0], seq=args.seq[0], warmup=args.warmup,
            runs=args.runs, threads=args.threads, max_length=args.max_length, work_dir=out / "onnx",
        )
    table = backends_table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backends.md").write_text(table, encoding="utf-8")
    flat = [{"model": m, **r.as_dict()} for m, res in results.items() for r in res]
    (out / "backends.json").write_text(json.dumps(flat, indent=2), encoding="utf-8")
    with open(out / "backends.csv", "w", newline="", encoding="utf-8") as f:
        fields = ["model", "backend", "available", "reason", "median_ms", "iqr_ms", "accuracy",
                  "agreement", "max_logit_diff", "size_mb", "setup_s"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in flat:
            t = row["timing"] or {}
            timing = {"median_ms": t.get("median_ms"), "iqr_ms": t.get("iqr_ms")}
            writer.writerow({k: row.get(k) for k in fields} | timing)
    print(table)
    return 0


# --- entry point -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`distill bench ...`; returns the process exit code (2 for a request that cannot run)."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        for flag, values in (("--batch", args.batch), ("--seq", args.seq)):
            if any(v < 1 for v in values):
                raise BenchError(f"{flag} values must be positive, got {values}")
        if args.backends:
            return run_backends(args, out)
        if args.eval:
            raise BenchError("--eval is used with --backends (it scores each inference back-end)")
        models = args.models or STUDY_MODELS + (EXTRA_MODELS if args.all else [])
        scores = read_scores(args.scores) if args.scores else None
        load_before = load_average()
        rows = run_bench(
            models, batches=args.batch, seqs=args.seq, warmup=args.warmup, runs=args.runs,
            threads=args.threads, device=args.device, dtype=args.dtype, reference=args.reference,
            analytic_only=args.analytic_only, interleave=args.interleave, seed=args.seed,
        )
    except (BenchError, ModelNotFound, KeyError, ValueError, FileNotFoundError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"distill bench: {msg}", file=sys.stderr)
        return 2
    if scores:
        for r in rows:
            r["score"] = scores.get(r["model"])
    meta = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("backends", "eval", "max_length")},
        "environment": environment(args.threads, args.device, load_before),
    }
    write_outputs(rows, out, meta, args.reference)
    print(markdown_table(rows, args.reference))
    if args.plot:
        if plot_latency(rows, out / "latency.png"):
            print(f"wrote {out / 'latency.png'}", file=sys.stderr)
        if scores and plot_scores(rows, scores, out / "score_vs_speedup.png"):
            print(f"wrote {out / 'score_vs_speedup.png'}", file=sys.stderr)
    print(f"wrote {out / 'bench.md'}, bench.csv, bench.json", file=sys.stderr)
    return 0
