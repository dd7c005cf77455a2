"""What keeps a GPU busy, checked on the CPU: the loop reads a device value on the host (a sync on
a GPU) once per optimizer step and exchanges one collective between processes per optimizer
step, on every path (teacher online, cached logits, cached hidden states; one process and two),
logging included; DataLoader workers give the same batches; `train.compile` trains the same model.

Host reads are counted on the project's own code while the loop trains (not while it evaluates
or checkpoints, and not inside the data pipeline, whose tensors are host tensors): `.item()`,
`.tolist()`, `bool()` / `float()` / `int()` of a tensor, `.cpu()`, `.numpy()`; and, seen at the
dispatcher, any op whose output shape depends on a tensor's values (`x[mask]`, `nonzero`...: on a
GPU the host waits for the device there too), which must not occur at all. Collectives are
the `torch.distributed` calls made in the same window (DDP's gradient all-reduce, made by its
reducer during backward, is the training itself and is not one of them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distill.cli import main
from tests.test_resume import write_data

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = str(ROOT / "distill")
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier",
               "gather", "gather_object", "scatter", "all_to_all")
# ATen ops whose output shape is read from a tensor's values (besides boolean indexing)
DATA_SHAPED = {"nonzero", "nonzero_numpy", "masked_select", "unique_dim", "_unique", "_unique2", "unique_consecutive",
               "repeat_interleave", "masked_scatter", "argwhere"}
# frames of the loop that are not training steps
NOT_STEPS = {"evaluate", "evaluate_and_select", "checkpoint", "preempt", "finish", "save_checkpoint"}
PATHS = {
    "online": "distill: {ce_weight: 0.5, kd_weight: 1.0, hidden_weight: 1.0, teacher_outputs: online}",
    "cached logits": "distill: {ce_weight: 0.5, kd_weight: 1.0}",
    "cached hidden states": "distill: {ce_weight: 0.5, kd_weight: 1.0, hidden_weight: 1.0, cache_hidden_states: true}",
}


def recipe(root: Path, teacher: Path, body: str = PATHS["online"], where: Path | None = None) -> Path:
    """The recipe over root's data, written into `where` (default root)."""
    path = (where or root) / "recipe.yaml"
    path.write_text(
        f"""# loop speed: distill student recipe.yaml
task: {{family: classification, name: tiny}}
data:
  files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}
  max_length: 32
teacher: {{model: {teacher}, epochs: 1}}
student: {{num_layers: 1}}
{body}
train: {{lr: 1e-3, batch_size: 4, epochs: 1, grad_accum: 2, logging_steps: 4, group_by_length: false}}
tracking: {{report_to: []}}
seed: 3
"""
    )
    return path


def in_a_step(ours: bool) -> bool:
    """Whether the call (two frames up) is made while a training step runs: inside
    `train_stage`, outside evaluation, checkpoints and the DataLoader; with `ours`, also made by
    the project's code itself (a collective is made by accelerate on its behalf)."""
    frame = sys._getframe(2)
    if ours and not frame.f_code.co_filename.startswith(PACKAGE):
        return False
    names, files = set(), []
    while frame is not None:
        names.add(frame.f_code.co_name)
        files.append(frame.f_code.co_filename)
        frame = frame.f_back
    return "train_stage" in names and not names & NOT_STEPS and not any("torch/utils/data" in f for f in files)


def shape_from_values(func: Any, args: tuple) -> bool:
    """Whether an ATen op's output shape depends on a tensor's values: on a GPU the host waits
    for the device to know it (`x[mask]`, `nonzero`, `masked_select`, `unique`...), a read as
    real as `.item()` that the method patches cannot see."""
    name = func.__name__.split(".")[0]
    if name in DATA_SHAPED:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


