"""`distill export RUN_DIR/student [--out DIR] [--repo-id ORG/NAME] [--onnx] [--int8]`: a Hub-ready folder.

The folder holds exactly the student: weights re-saved through the task's plain `AutoModelFor*`
class (so no tensor the class does not own can ride along: hidden-state projections, teacher
weights, optimizer state), as safetensors, checked key by key against the trained weights; its
tokenizer; `config.json` with `id2label`/`label2id`; the resolved recipe as
`distill_config.yaml`; the scores and the Hub repo id the card names as `distill_results.json`;
and a `README.md` model card (`distill.ship.card`).

With `--onnx` (or the recipe's `hub.export.onnx`) it also holds `model.onnx`, and with `--int8`
(`hub.export.int8`) `model.int8.onnx`, both checked by the parity gate of
`distill.ship.onnx` on the validation split before anything is written; the gate's numbers go
to `onnx_parity.json` and the card.

The folder is written beside its destination and swapped in whole, so a failed export leaves
the earlier one (or nothing) in place. `--out` must be a new folder, an empty one, or an earlier
export; an existing file or a folder of other files is refused untouched. Only a finished
stage exports (its metrics.json is written last); the export writes locally, `distill push`
uploads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from distill.files import swap_in
from distill.ship.card import CARD_CONFIG_NAME, build_card
from distill.ship.evidence import ExportError, RunEvidence, hub_id_of, load_evidence, repo_name, trusts_remote_code
from distill.tasks import get_task

if TYPE_CHECKING:
    from distill.ship.onnx import ParityReport

log = logging.getLogger("distill.ship.export")

RESULTS_NAME = "distill_results.json"
PLACEHOLDER_ORG = "ORG"  # stands in for the Hub namespace when none is known at export time


def stage_folder(path: str | Path) -> Path:
    """Accept the stage folder or its `model/` subfolder (an easy slip on the command line)."""
    path = Path(path)
    if path.name == "model" and (path.parent / "metrics.json").exists():
        return path.parent
    return path


def default_out(stage_dir: Path) -> Path:
    return stage_dir / "export"


def is_export(folder: Path) -> bool:
    """A folder this module wrote (safe to replace on re-export)."""
    return (folder / CARD_CONFIG_NAME).exists() and (folder / "README.md").exists()


def safetensors_keys(folder: Path) -> dict[str, Path]:
    """Every tensor name in the folder's *.safetensors files -> the file holding it."""
    keys: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                keys[key] = file
    return keys


def check_student_only(export_dir: Path, model: torch.nn.Module, trained_dir: Path) -> None:
    """Fail unless the exported tensors are the model class's own, equal to the trained ones.

    Any key the plain model does not own (projections, a teacher, optimizer state) or a tensor
    that differs from the trained model's is an error: the export would not be the student.
    """
    exported = safetensors_keys(export_dir)
    if not exported:
        raise ExportError(f"no *.safetensors written to {export_dir}")
    own = set(model.state_dict())
    foreign = sorted(set(exported) - own)
    if foreign:
        raise ExportError(
            f"the export holds tensors that are not part of {type(model).__name__}: {foreign[:10]}"
        )
    trained = safetensors_keys(trained_dir)
    absent = sorted(set(exported) - set(trained))
    if absent:
        raise ExportError(
            f"exported tensors {absent[:10]} are not in the trained model at {trained_dir}: "
            "the export would not be the trained student"
        )
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in {*exported.values(), *trained.values()}}
        for key, file in exported.items():
            if not torch.equal(handles[file].get_tensor(key), handles[trained[key]].get_tensor(key)):
                raise ExportError(f"exported tensor {key} differs from the trained model's ({trained_dir})")


