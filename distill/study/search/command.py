"""`distill search`: the command line, and the launch scripts for several workers sharing one study.

    distill search recipes/pawsx.yaml search.trials=30 --root runs/search/pawsx
    ... --dry-run            check the search section, print the space and the study's state
    ... --workers 4          write commands.sh and slurm/ for 4 workers sharing one study
    ... --prepare            only fine-tune the shared teacher(s)
    ... --summarize          only (re)write the table, best recipe(s) and plots from the storage

Under `accelerate launch` every process runs the search; only the main one prints, writes
scripts and summaries (docs/search.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from distill.config import ConfigError
from distill.config.search_space import SearchError
from distill.study.search.outputs import atomic_write, search_report, write_outputs
from distill.study.search.study import redact, storage_file
from distill.study.search.trials import Search


def worker_command(launcher: str, recipe: str, overrides: Sequence[str], root: Path, extra: str = "") -> str:
    args = " ".join(shlex.quote(x) for x in [recipe, *overrides, "--root", str(root)])
    return f"{launcher} search {args}{extra}"


def launch_files(search: Search, workers: int, launcher: str, options: Sequence[str]) -> dict[str, str]:
    """commands.sh (one machine: the teacher, then N workers in the background) and slurm/
    (a teacher job, an array of N workers after it, a summary job after them; submit.sh)."""
    from distill.study.slurm import SLURM_RUN_STEP, sbatch_header

    cwd = shlex.quote(os.getcwd())
    root = search.root
    base = [search.recipe, *search.overrides]
    prepare = worker_command(launcher, search.recipe, search.overrides, root, " --prepare")
    summary = " ".join(shlex.quote(a) for a in ["python", "-m", "distill", "search", *base, "--root", str(root),
                                                  "--summarize"])
    files: dict[str, str] = {}
    lines = ["#!/usr/bin/env bash",
             f"# distill search '{search.study_name}': the teacher once, then {workers} workers sharing "
             f"{redact(search.storage_url)}.",
             "# Each worker runs trials until the study holds search.trials of them (or its time budget ends);",
             "# on a machine with several GPUs give each worker its own: CUDA_VISIBLE_DEVICES is set per line.",
             "set -euo pipefail", f"cd {cwd}", prepare, "pids=()"]
    for i in range(workers):
        lines.append(f"CUDA_VISIBLE_DEVICES=${{GPUS[{i}]:-{i}}} "
                     + worker_command(launcher, search.recipe, search.overrides, root, f" --worker {i}") + " & pids+=($!)")
    lines += ['status=0; for pid in "${pids[@]}"; do wait "$pid" || status=$?; done', summary, 'exit "$status"', ""]
    files["commands.sh"] = "\n".join(lines)
    logs = Path(os.path.abspath(root / "slurm" / "logs"))
    slurm = root / "slurm"
    name = re.sub(r"\W", "-", search.study_name)
    teacher = sbatch_header(f"distill-search-{name}-teacher", logs, options)
    teacher += ["set -uo pipefail", f"cd {cwd}", 'REQUEUE_ID="$SLURM_JOB_ID"', SLURM_RUN_STEP, f"run_step {prepare}", ""]
    workers_job = sbatch_header(f"distill-search-{name}", logs, options, array=workers)
    workers_job += ["set -uo pipefail", f"cd {cwd}", 'REQUEUE_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
                    SLURM_RUN_STEP,
                    "run_step " + worker_command(launcher, search.recipe, search.overrides, root,
                                                 ' --worker "$SLURM_ARRAY_TASK_ID"'), ""]
    cpu_options = [o for o in options if not re.match(r"(gres|gpus|gpus-per-\w+|gpu\w*)\b", o)]
    summary_job = sbatch_header(f"distill-search-{name}-summary", logs, cpu_options)
    summary_job += ["set -euo pipefail", f"cd {cwd}", summary, ""]
    files["slurm/teacher.sbatch"] = "\n".join(teacher)
    files["slurm/workers.sbatch"] = "\n".join(workers_job)
    files["slurm/summary.sbatch"] = "\n".join(summary_job)
    files["slurm/submit.sh"] = "\n".join([
        "#!/bin/bash", "# Submit the search: the teacher, then the workers, then the summary.", "set -euo pipefail",
        f"cd {cwd}", f"mkdir -p {shlex.quote(str(logs))}",
        f"t=$(sbatch --parsable {shlex.quote(str(slurm / 'teacher.sbatch'))}); t=${{t%%;*}}",
        f"w=$(sbatch --parsable --dependency=afterok:$t {shlex.quote(str(slurm / 'workers.sbatch'))}); w=${{w%%;*}}",
        f"sbatch --dependency=afterany:$w {shlex.quote(str(slurm / 'summary.sbatch'))}", ""])
    return files


def write_launch_files(search: Search, workers: int, launcher: str, options: Sequence[str]) -> None:
    if workers < 1:
        raise SearchError(f"--workers must be >= 1, got {workers}")
    if search.storage_url.startswith("sqlite") and workers > 1:
        print("distill search: note: SQLite serves workers on one machine (local disk); across machines set "
              "search.storage to a database URL (postgresql://...) or to a journal file on a filesystem they "
              "share (journal:///shared/study.log)", file=sys.stderr)
    for name, text in launch_files(search, workers, launcher, options).items():
        path = search.root / name
        atomic_write(path, text)
        if name.endswith((".sh", ".sbatch")):
            path.chmod(0o755)
    print(f"wrote {search.root / 'commands.sh'} (one machine) and {search.root / 'slurm'}/ "
          f"(submit with `bash {search.root / 'slurm' / 'submit.sh'}`)")


def dry_run(search: Search) -> None:
    search.preflight()
    print(f"search '{search.study_name}' in {search.root} ({redact(search.storage_url)})")
    print("objectives: " + ", ".join(f"{o} ({d})" for o, d in zip(search.objectives, search.directions)))
    print(f"sampler {search.cfg.sampler}, pruner {search.pruner}, trials {search.cfg.trials}, "
          f"time budget {search.cfg.time_budget}")
    for p in search.params:
        print(f"  {p.key}: {p.describe()}")
    local = storage_file(search.storage_url)
    if local is not None and not local.exists():
        print("no trials yet (the storage does not exist)")
        return
    try:
        study = search.study(create=False)
        print(f"{search.used(study.get_trials(deepcopy=False))} trials so far")
    except SearchError as err:
        print(err)


# --- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill search",
        description="Search recipe keys with Optuna (the recipe's `search:` section): every trial is an ordinary "
        "stage in <root>/trial-<n>/, the teacher is fine-tuned once and shared, pruning follows the validation "
        "metric, and a stopped search resumes from its storage. Writes trials.md, best.yaml (or pareto/) and "
        "plots/ in the search folder.",
        epilog="example: distill search recipes/pawsx.yaml search.trials=30 --root runs/search/pawsx",
    )
    p.add_argument("recipe", help="recipe YAML file with a search: section")
    p.add_argument("overrides", nargs="*", help="key=value overrides (search.trials=50, search.storage=URL, ...)")
    p.add_argument("--root", default=None, help="the search folder (default runs/search/<task.name>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="check everything, print the space and the study's "
                      "state; train nothing")
    mode.add_argument("--workers", type=int, default=None, metavar="N",
                      help="write commands.sh and slurm/ for N workers sharing the study, instead of running")
    mode.add_argument("--prepare", action="store_true", help="only fine-tune the shared teacher(s)")
    mode.add_argument("--summarize", action="store_true", help="only write the outputs from the storage")
    p.add_argument("--worker", type=int, default=0, help="this worker's index (seeds its sampler apart)")
    p.add_argument("--max-trials", type=int, default=None, metavar="K", help="run at most K trials in this process")
    p.add_argument("--launcher", default="accelerate launch -m distill",
                   help="how the written scripts start distill (default 'accelerate launch -m distill')")
    p.add_argument("--slurm-opt", action="append", default=[], metavar="OPT",
                   help="an extra #SBATCH option for the scripts, repeatable: --slurm-opt partition=gpu")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow the options
    try:
        import optuna  # noqa: F401
    except ImportError:
        print("distill search: needs Optuna: pip install optuna (or pip install 'distill[search]')", file=sys.stderr)
        return 2
    from distill.errors import DataError, ModelLoadError, Preempted, StageError

    try:
        search = Search(args.recipe, args.overrides, args.root, worker=args.worker)
        main_process = search.team.main
        if args.workers is not None:
            if main_process:
                write_launch_files(search, args.workers, args.launcher, [o.lstrip("-") for o in args.slurm_opt])
            return 0
        if args.dry_run:
            if main_process:
                dry_run(search)
            return 0
        if args.summarize:
            if not main_process:
                return 0
            info = write_outputs(search, search.study(create=False), plots=True)
            print(search_report(search.root))
            return 0 if info["best"] else 1
        if args.prepare:
            search.team.lead("checking the search", lambda: (search.root.mkdir(parents=True, exist_ok=True),
                                                             search.preflight()))
            search.prepare()
            return 0
        study = search.run(args.max_trials)
        if study is not None:
            print(search_report(search.root))
        return 0
    except ConfigError as err:
        print(f"distill search: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        print(f"distill search: {err.message} The trial is queued again: re-run the same command to resume.",
              file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("distill search: interrupted; the running trial is queued again: re-run the same command to resume",
              file=sys.stderr)
        return 130
    except (DataError, ModelLoadError, StageError, FileNotFoundError) as err:
        print(f"distill search: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
