"""Preemption and resume: a stage stopped by SIGTERM (mid-epoch, at an epoch end, during a
checkpoint write) and run again reaches the same weights as an uninterrupted run; a complete
stage is skipped; a different config is refused unless overwrite=true; a NaN stops the run.

All runs are the teacher stage of a tiny recipe (2-layer BERT, hidden 32, dropout on, 64 rows,
8 batches per epoch, 2 epochs, a checkpoint every 3 steps): dropout, the shuffled and
length-grouped batch order, warmup and decay all have to be restored exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distill.loop.train as train
from distill.objective.losses import GoldTerm
from distill.cli import main
from tests.conftest import write_keyword_data

ROOT = Path(__file__).resolve().parents[1]
WORDS = {"pos": ["bueno", "genial", "rápido", "barato"], "neg": ["malo", "lento", "roto", "caro"],
         "neu": ["normal", "regular", "común", "medio"]}


def write_data(root: Path) -> None:
    write_keyword_data(root, WORDS, {"train": 64, "validation": 16, "test": 16})


def write_recipe(root: Path, teacher: Path) -> Path:
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"""# resume tests: distill teacher recipe.yaml output_dir=...
task: {{family: classification, name: tiny}}
data:
  files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}
  max_length: 32
teacher: {{model: {teacher}}}
student: {{num_layers: 1}}
train: {{lr: 1e-3, batch_size: 8, epochs: 2, warmup_ratio: 0.25, logging_steps: 1,
         checkpoint_steps: 3, keep_checkpoints: 2}}
