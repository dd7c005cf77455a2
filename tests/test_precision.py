"""Mixed precision on the CPU, the way a GPU run gets it from `accelerate launch --mixed_precision`.

bf16: accelerate autocasts on a CPU as on a GPU; a student distils from the cached teacher (its
logits and bfloat16 hidden states) under autocast, with no loss scale anywhere.

fp16: accelerate gives a CPU no gradient scaler, so these tests give it a real
`torch.amp.GradScaler("cpu")` and CPU autocast in float16 (what `accelerate launch
--mixed_precision fp16` sets up on a GPU), starting from a loss scale so large that the first
steps' gradients overflow. The run goes on: each overflowing step is skipped by the scaler
(weights untouched, scale halved), counted and logged, and training resumes once the scale fits.
It stops only after `train.max_skipped_steps` skips in a row, or on a non-finite loss with the
scale at its floor, saying which.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from distill.cli import main
from distill.loop import setup as setup_mod
from distill.loop import train
from distill.objective.losses import GoldTerm
from tests.conftest import minilm_path, save_tiny, tiny_bert_config
from tests.test_resume import write_data


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("precision")
    write_data(root)
    teacher = save_tiny(tiny_bert_config(id2label=dict(enumerate(["neg", "neu", "pos"]))), root / "teacher", minilm_path())
    path = root / "recipe.yaml"
    path.write_text(
        f"""# mixed precision: accelerate launch --mixed_precision fp16 -m distill student recipe.yaml
task: {{family: classification, name: tiny}}
data:
  files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}
  max_length: 32
