"""`distill export RUN_DIR/student [--out DIR] [--repo-id ORG/NAME]`: a Hub-ready folder.

The folder holds exactly the student: weights re-saved through the task's plain `AutoModelFor*`
class (so no tensor the class does not own can ride along: hidden-state projections, teacher
weights, optimizer state), as safetensors, checked key by key against the trained weights; its
tokenizer; `config.json` with `id2label`/`label2id`; the resolved recipe as
`distill_config.yaml`; the scores as `distill_results.json`; and a `README.md` model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from distill.card import (
    CARD_CONFIG_NAME,
    ExportError,
    RunEvidence,
    build_card,
    load_evidence,
    repo_name,
)
from distill.tasks import get_task

log = logging.getLogger("distill.export")

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


def results_json(ev: RunEvidence) -> dict[str, Any]:
    """The scores behind the card, machine-readable, without local paths."""
    out: dict[str, Any] = {"task": ev.cfg.task.name, "metric": ev.metric, "stage": ev.stage}
    for name, metrics in (("teacher", ev.teacher), (ev.stage, ev.metrics), ("baseline", ev.baseline)):
        if not metrics or name in out:
            continue
        row = next((r for r in ev.summary if r.get("stage") == name), {})
        out[name] = {
            "validation": metrics.get("validation", {}),
            "test": metrics.get("test", {}),
            "parameters": (metrics.get("info") or {}).get("parameters"),
            "cpu_latency_ms": row.get("latency_ms"),
            "speedup_vs_teacher": row.get("speedup") if any(r.get("stage") == "teacher" for r in ev.summary) else None,
        }
    out["loss_weights"] = ev.info.get("loss_weights")
    return out


def export_student(
    stage_dir: str | Path, out: Optional[str | Path] = None, repo_id: Optional[str] = None
) -> Path:
    """Write the Hub-ready folder for a finished stage and return its path.

    `repo_id` names the model in the card (usage snippet, model-index); without it the recipe's
    `hub.repo_id` template is used with `hub.org`, or `ORG` when no org is set.
    """
    stage_dir = stage_folder(stage_dir)
    ev = load_evidence(stage_dir)
    task = get_task(ev.cfg)
    model_dir = stage_dir / "model"
    out = Path(out) if out else default_out(stage_dir)
    if out.resolve() in (stage_dir.resolve(), model_dir.resolve()) or model_dir.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out} would write into the trained model's folder; choose another folder")
    if out.exists() and any(out.iterdir()) and not is_export(out):
        raise ExportError(
            f"{out} exists and is not an earlier export (no {CARD_CONFIG_NAME}); "
            "choose an empty or new folder with --out"
        )
    repo_id = repo_id or repo_name(ev.cfg, ev.cfg.hub.org or PLACEHOLDER_ORG)

    model_class = task.model_class()
    try:
        model, loading = model_class.from_pretrained(model_dir, output_loading_info=True)
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
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        check_student_only(tmp, model, model_dir)
        shutil.copyfile(stage_dir / "config.yaml", tmp / CARD_CONFIG_NAME)
        (tmp / RESULTS_NAME).write_text(json.dumps(results_json(ev), indent=2) + "\n", encoding="utf-8")
        build_card(ev, repo_id, task.pipeline_tag).save(tmp / "README.md")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # swap in the finished folder: a failed export never leaves a half-written one behind
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


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
    args = p.parse_args(argv)
    try:
        out = export_student(args.stage_dir, args.out, args.repo_id)
    except ExportError as err:
        print(f"distill export: {err}", file=sys.stderr)
        return 2
    print(f"exported {out}:\n{format_files(out)}")
    if not args.repo_id and PLACEHOLDER_ORG + "/" in (out / "README.md").read_text(encoding="utf-8"):
        print(
            f"note: the card names the model {PLACEHOLDER_ORG}/...; pass --repo-id, or set hub.org, "
            "or let `distill push` re-export it with the repo id"
        )
    return 0