def check_labels(model_config: Any, family: str) -> None:
    """Classification and tagging models must name their labels (pipelines print them)."""
    if family == "qa":
        return
    id2label = getattr(model_config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    generic = names == [f"LABEL_{i}" for i in range(len(names))]
    if names and not generic and getattr(model_config, "label2id", None):
        return
    raise ExportError(
        f"the saved model's config has no label names (id2label={id2label}): the run should have "
        "set them from the dataset; re-run the stage with a dataset whose labels are named"
    )


class ParityError(ExportError):
    """ONNX files that failed the parity gate; `report` holds what was measured."""

    def __init__(self, message: str, report: "ParityReport"):
        super().__init__(message)
        self.report = report


def results_json(ev: RunEvidence, repo_id: str, onnx: Optional["ParityReport"] = None) -> dict[str, Any]:
    """The scores behind the card, machine-readable, without local paths.

    `repo_id` is the Hub repo the card was written for (its usage snippets load it); `distill
    push` reads it to refuse pushing the folder elsewhere. `teacher` holds the teacher's scores
    (with several teachers, the best one's, as the card's comparison uses); with several
    teachers `teachers` also lists every one in recipe order (stage, Hub id or null for a local
    model, whether it came fine-tuned, its scores, which is best) and `teacher_combine` the rule
    that combined their soft targets."""
    out: dict[str, Any] = {"repo_id": repo_id, "task": ev.cfg.task.name, "metric": ev.metric, "stage": ev.stage}
    # speedups are relative to the (first) teacher's timing: none without a teacher row
    timed = ev.teacher_row() is not None
    several = len(ev.teachers) > 1
    best = next((i for i, t in enumerate(ev.teachers) if ev.teacher is not None and t["metrics"] is ev.teacher), None)
    teacher_stage = ev.teachers[best]["stage"] if several and best is not None else "teacher"

    def scores(metrics: dict, stage: str) -> dict[str, Any]:
        row = ev.summary_row(stage) or {}
        return {
            "validation": metrics.get("validation", {}),
            "test": metrics.get("test", {}),
            "parameters": (metrics.get("info") or {}).get("parameters"),
            "cpu_latency_ms": row.get("latency_ms"),
            "speedup_vs_teacher": row.get("speedup") if timed else None,
        }

    for name, stage, metrics in (("teacher", teacher_stage, ev.teacher), (ev.stage, ev.stage, ev.metrics), ("baseline", "baseline", ev.baseline)):
        if not metrics or name in out:
            continue
        out[name] = scores(metrics, stage)
    if several:
        d = ev.cfg.distill
        out["teachers"] = [
            {
                "index": i,
                "stage": t["stage"],
                "model": hub_id_of(t["model"]),  # None: a local model (its path stays out)
                "finetuned": bool(t["finetuned"]),  # came fine-tuned (no stage of this run)
                "best": i == best,
                **scores(t["metrics"] or {}, t["stage"]),
            }
            for i, t in enumerate(ev.teachers)
        ]
        out["teacher_combine"] = {
            "rule": d.teacher_combine,
            "weights": list(d.teacher_weights) if d.teacher_combine == "weighted" else None,
            "temperature": d.temperature,
            "intermediate_teacher": d.intermediate_teacher,
        }
    out["loss_weights"] = ev.info.get("loss_weights")
    if onnx is not None:
        out["onnx"] = {
            "split": onnx.split,
            "metric": onnx.metric,
            "passed": not onnx.failures,
            "files": {
                r.file: {"runtime": name, onnx.metric: r.metrics.get(onnx.metric), "max_abs_diff": r.max_abs_diff,
                         "cpu_latency_ms": r.latency_ms}
                for name, r in onnx.files.items()
            },
        }
    return out


def write_onnx(
    folder: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    ev: RunEvidence,
    *,
    int8: bool,
    force: bool,
    atol: float,
    margin: float,
    threads: int,
) -> "ParityReport":
    """Write model.onnx (and model.int8.onnx) into `folder`, run the parity gate on the
    validation split, time each file, and save onnx_parity.json. A failed gate raises
    ParityError unless `force`, which keeps the files and marks the report (and card) forced."""
    from distill.ship import onnx as ox

    if margin < 0 or atol < 0 or threads < 1:
        raise ExportError(
            f"--int8-margin ({margin}) and --atol ({atol}) must be >= 0 and --threads ({threads}) >= 1"
        )
    source = ev.cfg.data.files.get("validation") or ev.cfg.data.source or "the recipe's data"
    try:
        ox.require_packages()
        # the data first: a gate that cannot run should stop the export before any conversion
        split = ox.validation_split(ev.cfg, tokenizer)
    except ImportError as err:
        raise ExportError(str(err)) from None
    except (ValueError, OSError) as err:  # DataError is a ValueError; a missing file an OSError
        raise ExportError(
            f"the parity gate runs the exported model on the validation split the student was "
            f"evaluated on ({source}), and it could not read it: {err}. Run the export where the "
            "recipe's data can be read (paths are relative to the folder `distill run` ran in)"
        ) from None
    try:
        ox.check_labels(model, split[0])
    except ValueError as err:
        raise ExportError(f"{stage_label(ev)}: {err}") from None
    try:
        names = ox.input_names(tokenizer)
        files = {"onnx": folder / ox.ONNX_NAME}
        _, exporter = ox.export_onnx(model, names, files["onnx"])
        if int8:
            files["int8"] = folder / ox.INT8_NAME
            ox.quantize_int8(files["onnx"], files["int8"])
    except ox.OnnxExportError as err:
        raise ExportError(str(err)) from None
    recorded = ev.metrics.get("validation", {}).get(ev.metric)
    batch_size = ev.cfg.train.eval_batch_size or 2 * ev.cfg.train.batch_size
    try:
        report = ox.check_parity(
            model, files, ev.cfg, tokenizer, names=names, atol=atol, margin=margin,
            recorded=recorded if isinstance(recorded, (int, float)) else None, batch_size=batch_size,
            threads=None,  # scoring the split may use every core; only the latencies are pinned
            split=split,
        )
    except ValueError as err:  # labels or metrics that do not fit the data
        raise ExportError(f"the parity gate could not score the {source} validation split: {err}") from None
    report.exporter = exporter
    for note in report.notes:
        log.warning(note)
    if report.failures:
        problems = "; ".join(report.failures)
        if not force:
            raise ParityError(
                f"the ONNX export failed the parity gate: {problems}. Nothing was written. "
                "Re-run with --force to write the files anyway (the card then says they failed), "
                "or --int8-margin POINTS to accept a larger int8 loss",
                report,
            )
        report.forced = True
        log.warning("writing ONNX files that failed the parity gate (--force): %s", problems)
    positions = getattr(model.config, "max_position_embeddings", None) or ev.cfg.data.max_length
    settings = ox.LatencySettings(seq=min(ev.cfg.data.max_length, positions), threads=threads)
    for name, timing in ox.measure_files(model, files, names, settings).items():
        report.files[name].latency_ms, report.files[name].latency_iqr_ms = timing.median_ms, timing.iqr_ms
    report.latency = settings
    report.save(folder / ox.PARITY_NAME)
    return report


def stage_label(ev: RunEvidence) -> str:
    return f"{ev.stage_dir / 'model'} against the validation split of {ev.cfg.data.files.get('validation') or ev.cfg.data.source}"


def export_student(
    stage_dir: str | Path,
    out: Optional[str | Path] = None,
    repo_id: Optional[str] = None,
    *,
    onnx: Optional[bool] = None,
    int8: Optional[bool] = None,
    force: bool = False,
    atol: Optional[float] = None,
    margin: Optional[float] = None,
    threads: Optional[int] = None,
) -> Path:
    """Write the Hub-ready folder for a finished stage and return its path.

    `repo_id` names the model in the card (usage snippet, model-index); without it the recipe's
    `hub.repo_id` template is used with `hub.org`, or `ORG` when no org is set. `onnx`/`int8`
    None take the recipe's hub.export.onnx/int8 (int8 implies onnx); `margin` None its
    hub.export.int8_margin (points); `atol` None the fp32 tolerance FP32_ATOL; `threads` the
    CPU threads the card's latencies are measured with (default 1). `force` writes ONNX files
    that fail the parity gate, with a warning on the card.
    """
    from distill.ship import onnx as ox

    stage_dir = stage_folder(stage_dir)
    ev = load_evidence(stage_dir)
    hub_export = ev.cfg.hub.export
    int8 = hub_export.int8 if int8 is None else int8
    onnx = bool(int8 or (hub_export.onnx if onnx is None else onnx))
    task = get_task(ev.cfg.task, ev.cfg.data)
    model_dir = stage_dir / "model"
    out = Path(out) if out else default_out(stage_dir)
    check_out(out, stage_dir)
    repo_id = repo_id or repo_name(ev.cfg, ev.cfg.hub.org or PLACEHOLDER_ORG)

    model_class = task.model_class()
    trust = trusts_remote_code(ev.cfg, ev.stage)
    try:
        model, loading = model_class.from_pretrained(model_dir, output_loading_info=True, trust_remote_code=trust)
    except Exception as err:
        raise ExportError(f"{model_dir} does not load as {model_class.__name__}: {err}") from None
    if loading.get("missing_keys"):
        raise ExportError(
            f"{model_dir} lacks weights for {sorted(loading['missing_keys'])[:10]}: the exported "
            "model would hold random values there. Re-run the stage."
        )
    if loading.get("unexpected_keys"):
        log.warning(
            "dropping %d tensors that are not part of the student: %s",
            len(loading["unexpected_keys"]),
            sorted(loading["unexpected_keys"])[:10],
        )
    check_labels(model.config, task.family)

    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        tokenizer.save_pretrained(tmp)
        check_student_only(tmp, model, model_dir)
        report = None
        if onnx:
            report = write_onnx(
                tmp, model, tokenizer, ev, int8=int8, force=force,
                atol=ox.FP32_ATOL if atol is None else atol,
                margin=hub_export.int8_margin if margin is None else margin,
                threads=ox.LATENCY_THREADS if threads is None else threads,
            )
        shutil.copyfile(stage_dir / "config.yaml", tmp / CARD_CONFIG_NAME)
        (tmp / RESULTS_NAME).write_text(json.dumps(results_json(ev, repo_id, report), indent=2) + "\n", encoding="utf-8")
        build_card(ev, repo_id, task.pipeline_tag, onnx=report).save(tmp / "README.md")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, out)  # a failed export never leaves a half-written folder behind
    return out