class ValueShapedOps(TorchDispatchMode):
    """Counts, in `counts`, the ops of training steps whose output shape depends on values
    (`shape_from_values`), forward and backward."""

    def __init__(self, counts: dict[str, int]):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if shape_from_values(func, args) and in_a_step(ours=False):
            name = func.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_reads_and_collectives(patch) -> dict[str, dict[str, int]]:
    """Patch the tensor reads and the collectives to count those made by training steps; the
    ops whose shape depends on values go into counts["shaped"] while `ValueShapedOps` is on."""
    counts: dict[str, dict[str, int]] = {"reads": {}, "collectives": {}, "shaped": {}}

    def counting(kind, name, method):
        def wrapper(*args, **kwargs):
            if in_a_step(ours=kind == "reads"):
                counts[kind][name] = counts[kind].get(name, 0) + 1
            return method(*args, **kwargs)

        return wrapper

    for name in READS:
        patch.setattr(torch.Tensor, name, counting("reads", name, getattr(torch.Tensor, name)))
    import torch.distributed as dist

    for name in COLLECTIVES:
        if hasattr(dist, name):
            patch.setattr(dist, name, counting("collectives", name, getattr(dist, name)))
    return counts


def steps_and_logs(run: Path) -> tuple[int, int]:
    steps = json.loads((run / "student" / "metrics.json").read_text())["info"]["steps"]
    logs = sum(1 for line in (run / "student" / "log.jsonl").read_text().splitlines() if "train/loss" in line)
    return steps, logs


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("speed")
    write_data(root)
    path = recipe(root, tiny_bert_dir)
    assert main(["teacher", str(path), f"output_dir={root / 'run'}"]) == 0
    return root, path, tiny_bert_dir


@pytest.mark.parametrize("path_name", list(PATHS))
def test_one_host_read_per_optimizer_step(setup, tmp_path, monkeypatch, path_name):
    """Teacher online (hidden states and logits), logits from the cache, logits and hidden states
    from the cache: one read per optimizer step, logging steps included, nothing per
    micro-batch, per loss term or per cached row."""
    root, path, teacher = setup
    path = recipe(root, teacher, PATHS[path_name], where=tmp_path)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        counts = count_reads_and_collectives(patch)
        with ValueShapedOps(counts["shaped"]):
            assert main(["student", str(path), f"output_dir={run}", f"teacher.dir={root / 'run' / 'teacher'}"]) == 0
    steps, logs = steps_and_logs(run)
    assert steps == 8 and logs == 2  # 64 rows / (4 per batch x 2 micro-batches); a record every 4 steps
    print(f"{path_name}: host reads in training steps {counts['reads']} over {steps} optimizer steps "
          f"(16 micro-batches, {logs} log records)")
    assert sum(counts["reads"].values()) == steps, counts["reads"]
    assert counts["shaped"] == {}, counts["shaped"]  # no op whose shape waits for the device's values
    if path_name != "online":
        cache = run / "teacher_cache"
        assert cache.exists() and any(cache.iterdir())  # the path really read a cache


@pytest.mark.slow
def test_two_processes_read_once_and_exchange_once_per_optimizer_step(setup, tmp_path):
    """The same under two processes (torchrun, gloo): per process, one host read and one
    collective per optimizer step, on each path."""
    root, _, teacher = setup
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "loop_two_process.py"), str(root), str(teacher), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, r in report.items():
            print(f"process {rank}, {name}: {r}")
            assert r["steps"] == 4  # 64 rows / (2 processes x 4 per batch x 2 micro-batches)
            assert sum(r["reads"].values()) == r["steps"], (name, r)
            assert sum(r["collectives"].values()) == r["steps"], (name, r)
            assert r["shaped"] == {}, (name, r)


def test_loader_workers_give_the_same_training(setup, tmp_path):
    root, path, _ = setup
    shared = [f"teacher.dir={root / 'run' / 'teacher'}"]
    assert main(["student", str(path), f"output_dir={tmp_path / 'a'}", *shared]) == 0
    assert main(["student", str(path), f"output_dir={tmp_path / 'b'}", "train.num_workers=2", *shared]) == 0
    a = json.loads((tmp_path / "a" / "student" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "student" / "metrics.json").read_text())
    assert a["validation"] == pytest.approx(b["validation"], abs=1e-6)
    assert a["test"] == pytest.approx(b["test"], abs=1e-6)


@pytest.mark.slow
def test_compiled_student_trains_like_the_eager_one(setup, tmp_path):
    root, path, _ = setup
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