tracking: {{report_to: []}}
seed: 5
"""
    )
    return recipe


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "teacher" / "model" / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sigterm_at_forward(monkeypatch, n: int) -> None:
    """Send this process SIGTERM during the n-th training forward (the step must still finish)."""
    original = train.Trainee.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train.Trainee, "forward", forward)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("resume")
    write_data(root)
    recipe = write_recipe(root, tiny_bert_dir)
    reference = root / "uninterrupted"
    assert main(["teacher", str(recipe), f"output_dir={reference}"]) == 0
    return recipe, reference


def run_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "teacher" / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stop_at", [11, 8], ids=["mid-epoch", "epoch-end"])
def test_resume_after_sigterm_matches_uninterrupted(setup, tmp_path, monkeypatch, capsys, stop_at):
    """SIGTERM during step `stop_at`: that step finishes, a checkpoint is saved, the process exits
    75; the same command then resumes and ends on the uninterrupted run's weights."""
    recipe, reference = setup
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        sigterm_at_forward(patch, stop_at)
        with pytest.raises(SystemExit) as exit_info:
            main(["teacher", str(recipe), f"output_dir={run}"])
    assert exit_info.value.code == train.REQUEUE_EXIT_CODE == 75
    assert "Re-run the same command to resume" in capsys.readouterr().err
    ckpt = train.latest_checkpoint(run / "teacher" / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step-{stop_at}"
    state = json.loads((ckpt / "loop_state.json").read_text())
    # mid-epoch: epoch 1, 3 batches in; at the end of epoch 0 the epoch-end state is saved (after
    # its evaluation, with the best model so far inside the checkpoint)
    expected = (1, 3) if stop_at == 11 else (1, 0)
    assert (state["epoch"], state["batches_done"]) == expected
    assert (ckpt / "best" / "model.safetensors").exists()
    assert not (run / "teacher" / "metrics.json").exists()

    assert main(["teacher", str(recipe), f"output_dir={run}"]) == 0
    assert "resuming teacher from" in capsys.readouterr().out
    diff = max_diff(weights(run), weights(reference))
    print(f"max |weight difference|, resumed ({stop_at}) vs uninterrupted: {diff:.3g}")
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run by {diff}"
    ours = json.loads((run / "teacher" / "metrics.json").read_text())
    theirs = json.loads((reference / "teacher" / "metrics.json").read_text())
    assert ours["validation"] == pytest.approx(theirs["validation"], abs=1e-6)
    assert ours["test"] == pytest.approx(theirs["test"], abs=1e-6)
    # the log holds every step once, with the same losses
    ours_log = [r for r in run_log(run) if "train/loss" in r]
    theirs_log = [r for r in run_log(reference) if "train/loss" in r]
    assert [r["step"] for r in ours_log] == list(range(1, 17))
    assert [r["train/loss"] for r in ours_log] == pytest.approx([r["train/loss"] for r in theirs_log], abs=1e-6)
    assert [r["lr"] for r in ours_log] == pytest.approx([r["lr"] for r in theirs_log], rel=1e-9)
    assert not (run / "teacher" / "checkpoints").exists() and not (run / "teacher" / "best").exists()


def test_crash_during_checkpoint_write_keeps_the_previous_one(setup, tmp_path, monkeypatch):
    """A crash while the step-6 checkpoint is being written leaves step-3 as the latest complete
    checkpoint; the re-run resumes from it and still matches the uninterrupted run."""
    recipe, reference = setup
    run = tmp_path / "run"
    original = train.Accelerator.save_state
    calls = {"n": 0}

    def crashing_save(self, output_dir=None, **kwargs):
        calls["n"] += 1
        result = original(self, output_dir, **kwargs)
        if calls["n"] == 2:
            raise OSError("simulated crash in the middle of writing a checkpoint")
        return result

    with monkeypatch.context() as patch:
        patch.setattr(train.Accelerator, "save_state", crashing_save)
        with pytest.raises(OSError, match="simulated crash"):
            main(["teacher", str(recipe), f"output_dir={run}"])
    ckpts = run / "teacher" / "checkpoints"
    assert train.latest_checkpoint(ckpts).name == "step-3"
    assert (ckpts / ".tmp-step-6").exists()  # the half-written one, never taken for a checkpoint
    assert main(["teacher", str(recipe), f"output_dir={run}"]) == 0
    assert max_diff(weights(run), weights(reference)) <= 1e-6


@pytest.mark.slow
def test_sigterm_to_a_real_process_exits_75_and_resumes(setup, tmp_path):
    """`python -m distill teacher ...` killed with SIGTERM mid-run: exit status 75, a clear
    message, and a re-run that completes with the uninterrupted weights. (Each training forward
    is slowed by 0.15 s so the signal lands inside the loop.)"""
    recipe, reference = setup
    run = tmp_path / "run"
    slow = (
        "import sys, time\n"
        "import distill.loop.train as t\n"
        "from distill.cli import main\n"
        "f = t.Trainee.forward\n"
        "def slow(self, *a, **k):\n"
        "    if self.training: time.sleep(0.15)\n"
        "    return f(self, *a, **k)\n"
        "t.Trainee.forward = slow\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", slow, "teacher", str(recipe), f"output_dir={run}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )
    log_file = run / "teacher" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log_file.exists() and len(log_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by signal at step" in err and "Re-run the same command to resume" in err
    assert train.latest_checkpoint(run / "teacher" / "checkpoints") is not None
    assert main(["teacher", str(recipe), f"output_dir={run}"]) == 0
    assert max_diff(weights(run), weights(reference)) <= 1e-6


def test_complete_stage_is_skipped(setup, capsys):
    recipe, reference = setup
    before = snapshot(reference)
    mtime = (reference / "teacher" / "metrics.json").stat().st_mtime_ns
    assert main(["teacher", str(recipe), f"output_dir={reference}"]) == 0
    assert "complete with the same config, skipping" in capsys.readouterr().out
    assert snapshot(reference) == before
    assert (reference / "teacher" / "metrics.json").stat().st_mtime_ns == mtime


def test_different_config_is_refused_and_nothing_is_touched(setup, tmp_path, capsys):
    recipe, reference = setup
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    before = snapshot(run)
    assert main(["teacher", str(recipe), f"output_dir={run}", "train.lr=5e-4"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config" in err and "overwrite=true" in err
    assert snapshot(run) == before


def test_overwrite_replaces_a_different_run(setup, tmp_path):
    recipe, reference = setup
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    (run / "teacher" / "stale.txt").write_text("from the old run")
    assert main(["teacher", str(recipe), f"output_dir={run}", "train.lr=5e-4", "train.epochs=1", "overwrite=true"]) == 0
    saved = (run / "teacher" / "config.yaml").read_text()
    assert "lr: 0.0005" in saved and "epochs: 1" in saved
    assert not (run / "teacher" / "stale.txt").exists()
    assert [r["step"] for r in run_log(run) if "train/loss" in r] == list(range(1, 9))
    assert max_diff(weights(run), weights(reference)) > 1e-3


def test_nonfinite_loss_stops_with_step_terms_and_ids(setup, tmp_path, monkeypatch, capsys):
    """A NaN loss at step 5 stops the run (exit 2) naming the step, the loss terms and the
    batch's example ids, and keeps the step-3 checkpoint."""
    recipe, _ = setup
    run = tmp_path / "run"
    original = GoldTerm.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):  # the objective runs in training steps only
        loss = original(self, *args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(GoldTerm, "forward", forward)
    assert main(["teacher", str(recipe), f"output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 5 (epoch 0, batch 4 of the epoch)" in err
    assert "loss terms {'ce': nan}" in err and "example_ids [" in err
    assert "step-3" in err
    assert train.latest_checkpoint(run / "teacher" / "checkpoints").name == "step-3"
    ids = json.loads(err.split("example_ids ")[1].split("]")[0] + "]")
    assert len(ids) == 8 and all(0 <= i < 64 for i in ids)
    logged = run_log(run)[-1]
    assert logged["step"] == 4 and "non-finite loss" in logged["error"]
