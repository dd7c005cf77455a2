"""Two real processes (torchrun, gloo on CPU) against one: same global batch, same results.

The 2-process run distils a student with the teacher online (each process runs a frozen copy)
at batch 8 per process; the 1-process run uses batch 16. With dropout off and the batches
un-grouped (so both runs see the same 16 rows per step), the weights and every metric agree
to float rounding. The evaluation sets (25 and 23 rows, batches of 6 per process) leave a
partial last round, so accelerate pads it with repeated rows: they must count nowhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distill.loop.train as train
from distill.teachers import teacher as teachers
from distill.cli import main
from tests.conftest import minilm_path, save_tiny, tiny_bert_config, write_keyword_data

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # weights and losses, 1 vs 2 processes (measured: ~6e-8)
WORDS = {"pos": ["bueno", "genial"], "neg": ["malo", "roto"], "neu": ["normal", "regular"]}


def write_data(root: Path) -> None:
    write_keyword_data(root, WORDS, {"train": 64, "validation": 25, "test": 23})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_data(root)
    # a "fine-tuned" teacher for the data's labels; dropout off: the two runs would draw
    # different dropout masks otherwise
    config = tiny_bert_config(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, id2label=dict(enumerate(sorted(WORDS)))
    )
    teacher = save_tiny(config, root / "teacher", minilm_path())
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"""# 1 vs 2 processes:
#   ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m distill student recipe.yaml
task: {{family: classification, name: tiny}}
data:
  files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}
  max_length: 32
teacher: {{model: {teacher}, finetuned: true}}
student: {{num_layers: 1}}
distill: {{ce_weight: 0.5, kd_weight: 0.5, temperature: 2.0, teacher_outputs: online}}
train: {{lr: 5e-3, batch_size: 8, eval_batch_size: 6, epochs: 2, warmup_ratio: 0.25, logging_steps: 1,
         group_by_length: false}}
tracking: {{report_to: []}}
seed: 5
"""
    )
    return root, recipe


def student_on_one_and_two_processes(root: Path, recipe: Path, timeout: int = 300) -> tuple[Path, Path, str]:
    """The recipe's student stage under torchrun with 2 CPU processes (batch 8 each) into
    root/two, and in this process with batch 16 into root/one: (one, two, the 2-process stdout)."""
    two = root / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "distill", "student", str(recipe), f"output_dir={two}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = root / "one"
    assert main(["student", str(recipe), f"output_dir={one}", "train.batch_size=16"]) == 0
    return one, two, proc.stdout


@pytest.fixture(scope="module")
def runs(setup):
    """(1-process run, 2-process run, the 2-process run's stdout)."""
    return student_on_one_and_two_processes(*setup)


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(runs):
    one, two, _ = runs
    diff = max_diff(one / "student" / "model", two / "student" / "model")
    print(f"max |weight difference|, 1 vs 2 processes: {diff:.3g}")
    assert diff <= TOLERANCE
    m1 = json.loads((one / "student" / "metrics.json").read_text())
    m2 = json.loads((two / "student" / "metrics.json").read_text())
    assert m2["info"]["processes"] == 2 and m1["info"]["processes"] == 1
    assert m1["info"]["steps"] == m2["info"]["steps"] == 8  # 64 rows / 16 per step x 2 epochs
    for split in ("validation", "test"):
        print(f"{split}: accuracy {m1[split]['accuracy']} vs {m2[split]['accuracy']}, "
              f"|loss difference| {abs(m1[split]['loss'] - m2[split]['loss']):.3g}")
        assert m1[split]["accuracy"] == m2[split]["accuracy"]
        assert m1[split]["loss"] == pytest.approx(m2[split]["loss"], abs=TOLERANCE)
    log1 = [json.loads(x) for x in (one / "student" / "log.jsonl").read_text().splitlines()]
    log2 = [json.loads(x) for x in (two / "student" / "log.jsonl").read_text().splitlines()]
    train1 = [r for r in log1 if "train/loss" in r]
    train2 = [r for r in log2 if "train/loss" in r]
    # one writer: every step logged once; the same losses and learning rates step by step
    assert [r["step"] for r in train2] == list(range(1, 9))
    assert [r["lr"] for r in train2] == pytest.approx([r["lr"] for r in train1], rel=1e-9)
    assert [r["train/loss"] for r in train2] == pytest.approx([r["train/loss"] for r in train1], abs=TOLERANCE)


@pytest.mark.slow
def test_evaluation_counts_every_row_once_and_matches_one_process(runs, setup):
    """The 2-process run scored its final weights on 25 + 23 rows with repeats in the last
    round; scoring the same weights in one process gives the same numbers, and every
    prediction is there exactly once."""
    root, recipe = setup
    _, two, stdout = runs
    from distill.config import load_config
    from distill.loop.evaluate import evaluate_checkpoint

    cfg = load_config(recipe, [f"output_dir={root / 'scratch'}"])
    again = evaluate_checkpoint(cfg, str(two / "student" / "model"))
    saved = json.loads((two / "student" / "metrics.json").read_text())
    for split, rows in (("validation", 25), ("test", 23)):
        print(f"{split}: same weights, 1 vs 2 processes: |loss difference| "
              f"{abs(again[split]['loss'] - saved[split]['loss']):.3g}")
        assert again[split]["accuracy"] == saved[split]["accuracy"]
        assert again[split]["loss"] == pytest.approx(saved[split]["loss"], abs=1e-6)
        ids = [json.loads(x)["example_id"] for x in (two / "student" / f"predictions_{split}.jsonl").read_text().splitlines()]
        assert sorted(ids) == list(range(rows))
    assert stdout.count("[distill] student done") == 1  # printed by the main process only


def test_teacher_is_inference_only(setup, monkeypatch):
    """The online teacher is never prepared (no DDP wrapper, no gradient sync), has no trainable
    parameter, stays in eval mode, and none of its parameters is in the optimizer."""
    root, recipe = setup
    prepared: list = []
    original = train.Accelerator.prepare

    def spy(self, *objects, **kwargs):
        prepared.extend(objects)
        return original(self, *objects, **kwargs)

    seen: dict = {}
    online_call = teachers.OnlineTeacher.__call__

    def record(self, batch):
        seen["teacher"] = self.model
        return online_call(self, batch)

    monkeypatch.setattr(train.Accelerator, "prepare", spy)
    monkeypatch.setattr(teachers.OnlineTeacher, "__call__", record)
    assert main(["student", str(recipe), f"output_dir={root / 'inference'}", "train.epochs=1", "data.max_eval_samples=4"]) == 0
    teacher = seen["teacher"]
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(obj is not teacher for obj in prepared)
    optimizer = next(o for o in prepared if isinstance(o, torch.optim.Optimizer))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}