def check_out(out: Path, stage_dir: Path) -> None:
    """Refuse, before anything is written, an `--out` that is not a new folder, an empty one or
    an earlier export: a file, a folder of other files, or the trained model's own folder."""
    model_dir = stage_dir / "model"
    if out.resolve() in (stage_dir.resolve(), model_dir.resolve()) or model_dir.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out} would write into the trained model's folder; choose another folder")
    taken = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if taken is not None:
        where = f"--out {out} is a file" if taken == out else f"--out {out} lies under {taken}, which is a file"
        raise ExportError(
            f"{where}, not a folder; it was left as it is. Pass a folder that does not exist yet, an "
            f"empty one or an earlier export (which is replaced), or leave --out out to write {default_out(stage_dir)}"
        )
    if out.exists() and any(out.iterdir()) and not is_export(out):
        raise ExportError(
            f"{out} exists and is not an earlier export (no {CARD_CONFIG_NAME}); "
            "choose an empty or new folder with --out"
        )


def exported_for(folder: Path) -> Optional[str]:
    """The Hub repo id an export's card was written for, as its results file records it (None
    for an export written before the file recorded it)."""
    path = folder / RESULTS_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("repo_id")
    except (json.JSONDecodeError, AttributeError):
        return None


def list_files(folder: Path) -> list[tuple[str, int]]:
    """(relative path, size in bytes) of every file in the folder, sorted."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_files(folder: Path) -> str:
    return "\n".join(f"  {human_size(size):>9}  {name}" for name, size in list_files(folder))


def add_onnx_arguments(p: argparse.ArgumentParser) -> None:
    """--onnx/--int8 and the gate's settings, shared by `distill export` and `distill push`."""
    from distill.ship.onnx import FP32_ATOL, LATENCY_THREADS

    p.add_argument(
        "--onnx", action=argparse.BooleanOptionalAction, default=None,
        help="also write model.onnx (fp32, dynamic batch and sequence axes), checked against PyTorch "
        "on the validation split (default: the recipe's hub.export.onnx)",
    )
    p.add_argument(
        "--int8", action=argparse.BooleanOptionalAction, default=None,
        help="also write model.int8.onnx (ONNX Runtime dynamic quantisation; implies --onnx) "
        "(default: the recipe's hub.export.int8)",
    )
    p.add_argument(
        "--int8-margin", type=float, default=None, metavar="POINTS",
        help="points of the task metric the int8 model may lose on validation "
        "(default: the recipe's hub.export.int8_margin, 0.5)",
    )
    p.add_argument(
        "--atol", type=float, default=None,
        help=f"largest absolute output difference allowed between model.onnx and PyTorch (default {FP32_ATOL:g})",
    )
    p.add_argument(
        "--threads", type=int, default=None,
        help=f"CPU threads for the latencies on the card (default {LATENCY_THREADS})",
    )


