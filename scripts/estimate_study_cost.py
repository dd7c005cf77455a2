#!/usr/bin/env python
"""The GPU-hours of the reference study's whole grid, from a measured training throughput.

    python scripts/estimate_study_cost.py runs/gpu_check/train_bf16.json [--epochs 20]

Reads `samples_per_s` of `scripts/bench_train.py` (ALBETO-tiny-shaped student, BETO-shaped
teacher, sequence 128, cached and online KD) and multiplies out: 8 tasks x 6 students x the
study's lr x batch grid (6 settings) x the epochs a run lasts with early stopping (patience 10
of at most 50: `--epochs`, default 20), plus the teachers (fine-tuned once per task, 3 epochs,
at the online-KD step's cost as a stand-in for a large teacher's training step).

Assumptions, printed with the result: the training-set sizes below (approximate, from the
datasets' cards); QA windows at 512 tokens cost 4x a 128-token row (`--qa-factor`); ALBETO
base-N students cost about as much per step as the tiny one times N/4 x 2.5 (wider layers,
`--base-factor`); every run streams the cached teacher outputs (the cached-KD throughput).
An estimate to plan with, not a measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# training rows per task (approximate): classification/tagging rows, QA windows ~ questions
TASKS = {
    "mldoc": 10_000, "pawsx": 49_401, "xnli": 392_702, "pos": 14_305, "ner": 8_323,
    "mlqa": 87_599, "sqac": 15_036, "tar_xquad": 87_599,
}
QA = ("mlqa", "sqac", "tar_xquad")
STUDENTS = {"albeto-tiny": 1.0, "albeto-base-2": 2, "albeto-base-4": 4, "albeto-base-6": 6,
            "albeto-base-8": 8, "albeto-base-10": 10}
GRID = 6  # lr {5e-5, 1e-4} x batch {16, 32, 64}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="JSON written by scripts/bench_train.py --out")
    p.add_argument("--epochs", type=float, default=20.0, help="epochs a run lasts with early stopping")
    p.add_argument("--qa-factor", type=float, default=4.0)
    p.add_argument("--base-factor", type=float, default=2.5, help="cost of an ALBETO base layer vs 4 tiny layers' quarter")
    args = p.parse_args()
    r = json.loads(args.results.read_text())
    sps = r["samples_per_s"]
    device = r.get("device", {})
    student_s = 0.0
    for task, rows in TASKS.items():
        cost = rows * (args.qa_factor if task in QA else 1.0)
        for name, layers in STUDENTS.items():
            scale = 1.0 if name == "albeto-tiny" else layers / 4 * args.base_factor
            student_s += GRID * args.epochs * cost * scale / sps["cached"]
    teacher_s = sum(rows * (args.qa_factor if t in QA else 1.0) * 3 / sps["online"] for t, rows in TASKS.items())
    hours = (student_s + teacher_s) / 3600
    print(f"| measured on | {device.get('name', '?')} ({device.get('precision', '?')}) |")
    print("|---|---|")
    print(f"| student step, cached KD | {sps['cached']:.0f} samples/s |")
    print(f"| student step, online KD | {sps['online']:.0f} samples/s |")
    print(f"| student runs (8 tasks x 6 students x {GRID} settings x {args.epochs:g} epochs) | {student_s / 3600:.1f} GPU-hours |")
    print(f"| teachers (8, 3 epochs) | {teacher_s / 3600:.1f} GPU-hours |")
    print(f"| **whole grid** | **{hours:.1f} GPU-hours** |")


if __name__ == "__main__":
    main()