teacher: {{model: {teacher}, finetuned: true}}
student: {{num_layers: 1}}
distill: {{ce_weight: 0.5, kd_weight: 1.0}}
train: {{lr: 1e-3, batch_size: 8, epochs: 2, logging_steps: 1, warmup_ratio: 0.0}}
tracking: {{report_to: []}}
seed: 3
"""
    )
    return path


@pytest.fixture
def fresh_accelerate():
    """Each run here sets its own precision: accelerate's process-wide state must start anew."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def fp16_on_cpu(monkeypatch, init_scale: float) -> None:
    """Stages get fp16 as on a GPU: autocast in float16 and a real gradient scaler."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    original = setup_mod.make_accelerator

    def make(plan):
        accelerator = original(plan)
        assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None  # accelerate's CPU default
        accelerator.native_amp = True  # autocast(cpu, float16) around the forward
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        return accelerator

    monkeypatch.setattr(train, "make_accelerator", make)


def log_of(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "student" / "log.jsonl").read_text().splitlines()]


def test_fp16_skipped_steps_are_counted_logged_and_change_no_weight(recipe, tmp_path, monkeypatch, fresh_accelerate):
    fp16_on_cpu(monkeypatch, init_scale=2.0**24)
    steps: list[dict] = []
    original = train.train_step

    def step(accelerator, trainee, *args, **kwargs):
        model = accelerator.unwrap_model(trainee).model
        before = [p.detach().clone() for p in model.parameters()]
        result = original(accelerator, trainee, *args, **kwargs)
        if result.synced:
            changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
            steps.append({"skipped": result.skipped, "changed": changed, "scale": result.scale})
        return result

    monkeypatch.setattr(train, "train_step", step)
    run = tmp_path / "run"
    assert main(["student", str(recipe), f"output_dir={run}"]) == 0
    skipped = [s for s in steps if s["skipped"]]
    print(f"fp16: {len(skipped)} of {len(steps)} steps skipped; scales {[s['scale'] for s in steps]}")
    assert 1 <= len(skipped) < len(steps)  # it overflowed, then trained
    assert steps[0]["skipped"] and steps[-1]["changed"]
    assert all(not s["changed"] for s in skipped)  # a skipped step leaves every weight as it was
    assert all(s["changed"] for s in steps if not s["skipped"])
    for a, b in zip(steps, steps[1:]):  # the scaler halves the scale after each skip
        if a["skipped"]:
            assert b["scale"] == a["scale"] / 2
    info = json.loads((run / "student" / "metrics.json").read_text())["info"]
    records = [r for r in log_of(run) if "train/loss" in r]
    assert info["skipped_steps"] == len(skipped) == sum(r["train/skipped_steps"] for r in records)
    assert [r["train/loss_scale"] for r in records] == [s["scale"] for s in steps]
    assert all(r["train/loss"] == r["train/loss"] for r in records)  # finite losses were logged


def test_fp16_stops_after_too_many_skipped_steps_in_a_row(recipe, tmp_path, monkeypatch, fresh_accelerate, capsys):
    fp16_on_cpu(monkeypatch, init_scale=2.0**100)  # overflows for dozens of halvings
    run = tmp_path / "run"
    assert main(["student", str(recipe), f"output_dir={run}", "train.max_skipped_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "3 optimizer steps in a row were skipped by the fp16 gradient scaler (train.max_skipped_steps=3" in err
    assert "at step 3 (epoch 0" in err and "raise train.max_skipped_steps" in err
    assert not (run / "student" / "metrics.json").exists()


def test_fp16_stops_on_a_nonfinite_loss_at_the_scale_floor(recipe, tmp_path, monkeypatch, fresh_accelerate, capsys):
    """A loss that is NaN whatever the scale: skipped while the scaler lowers the scale (4, 2),
    then stopped once the scale is at its floor (1), naming the loss, not the gradients."""
    fp16_on_cpu(monkeypatch, init_scale=4.0)
    original = GoldTerm.forward
    monkeypatch.setattr(GoldTerm, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    run = tmp_path / "run"
    assert main(["student", str(recipe), f"output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 3 (epoch 0, batch 2 of the epoch) with the fp16 loss scale at its floor (1 <= 1)" in err
    assert "Train in bf16" in err


def test_bf16_distils_from_the_cache_under_autocast(recipe, tmp_path, monkeypatch, fresh_accelerate):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    dtypes: set = set()
    original = train.Trainee.forward

    def forward(self, inputs, batch=None, teacher=None):
        out, loss, terms = original(self, inputs, batch, teacher)
        if batch is not None:
            dtypes.add(out.logits.dtype)
        return out, loss, terms

    monkeypatch.setattr(train.Trainee, "forward", forward)
    run = tmp_path / "run"
    extra = ["distill.hidden_weight=1.0", "distill.cache_hidden_states=true", "distill.cache_hidden_dtype=bfloat16"]
    assert main(["student", str(recipe), f"output_dir={run}", *extra]) == 0
    assert dtypes == {torch.bfloat16}  # the student trained under autocast
    (cache,) = (run / "teacher_cache").iterdir()
    parts = json.loads((cache / "metadata.json").read_text())["parts"]
    assert parts["mixed_precision"] == "bf16" and parts["hidden_dtype"] == "bfloat16"
    records = [r for r in log_of(run) if "train/loss" in r]
    assert records and all(0 <= r["train/loss_hidden"] < float("inf") for r in records)
    assert not any("train/loss_scale" in r for r in records)  # bf16 needs no loss scaling
    info = json.loads((run / "student" / "metrics.json").read_text())["info"]
    assert "skipped_steps" not in info


@pytest.mark.parametrize("override, message", [
    ("train.max_skipped_steps=-1", r"train\.max_skipped_steps=-1 is out of range"),
    ("distill.cache_hidden_dtype=half", r"distill\.cache_hidden_dtype='half' is not one of: float32, float16, bfloat16"),
])
def test_the_new_keys_are_checked_when_the_recipe_loads(recipe, override, message):
    from distill.config import ConfigError, load_config

    assert load_config(recipe, ["train.max_skipped_steps=0", "distill.cache_hidden_dtype=bfloat16"]).train.max_skipped_steps == 0
    with pytest.raises(ConfigError, match=message):
        load_config(recipe, [override])
