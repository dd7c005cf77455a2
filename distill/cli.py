"""Command line: `distill run RECIPE [key=value ...]` and friends.

Works the same as `distill ...`, `python -m distill ...` and `accelerate launch -m distill ...`;
devices, precision and distribution come from accelerate's config, never from the recipe.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Optional

from distill.config import ConfigError, load_config

# Commands implemented in their own modules, each exposing `main(argv) -> int`.
EXTERNAL = {
    "export": ("distill.ship.export", "write a Hub-ready folder for a trained student (model + card; "
               "--onnx/--int8 add parity-checked ONNX files)"),
    "push": ("distill.ship.hub", "upload an exported student to the Hugging Face Hub"),
    "bench": ("distill.bench.cli", "measure parameters, MACs and latency of models (offline shapes too)"),
    "report": ("distill.study.report", "collect a tree of runs into the study's result tables"),
    "grid": ("distill.study.grid", "expand tasks x students x settings into runs; run or write launch scripts"),
    "search": ("distill.study.search.command", "Optuna search over recipe keys (the recipe's search: section); trials are stages"),
}

STAGE_HELP = {
    "run": "run the recipe's stages: teacher fine-tuning (each teacher not finetuned=true; "
    "complete stages are skipped), distillation, and the no-teacher baseline when run.baseline=true",
    "teacher": "fine-tune the teacher on the task (stage 'teacher'; with `teachers:` every one not "
    "finetuned, stages teacher-0, teacher-1, ..., or one with --index I)",
    "student": "distil the student from the fine-tuned teacher (stage 'student')",
    "baseline": "fine-tune the student alone, no teacher (stage 'baseline')",
    "eval": "evaluate a saved model: distill eval RECIPE checkpoint=PATH",
    "validate": "check recipes against the schema without running anything",
}

EPILOG = """\
examples:
  distill run recipes/demo.yaml
  distill run recipes/pawsx.yaml student.model=albeto-base-6 train.lr=1e-4
  accelerate launch -m distill run recipes/xnli.yaml student.model=albeto-tiny
  distill eval recipes/pawsx.yaml checkpoint=runs/pawsx/student/model

Overrides are key=value pairs on the recipe's schema (train.lr, train.batch_size, train.epochs,
train.max_steps, student.model, teacher.model, data.max_train_samples, output_dir, seed, ...).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill",
        description="Task-specific knowledge distillation for transformer encoders.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in STAGE_HELP.items():
        sp = sub.add_parser(name, help=text, description=text, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "validate":
            sp.add_argument("recipes", nargs="+", help="recipe YAML files")
            sp.add_argument("overrides", nargs="*", default=[], help=argparse.SUPPRESS)
        else:
            sp.add_argument("recipe", help="recipe YAML file (e.g. recipes/pawsx.yaml)")
            sp.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
        if name == "teacher":
            sp.add_argument("--index", type=int, default=None, metavar="I",
                            help="with `teachers:`, fine-tune teachers[I] only (stage teacher-I)")
    for name, (_, text) in EXTERNAL.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def run_stages(cfg, stages: list[str]) -> dict[str, dict]:
    """Run the named stages in order, each skipped when complete; results keyed by stage name."""
    from distill.loop.preflight import preflight
    from distill.loop.train import run_stage

    preflight(cfg, stages)  # every stage's checks before the first one trains
    return {stage: run_stage(cfg, stage) for stage in stages}


def stages_of(cfg) -> list[str]:
    """`distill run`'s stages: each teacher to fine-tune, the student, the baseline."""
    from distill.config import has_teacher
    from distill.loop.plan import teacher_stages

    stages = teacher_stages(cfg)
    stages.append("student")
    if cfg.run.baseline and has_teacher(cfg):
        stages.append("baseline")
    return stages


def teacher_command_stages(cfg, index: Optional[int]) -> list[str]:
    """`distill teacher`'s stages: the one teacher; with `teachers:`, teachers[index] or every
    teacher that is not `finetuned` already."""
    if not cfg.teachers:
        if index not in (None, 0):
            raise ConfigError(f"--index {index}: the recipe has one teacher (`teacher:`); drop --index")
        if not cfg.teacher.model:
            raise ConfigError("distill teacher needs teacher.model")
        return ["teacher"]
    if index is not None:
        if not 0 <= index < len(cfg.teachers):
            raise ConfigError(f"--index {index}: the recipe lists {len(cfg.teachers)} teachers (0..{len(cfg.teachers) - 1})")
        if cfg.teachers[index].finetuned:
            raise ConfigError(f"teachers[{index}] is finetuned=true: there is nothing to fine-tune")
        return [f"teacher-{index}"]
    from distill.loop.plan import teacher_stages

    stages = teacher_stages(cfg)
    if not stages:
        raise ConfigError("every teacher in `teachers:` is finetuned=true: there is nothing to fine-tune")
    return stages


def cmd_eval(cfg) -> int:
    from distill.loop.evaluate import evaluate_checkpoint

    if not cfg.checkpoint:
        raise ConfigError("distill eval needs checkpoint=PATH (a saved model folder, e.g. runs/x/student/model)")
    results = evaluate_checkpoint(cfg, cfg.checkpoint)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(results, indent=2))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "accelerate.utils.other",
                  "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()  # load reports of fresh task heads are expected
    transformers.logging.disable_progress_bar()
    if argv and argv[0] in EXTERNAL:
        module, _ = EXTERNAL[argv[0]]
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            print(f"distill {argv[0]}: not available in this installation ({err})", file=sys.stderr)
            return 2
        return int(mod.main(argv[1:]) or 0)
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        if args.command == "validate":
            for recipe in args.recipes:
                load_config(recipe, args.overrides)
                print(f"ok  {recipe}")
            return 0
        cfg = load_config(args.recipe, args.overrides)
        if args.command == "eval":
            return cmd_eval(cfg)
        if args.command == "run":
            stages = stages_of(cfg)
            results = run_stages(cfg, stages)
            from distill.study.summary import print_summary

            print_summary(cfg, results)
            if cfg.hub.push:
                from distill.ship.hub import push_from_run

                push_from_run(cfg)
            return 0
        if args.command == "teacher":
            run_stages(cfg, teacher_command_stages(cfg, args.index))
            return 0
        run_stages(cfg, [args.command])
        return 0
    except ConfigError as err:
        print(f"distill: config error: {err}", file=sys.stderr)
        return 2
    except SystemExit as err:
        from distill.errors import Preempted

        if isinstance(err, Preempted):
            print(f"distill: {err.message}", file=sys.stderr)
        raise
    except Exception as err:
        from distill.ship.evidence import ExportError
        from distill.errors import DataError
        from distill.ship.hub import PushError
        from distill.errors import ModelLoadError
        from distill.errors import StageError

        if isinstance(err, (DataError, ModelLoadError, StageError, ExportError, PushError, FileNotFoundError)):
            print(f"distill: {type(err).__name__}: {err}", file=sys.stderr)
            return 2
        raise
