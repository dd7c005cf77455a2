"""SLURM job pieces shared by `distill grid` and `distill search --workers`: the sbatch header
and the run step that forwards SLURM's TERM to the run and requeues a stopped job."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from distill.errors import REQUEUE_EXIT_CODE

# The body shared by every SLURM script: run a command in its own process group, forward the
# TERM that SLURM sends before the time limit to all of its processes, wait until they have
# saved their checkpoint and exited, and requeue the job when the run did not finish.
SLURM_RUN_STEP = r"""preempted=0
run_step() {
  setsid "$@" &
  local pid=$! status=0
  trap "preempted=1; kill -TERM -- -$pid 2>/dev/null" TERM
  wait "$pid" || status=$?
  if [ "$preempted" = 1 ]; then wait "$pid"; status=$?; fi
  while kill -0 -- -"$pid" 2>/dev/null; do sleep 2; done  # workers still writing the checkpoint
  trap - TERM
  if [ "$status" -ne 0 ] && { [ "$status" -eq __CODE__ ] || [ "$preempted" = 1 ]; }; then
    echo "[distill grid] stopped with a checkpoint (exit $status): requeueing $REQUEUE_ID"
    scontrol requeue "$REQUEUE_ID"
    exit 0
  fi
  return "$status"
}
""".replace("__CODE__", str(REQUEUE_EXIT_CODE))


def sbatch_header(name: str, logs: Path, options: Sequence[str], array: Optional[int] = None) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}"]
    if array is not None:
        lines += [f"#SBATCH --array=0-{array - 1}", f"#SBATCH --output={logs}/%x-%A_%a.out"]
    else:
        lines.append(f"#SBATCH --output={logs}/%x-%j.out")
    lines += ["#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:TERM@180"]
    lines += [f"#SBATCH --{opt}" for opt in options]
    return lines
