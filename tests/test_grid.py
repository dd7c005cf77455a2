"""`distill grid`: expansion, skip-complete, launch scripts, and a tiny grid run end to end."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transformers import AlbertConfig, BertConfig

from distill.study import grid
from distill.config import load_config, to_yaml
from tests.conftest import save_tiny, train_bpe_tokenizer

WORDS = {
    "pos": ["excelente", "bueno", "genial", "maravilloso", "feliz", "recomiendo"],
    "neg": ["terrible", "malo", "horrible", "pésimo", "triste", "decepcionante"],
}


def write_rows(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            text = f"el producto es {rng.choice(WORDS[label])} y {rng.choice(WORDS[label])}"
            f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def write_recipe(folder: Path, teacher: Path, name: str = "polarity", extra: str = "") -> Path:
    """A classification recipe on ~40 rows made here; small steps so every stage takes seconds."""
    for split, n, seed in (("train", 40, 0), ("validation", 12, 1), ("test", 12, 2)):
        write_rows(folder / f"{split}.jsonl", n, seed)
    recipe = folder / f"{name}.yaml"
    recipe.write_text(f"""\
task: {{family: classification, name: {name}}}
data:
  files: {{train: {folder}/train.jsonl, validation: {folder}/validation.jsonl, test: {folder}/test.jsonl}}
  max_length: 16
