"""The launch around a run: no process waits forever for another, a failure on the main process
reaches the others as an error naming it and what it was doing, and a precision the device
cannot apply is said at start and not recorded as used.

The two-process tests start the processes themselves (no launcher around them, as `srun` starts
one task per process), so nothing but distill itself can end a process that waits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from distill import launch
from tests.conftest import minilm_path, save_tiny, tiny_bert_config, write_keyword_data

ROOT = Path(__file__).resolve().parents[1]
WORDS = {"pos": ["bueno", "genial"], "neg": ["malo", "roto"], "neu": ["normal", "regular"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    write_keyword_data(root, WORDS, {"train": 32, "validation": 8, "test": 8})
    teacher = save_tiny(tiny_bert_config(id2label=dict(enumerate(sorted(WORDS)))), root / "teacher", minilm_path())
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"""# launch tests: distill student recipe.yaml output_dir=...
task: {{family: classification, name: tiny}}
data:
  files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}
  max_length: 32
teacher: {{model: {teacher}, finetuned: true}}
student: {{num_layers: 1}}
distill: {{ce_weight: 0.5, kd_weight: 0.5, teacher_outputs: cached}}
train: {{lr: 1e-3, batch_size: 4, epochs: 1, logging_steps: 1, checkpoint_steps: 2}}
tracking: {{report_to: []}}
seed: 3
"""
    )
    return root, recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(args: list[str], env: dict, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Both processes of a 2-process launch, started here; each is killed at `timeout`."""
    port = free_port()
    procs = []
    for rank in range(2):
        penv = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", **env}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "launch_worker.py"), *args], env=penv,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, err = proc.communicate()
            err += "\n[test] killed: still waiting at the deadline"
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.slow
def test_a_failure_on_the_main_process_reaches_the_other_as_an_error(setup, tmp_path):
    """The main process's disk is full at the first checkpoint (a check it alone makes): it stops
    with the disk message, and the other process, waiting for it, stops too, naming the main
    process, what it was doing and its error, instead of waiting in a barrier."""
    _, recipe = setup
    run = tmp_path / "run"
    start = time.monotonic()
    main, other = launch_two(["student", str(recipe), f"output_dir={run}"], {"FAIL_RANK": "0", "FAIL_HOW": "raise"})
    assert time.monotonic() - start < 200
    assert main.returncode == 2, main.stderr[-3000:]
    assert "not enough disk space to write a checkpoint" in main.stderr
    assert other.returncode == 2, other.stderr[-3000:]
    assert ("process 1 of 2 stops: the main process (0) failed while making room for checkpoint "
            f"{run / 'student' / 'checkpoints' / 'step-2'}: StageError: not enough disk space") in other.stderr
    assert not (run / "student" / ".lock").exists()  # the main process let go of its lock


@pytest.mark.slow
def test_a_frozen_main_process_is_not_waited_for_forever(setup, tmp_path):
    """A main process that stops answering (a frozen node) is waited for DISTILL_WAIT_S seconds,
    then the other process stops, naming it and what it was doing."""
    _, recipe = setup
    run = tmp_path / "run"
    env = {"FAIL_RANK": "0", "FAIL_HOW": "freeze", launch.WAIT_ENV: "4"}
    port = free_port()
    procs = []
    for rank in range(2):  # the frozen one must be killed by the test
        penv = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", **env}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "launch_worker.py"), "student", str(recipe),
                                       f"output_dir={run}"], env=penv, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        _, err = procs[1].communicate(timeout=240)
    finally:
        procs[0].kill()
        procs[0].communicate()
        procs[1].kill()
    assert procs[1].returncode == 2, err[-3000:]
    assert ("process 1 of 2 waited for process 0 while making room for checkpoint "
            f"{run / 'student' / 'checkpoints' / 'step-2'}, and heard nothing from it for 4 s") in err


def test_waits_in_one_process_cost_nothing():
    one = SimpleNamespace(num_processes=1, is_main_process=True)
    assert launch.on_main(one, "anything", lambda: 7) == 7
    with launch.together(one, "anything"), launch.main_first(one, "anything"):
        pass


def test_a_bad_wait_setting_is_named(monkeypatch):
    monkeypatch.setenv(launch.WAIT_ENV, "soon")
    with pytest.raises(launch.StageError, match="DISTILL_WAIT_S='soon': use a number of seconds > 0"):
        launch.wait_s()


def test_fp16_cannot_apply_on_a_cpu():
    def accelerator(mixed: str, device: str) -> SimpleNamespace:
        return SimpleNamespace(mixed_precision=mixed, device=SimpleNamespace(type=device), distributed_type="NO")

    assert launch.effective_precision(accelerator("fp16", "cpu")) == "no"
    assert "does not apply on cpu" in launch.precision_note(accelerator("fp16", "cpu"))
    for mixed, device in (("fp16", "cuda"), ("bf16", "cpu"), ("no", "cpu")):
        assert launch.effective_precision(accelerator(mixed, device)) == mixed
        assert launch.precision_note(accelerator(mixed, device)) is None


@pytest.mark.slow
def test_fp16_on_a_cpu_is_said_at_start_and_not_recorded_as_used(setup, tmp_path):
    """`--mixed_precision fp16` on a CPU trains in fp32: the run says so, and the teacher cache
    records (and is keyed by) fp32, the same cache an fp32 run reads."""
    _, recipe = setup
    cache = tmp_path / "cache"
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "fp16", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "distill", "student", str(recipe), f"output_dir={tmp_path / 'fp16'}",
         f"distill.cache_dir={cache}", "train.max_steps=1"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed_precision=fp16 does not apply on cpu: this run trains and runs the teacher in fp32" in proc.stderr
    (folder,) = cache.iterdir()
    assert json.loads((folder / "metadata.json").read_text())["parts"]["mixed_precision"] == "no"
    env.pop("ACCELERATE_MIXED_PRECISION")
    proc = subprocess.run(
        [sys.executable, "-m", "distill", "student", str(recipe), f"output_dir={tmp_path / 'fp32'}",
         f"distill.cache_dir={cache}", "train.max_steps=1"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"teacher cache: reusing {folder}" in proc.stdout