def parity_summary(data: dict[str, Any]) -> str:
    """The gate's result in a few lines, from onnx_parity.json."""
    metric, lat = data["metric"], data["latency"]
    lines = [
        f"parity on the {data['split']} split ({data['examples']} examples); latency at batch "
        f"{lat['batch']}, seq {lat['seq']}, {lat['threads']} thread(s):"
    ]
    for r in data["files"].values():
        diff = "" if r["max_abs_diff"] is None else f", max |diff| {r['max_abs_diff']:.2g}"
        latency = "" if r["latency_ms"] is None else f", {r['latency_ms']:.1f} ms"
        lines.append(f"  {r['file']:<18} {metric} {r['metrics'][metric]:.4f}{diff}{latency}")
    for failure in data["failures"]:
        lines.append(f"  FAILED (written with --force): {failure}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="distill export",
        description="Write a Hub-ready folder for a trained student: the student alone "
        "(safetensors), tokenizer, config with labels, the resolved recipe and a model card.",
        epilog="example: distill export runs/pawsx/student --repo-id dccuchile/albert-base-6-spanish-distilled-pawsx",
    )
    p.add_argument("stage_dir", help="a finished stage folder, e.g. runs/demo/student")
    p.add_argument("--out", default=None, help="where to write (default: STAGE_DIR/export)")
    p.add_argument(
        "--repo-id",
        default=None,
        help="the Hub id the card names (default: the recipe's hub.repo_id template; ORG when hub.org is unset)",
    )
    add_onnx_arguments(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="write ONNX files that fail the parity gate (warns, and the card says so)",
    )
    args = p.parse_args(argv)
    try:
        out = export_student(
            args.stage_dir, args.out, args.repo_id, onnx=args.onnx, int8=args.int8, force=args.force,
            atol=args.atol, margin=args.int8_margin, threads=args.threads,
        )
    except ExportError as err:
        print(f"distill export: {err}", file=sys.stderr)
        return 2
    print(f"exported {out}:\n{format_files(out)}")
    parity = out / "onnx_parity.json"
    if parity.exists():
        print(parity_summary(json.loads(parity.read_text(encoding="utf-8"))))
    if not args.repo_id and (exported_for(out) or "").startswith(PLACEHOLDER_ORG + "/"):
        print(
            f"note: the card names the model {PLACEHOLDER_ORG}/...; pass --repo-id, or set hub.org, "
            "or let `distill push` re-export it with the repo id"
        )
    return 0