teacher: {{model: {teacher}, epochs: 1}}
student: {{num_layers: 1}}
distill: {{teacher_outputs: online}}
train: {{lr: 1e-3, batch_size: 8, epochs: 1, max_steps: 2, warmup_ratio: 0.0, select_metric: loss}}
tracking: {{report_to: []}}
output_dir: unused/${{student.model}}
{extra}""")
    return recipe


# --- parsing and expansion -----------------------------------------------------------------------
def test_parse_items(tmp_path: Path):
    recipe = write_recipe(tmp_path, tmp_path / "teacher")
    spec = grid.parse_items([str(recipe), "students=albeto-tiny,albeto-base-6", "grid.lr=[5e-5,1e-4]",
                             "grid.distill.temperature=2", "train.max_steps=3"])
    assert spec.recipes == [str(recipe)]
    assert spec.students == ["albeto-tiny", "albeto-base-6"]
    assert spec.sweep == {"train.lr": [5e-5, 1e-4], "distill.temperature": [2]}
    assert spec.overrides == ["train.max_steps=3"]
    assert grid.parse_items([str(recipe), "students=[a,student.num_layers=2]"]).students == ["a", "student.num_layers=2"]
    with pytest.raises(grid.GridError, match="recipe not found"):
        grid.parse_items(["nope.yaml"])
    with pytest.raises(grid.GridError, match="no recipe"):
        grid.parse_items(["train.lr=1"])


def test_setting_names_and_values():
    assert grid.setting_name({"train.lr": 5e-5, "train.batch_size": 16}) == "lr5e-5-bs16"
    assert grid.setting_name({"train.lr": 1e-4, "distill.temperature": 2.0}) == "lr1e-4-T2"
    assert grid.setting_name({"train.lr": 2.5e-5}) == "lr2.5e-5"
    assert grid.setting_name({}) == "default"
    # values written back as overrides are read as the same values
    for value in (5e-5, 1e-4, 0.1, 16, True, None, "kl", [0, 11]):
        assert grid._parse_value(grid.override_value(value), "test") == value


def test_expand_tasks_students_settings(tmp_path: Path):
    recipe = write_recipe(tmp_path, tmp_path / "bert")
    spec = grid.parse_items([str(recipe), f"students=[{tmp_path / 'tiny-albert'},student.num_layers=1]",
                             "grid.lr=[1e-3,5e-4]", "grid.batch_size=[8,16]", "run.baseline=true"])
    root = tmp_path / "runs"
    plan = grid.expand(spec, root)
    assert [r.label for r in plan] == ["polarity/teacher"] + [
        f"polarity/{s}/lr{lr}-bs{bs}" for s in ("tiny-albert", "layers-1") for lr in ("1e-3", "5e-4") for bs in (8, 16)
    ]
    teacher, first = plan[0], plan[1]
    assert teacher.stages == ["teacher"] and teacher.folder == root / "polarity" / "teacher"
    assert first.stages == ["student", "baseline"]
    # every student reads the one teacher and shares one teacher-output cache
    assert {r.cfg.teacher.dir for r in plan} == {str(root / "polarity" / "teacher")}
    assert {r.cfg.distill.cache_dir for r in plan[1:]} == {str(root / "polarity" / "teacher_cache")}
    assert first.cfg.student.model == str(tmp_path / "tiny-albert") and first.cfg.student.num_layers is None
    assert plan[-1].cfg.student.model is None and plan[-1].cfg.student.num_layers == 1
    assert (plan[-1].cfg.train.lr, plan[-1].cfg.train.batch_size) == (5e-4, 16)
    assert first.cfg.output_dir == str(root / "polarity" / "tiny-albert" / "lr1e-3-bs8")
    # the fast config path gives exactly what load_config gives
    for run in plan:
        assert run.cfg == load_config(run.recipe, run.overrides)
    assert first.commands("distill")[0].startswith(f"distill student {recipe} ")


def test_expand_refuses_clashes(tmp_path: Path):
    recipe = write_recipe(tmp_path, tmp_path / "bert")
    (tmp_path / "copy").mkdir()
    twin = write_recipe(tmp_path / "copy", tmp_path / "bert")
    with pytest.raises(grid.GridError, match="both have task.name=polarity"):
        grid.expand(grid.parse_items([str(recipe), str(twin)]), tmp_path / "runs")
    with pytest.raises(grid.GridError, match="share the folder"):
        grid.expand(grid.parse_items([str(recipe), "students=/a/m,/b/m"]), tmp_path / "runs")
    with pytest.raises(grid.GridError, match="unknown key 'train.lrr'. Did you mean 'train.lr'"):
        grid.expand(grid.parse_items([str(recipe), "grid.lrr=[1,2]"]), tmp_path / "runs")


def finish(run: grid.GridRun, stage: str, cfg=None) -> None:
    """Make a stage folder look finished, as the training loop leaves it."""
    from distill.loop.plan import plan_stage

    plan = plan_stage(cfg or run.cfg, stage)
    out = plan.folder
    (out / "model").mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(plan.recipe))
    (out / "metrics.json").write_text("{}")


def test_status_skip_complete_and_conflicts(tmp_path: Path):
    recipe = write_recipe(tmp_path, tmp_path / "bert")
    spec = grid.parse_items([str(recipe), "grid.lr=[1e-3,5e-4]", "run.baseline=true"])
    teacher, a, b = grid.expand(spec, tmp_path / "runs")
    assert [r.status() for r in (teacher, a, b)] == ["fresh"] * 3
    finish(teacher, "teacher")
    finish(a, "student")
    finish(a, "baseline")
    finish(b, "student")
    assert [r.status() for r in (teacher, a, b)] == ["complete", "complete", "resume"]
    assert b.stage_states() == {"student": "complete", "baseline": "fresh"}
    # a different teacher setting in the shared teacher folder is a conflict, never reused
    (other,) = [r for r in grid.expand(grid.parse_items([str(recipe), "seed=1"]), tmp_path / "runs")
                if r.kind == "teacher"]
    assert other.status() == "conflict"
    failures = grid.run_plan([other])
    assert len(failures) == 1 and "different config" in failures[0][1]
    described = grid.describe([teacher, a, b])
    assert "3 runs: 2 complete, 1 resume" in described


# --- launch scripts -------------------------------------------------------------------------------
def test_commands_script(tmp_path: Path):
    recipe = write_recipe(tmp_path, tmp_path / "bert")
    spec = grid.parse_items([str(recipe), "grid.lr=[1e-3,5e-4]", "run.baseline=true"])
    root = tmp_path / "runs"
    plan = grid.expand(spec, root)
    finish(plan[1], "student")
    finish(plan[1], "baseline")
    text = grid.commands_script(plan, spec, root, "accelerate launch -m distill", compare=True)
    assert "2 of 3 runs to do" in text and "lr1e-3" not in text  # the complete run is left out
    teacher_line = next(line for line in text.splitlines() if line.startswith("accelerate") and " teacher " in line)
    assert teacher_line.startswith(f"accelerate launch -m distill teacher {recipe} ")
    assert text.index("# polarity/teacher") < text.index("# polarity/layers-1/lr5e-4")
    assert "--select --compare-published" in text
    path = tmp_path / "commands.sh"
    path.write_text(text)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_slurm_scripts(tmp_path: Path):
    recipe = write_recipe(tmp_path, tmp_path / "bert")
    spec = grid.parse_items([str(recipe), "grid.lr=[1e-3,5e-4,1e-4]"])
    root = tmp_path / "runs"
    plan = grid.expand(spec, root)
    finish(plan[1], "student")
    files = grid.slurm_scripts(plan, spec, root, "accelerate launch -m distill", ["partition=gpu", "gres=gpu:1"],
                               compare=False)
    assert set(files) == {"polarity.teacher.sbatch", "polarity.students.sbatch", "select.sbatch", "submit.sh"}
    students = files["polarity.students.sbatch"]
    assert "#SBATCH --array=0-1" in students  # two runs left of three
    assert "#SBATCH --requeue" in students and "#SBATCH --gres=gpu:1" in students
    assert '-eq 75 ]' in students and 'REQUEUE_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in students
    assert "gres" not in files["select.sbatch"] and "--partition=gpu" in files["select.sbatch"]
    submit = files["submit.sh"]
    assert "--dependency=afterok:$t_polarity" in submit and "--dependency=afterany:" in submit
    logs = (root / "slurm" / "logs").resolve()
    assert f"mkdir -p {logs}" in submit and f"#SBATCH --output={logs}/%x-%A_%a.out" in students
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        subprocess.run(["bash", "-n", str(tmp_path / name)], check=True)


CHILD = """
import signal, sys, time
def stop(*_):
    time.sleep(0.5)  # 'saving a checkpoint'
    open('checkpoint', 'w').close()
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
open('ready', 'w').close()
time.sleep(30)
"""


@pytest.mark.parametrize("launcher", ["direct", "wrapped"])
def test_slurm_step_requeues_after_a_checkpoint(tmp_path: Path, launcher: str):
    """SIGTERM to the job script reaches the training process, which checkpoints; the job is
    requeued even when a launcher in between turns exit status 75 into another."""
    (tmp_path / "child.py").write_text(CHILD)
    cmd = f"{sys.executable} child.py"
    if launcher == "wrapped":  # like a launcher that does not pass the child's exit status on
        cmd = f"sh -c '{sys.executable} child.py; exit 1'"
    script = tmp_path / "job.sh"
    script.write_text("\n".join([
        "#!/bin/bash", "set -uo pipefail", 'REQUEUE_ID="7_3"',
        'scontrol() { echo "$*" > requeued; }', grid.SLURM_RUN_STEP,
        f"run_step {cmd}", "echo finished > finished", ""]))
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path)
    deadline = time.time() + 20
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert (tmp_path / "checkpoint").exists()
    assert (tmp_path / "requeued").read_text().strip() == "requeue 7_3"
    assert not (tmp_path / "finished").exists()


def test_slurm_step_passes_failures_through(tmp_path: Path):
    script = tmp_path / "job.sh"
    script.write_text("\n".join([
        "#!/bin/bash", 'REQUEUE_ID="1"', 'scontrol() { echo "$*" > requeued; }', grid.SLURM_RUN_STEP,
        "run_step sh -c 'exit 3' || echo \"status $?\" > failed", ""]))
    subprocess.run(["bash", str(script)], cwd=tmp_path, check=True)
    assert (tmp_path / "failed").read_text().strip() == "status 3"
    assert not (tmp_path / "requeued").exists()


# --- a tiny grid, end to end -------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_vocab_models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT teacher and a tiny ALBERT student (one shared layer applied twice), built like
    the conftest fixtures but with a 400-token tokenizer: hashing a 30k vocabulary for the
    datasets cache and its embedding gradients would be most of each stage's time here."""
    root = tmp_path_factory.mktemp("small-vocab")
    vocab = len(train_bpe_tokenizer(root / "tokenizer"))
    bert = save_tiny(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=512),
                     root / "tiny-bert", root / "tokenizer")
    albert = save_tiny(AlbertConfig(vocab_size=vocab, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                    num_hidden_groups=1, num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=512),
                       root / "tiny-albert", root / "tokenizer")
    return bert, albert


