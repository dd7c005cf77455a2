"""What keeps a GPU busy, checked on the CPU: the loop reads device values on the host (a sync
on a GPU) a small constant number of times per optimizer step, not per micro-batch or per loss
term; DataLoader workers give the same batches; `train.compile` trains the same model.

Host reads are counted on the loop's own code (distill/train.py, losses.py, teachers.py,
evaluate.py): `.item()`, `.tolist()`, `bool()` / `float()` / `int()` of a tensor, `.cpu()`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distill.cli import main
from tests.test_resume import write_data

LOOP_FILES = ("distill/train.py", "distill/losses.py", "distill/teachers.py")
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def recipe(root: Path, teacher: Path, extra: str = "") -> Path:
    path = root / "recipe.yaml"
    path.write_text(
        f"""# loop speed: distill student recipe.yaml
task: {{family: classification, name: tiny}}
data:
  files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}
  max_length: 32
teacher: {{model: {teacher}, epochs: 1}}
student: {{num_layers: 1}}
distill: {{ce_weight: 0.5, kd_weight: 1.0, hidden_weight: 1.0, teacher_outputs: online}}
train: {{lr: 1e-3, batch_size: 4, epochs: 1, grad_accum: 2, logging_steps: 4, group_by_length: false}}
tracking: {{report_to: []}}
seed: 3
{extra}
"""
    )
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("speed")
    write_data(root)
    path = recipe(root, tiny_bert_dir)
    assert main(["teacher", str(path), f"output_dir={root / 'run'}"]) == 0
    return root, path


def test_host_reads_are_a_constant_per_optimizer_step(setup, tmp_path, monkeypatch):
    root, path = setup
    counts: dict[str, int] = {}
    from distill.loop import train

    in_training = {"on": False}
    original_step = train.train_step

    def step(*args, **kwargs):  # count only inside training steps and logging, not evaluation
        in_training["on"] = True
        try:
            return original_step(*args, **kwargs)
        finally:
            in_training["on"] = False

    original_record = train.Window.record

    def record(self, accelerator):
        in_training["on"] = True
        try:
            return original_record(self, accelerator)
        finally:
            in_training["on"] = False

    def counting(name, method):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if in_training["on"] and caller.endswith(LOOP_FILES):
                counts[name] = counts.get(name, 0) + 1
            return method(self, *args, **kwargs)

        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train.Window, "record", record)
    run = tmp_path / "run"
    assert main(["student", str(path), f"output_dir={run}", f"teacher.dir={root / 'run' / 'teacher'}"]) == 0
    steps = json.loads((run / "student" / "metrics.json").read_text())["info"]["steps"]
    assert steps == 8  # 64 rows / (4 per batch x 2 micro-batches)
    logs = sum(1 for line in (run / "student" / "log.jsonl").read_text().splitlines() if "train/loss" in line)
    total = sum(counts.values())
    print(f"host reads in the loop: {counts} over {steps} optimizer steps (16 micro-batches), {logs} log records")
    # one finiteness read per optimizer step, one per logged value per log record (4 terms: ce,
    # kd, hidden and the total), nothing per micro-batch or per term in between
    assert total <= steps * 1 + logs * 4, counts


def test_loader_workers_give_the_same_training(setup, tmp_path):
    root, path = setup
    shared = [f"teacher.dir={root / 'run' / 'teacher'}"]
    assert main(["student", str(path), f"output_dir={tmp_path / 'a'}", *shared]) == 0
    assert main(["student", str(path), f"output_dir={tmp_path / 'b'}", "train.num_workers=2", *shared]) == 0
    a = json.loads((tmp_path / "a" / "student" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "student" / "metrics.json").read_text())
    assert a["validation"] == pytest.approx(b["validation"], abs=1e-6)
    assert a["test"] == pytest.approx(b["test"], abs=1e-6)


@pytest.mark.slow
def test_compiled_student_trains_like_the_eager_one(setup, tmp_path):
    root, path = setup
    shared = [f"teacher.dir={root / 'run' / 'teacher'}", "distill.hidden_weight=0"]
    assert main(["student", str(path), f"output_dir={tmp_path / 'eager'}", *shared]) == 0
    assert main(["student", str(path), f"output_dir={tmp_path / 'compiled'}", "train.compile=true", *shared]) == 0
    a = json.loads((tmp_path / "eager" / "student" / "metrics.json").read_text())
    b = json.loads((tmp_path / "compiled" / "student" / "metrics.json").read_text())
    # inductor draws dropout masks from its own generator: the runs agree closely, not bitwise
    assert a["validation"]["loss"] == pytest.approx(b["validation"]["loss"], abs=2e-2)
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "compiled" / "student" / "model" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in w)  # saved like an eager model