def test_processes_accelerate_does_not_see_are_refused(setup, monkeypatch, capsys):
    """torchrun without ACCELERATE_USE_CPU on a CPU machine starts processes that accelerate
    treats as independent runs (all writing one folder): refused before anything is written."""
    root, recipe = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    out = root / "refused"
    assert main(["student", str(recipe), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "the launcher started 2 processes but accelerate runs 1" in err and "ACCELERATE_USE_CPU=1" in err
    assert not out.exists()
    shutil.rmtree(out, ignore_errors=True)


ACCELERATE_CONFIGS = {
    "single_gpu_bf16.yaml": "NO",
    "multi_gpu_ddp.yaml": "MULTI_GPU",
    "multi_node_ddp.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
}


@pytest.mark.parametrize("name", list(ACCELERATE_CONFIGS))
def test_shipped_accelerate_configs_are_valid(name):
    """Each launcher config loads as accelerate's own config class, every nested FSDP/DeepSpeed
    key is an option `accelerate launch` knows, and the hardware stays out of the recipes."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    path = ROOT / "recipes" / "accelerate" / name
    config = ClusterConfig.from_yaml_file(path)
    assert config.distributed_type.value == ACCELERATE_CONFIGS[name]
    assert config.mixed_precision == "bf16"
    known = {action.dest for action in launch_command_parser()._actions}
    nested = {**config.fsdp_config, **config.deepspeed_config}
    assert [k for k in nested if k not in known] == []
    assert "accelerate launch --config_file recipes/accelerate/" + name in path.read_text()
    if name == "multi_node_ddp.yaml":
        assert config.num_machines > 1 and config.main_process_port


def test_recipes_hold_no_launcher_settings():
    """Devices, precision and sharding come from accelerate's config, never from a recipe."""
    launcher_words = ("mixed_precision", "num_processes", "distributed_type", "fsdp", "deepspeed", "gpu_ids")
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        text = "\n".join(line.split("#")[0] for line in recipe.read_text().splitlines())
        assert not [w for w in launcher_words if w in text], recipe.name