@pytest.mark.slow
def test_tiny_grid_runs_resumes_and_reports(tmp_path: Path, small_vocab_models: tuple[Path, Path], capsys):
    tiny_bert_dir, tiny_albert_dir = small_vocab_models
    recipe = write_recipe(tmp_path, tiny_bert_dir)
    root = tmp_path / "runs"
    items = [str(recipe), f"students=[{tiny_albert_dir},student.num_layers=1]", "grid.lr=[1e-3,5e-4]",
             "--root", str(root)]
    assert grid.main([*items, "--dry-run"]) == 0
    assert "5 runs: 5 fresh" in capsys.readouterr().out
    assert not root.exists()  # a dry run writes nothing

    assert grid.main(items) == 0
    out = capsys.readouterr().out
    best = json.loads((root / "best.json").read_text())["runs"]
    assert {(e["block"], e["model"]) for e in best} == {
        ("finetuned", str(tiny_bert_dir)), ("distilled", str(tiny_albert_dir)), ("distilled", "layers-1")}
    for entry in best:  # each student's choice is its setting with the lowest validation loss
        if entry["block"] == "distilled":
            folder = root / Path(entry["stage_dir"]).parent.parent
            losses = [json.loads(p.read_text())["validation"]["loss"] for p in folder.glob("*/student/metrics.json")]
            assert len(losses) == 2 and entry["validation_value"] == min(losses)
    tables = (root / "report" / "tables.md").read_text()
    assert "| **Fine-tuning** |" in tables and "| **Task-specific Knowledge Distillation** |" in tables
    assert f"| {tiny_albert_dir.name} |" in tables and "| layers-1 |" in tables
    assert "## Summary" in out and (root / "report" / "summary.csv").exists()
    teacher_metrics = json.loads((root / "polarity" / "teacher" / "metrics.json").read_text())
    assert teacher_metrics["info"]["steps"] == 2
    student = json.loads((root / "polarity" / "layers-1" / "lr5e-4" / "student" / "metrics.json").read_text())
    assert student["info"]["teacher"] == str(root / "polarity" / "teacher" / "model")

    # skip-complete: a second run trains nothing; losing one run's metrics re-runs only that one
    stamps = {p: p.stat().st_mtime for p in root.glob("polarity/**/metrics.json")}
    redo = root / "polarity" / "layers-1" / "lr1e-3" / "student" / "metrics.json"
    redo.unlink()
    assert grid.main([*items, "--dry-run"]) == 0
    assert "5 runs: 4 complete, 1 resume" in capsys.readouterr().out
    assert grid.main(items) == 0
    out = capsys.readouterr().out
    assert out.count("complete, skipping") == 4
    assert redo.exists()
    assert all(p.stat().st_mtime == t for p, t in stamps.items() if p != redo)
