"""The stage plan: every stage name resolves through one `plan_stage`, and what used to be
answered in three places (which teacher, seed, folder, windows, identity) is answered once.
Each test here failed before the plan existed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

from distill import models
from distill.cli import main
from distill.config import StudentConfig, TeacherConfig, load_config, to_yaml
from distill.errors import ConfigError, StageError
from distill.loop.folders import check_stage_dir
from distill.loop.plan import plan_stage
from distill.loop.setup import check_models
from distill.loop.train import run_stage
from distill.tasks import get_task
from tests.conftest import minilm_path, save_tiny, tiny_bert_config, train_bpe_tokenizer, write_keyword_data

WORDS = {"neg": ["malo", "horrible"], "pos": ["bueno", "genial"]}


def recipe(root: Path, body: str) -> Path:
    write_keyword_data(root, WORDS, {"train": 24, "validation": 8, "test": 8})
    path = root / "recipe.yaml"
    path.write_text(
        f"""task: {{family: classification, name: tiny}}
data: {{files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}, max_length: 24}}
train: {{lr: 1e-3, batch_size: 8, epochs: 1, logging_steps: 1}}
tracking: {{report_to: []}}
output_dir: {root}/run
seed: 5
{body}
"""
    )
    return path


def test_every_stage_name_runs_through_run_stage(tmp_path, tiny_bert_dir):
    """`run_stage(cfg, "teacher-0")` (what the search and the grid call) fine-tunes teachers[0]
    with its own seed into its own folder; before, only `distill run` resolved the name."""
    path = recipe(tmp_path, f"teachers: [{{model: {tiny_bert_dir}, seed: 11}}, {{model: {tiny_bert_dir}, seed: 12}}]\n"
                            "student: {num_layers: 1}")
    cfg = load_config(path)
    metrics = run_stage(cfg, "teacher-0")
    saved = load_config(tmp_path / "run" / "teacher-0" / "config.yaml")
    assert metrics["info"]["stage"] == "teacher" and saved.seed == 11 and saved.teacher.model == str(tiny_bert_dir)
    assert check_stage_dir(plan_stage(cfg, "teacher-0")) == "complete"
    with pytest.raises(StageError, match="unknown stage 'techer'"):
        run_stage(cfg, "techer")
    with pytest.raises(StageError, match="name one of the stages teacher-0, teacher-1"):
        plan_stage(cfg, "teacher")
    with pytest.raises(ConfigError, match=r"stage 'teacher-2': the recipe lists 2 teachers"):
        plan_stage(cfg, "teacher-2")


def test_the_grid_fine_tunes_the_teacher_with_its_own_seed(tmp_path, tiny_bert_dir, capsys):
    """The grid's teacher run is the same run `distill run` makes: seed = teacher.seed, so the
    folder is complete for `distill run` (before: the recipe's seed, "a different config")."""
    from distill.study import grid

    path = recipe(tmp_path, f"teacher: {{model: {tiny_bert_dir}, seed: 3}}\nstudent: {{num_layers: 1}}")
    spec = grid.parse_items([str(path)])
    plan = grid.expand(spec, tmp_path / "runs")
    teacher = next(r for r in plan if r.kind == "teacher")
    assert grid.run_plan([teacher]) == []
    saved = load_config(teacher.folder / "config.yaml")
    assert saved.seed == 3
    assert check_stage_dir(plan_stage(teacher.cfg, "teacher")) == "complete"


def test_a_one_entry_teacher_list_gives_qa_its_own_windows(tmp_path):
    """QA across tokenizers reads the windows of the teacher it distils from: teachers[0]'s
    max_length / doc_stride (before: only `teacher.max_length`, so a `teachers:` list silently
    got data.max_length)."""
    bpe = train_bpe_tokenizer(tmp_path / "bpe")
    student_dir = save_tiny(tiny_bert_config(), tmp_path / "student", minilm_path(), AutoModelForQuestionAnswering)
    teacher_dir = tmp_path / "teacher"
    config = tiny_bert_config()
    config.vocab_size = len(bpe)
    AutoModelForQuestionAnswering.from_config(config).save_pretrained(teacher_dir)
    bpe.save_pretrained(teacher_dir)
    data = Path(__file__).parent.parent / "distill" / "sample_data" / "qa_es"
    cfg = load_config(None, [
        "task.family=qa", f"data.files.train={data / 'train.json'}", f"data.files.validation={data / 'validation.json'}",
        "data.max_length=64", "data.doc_stride=16", f"student.model={student_dir}", f"output_dir={tmp_path / 'run'}",
        f"teachers=[{{model: {teacher_dir}, finetuned: true, max_length: 96, doc_stride: 24}}]",
    ])
    plan = plan_stage(cfg, "student")
    assert plan.teachers[0].windows == (96, 24)
    task = get_task(plan.task, plan.data)
    from distill.data.features import load_data

    load_data(plan.data, plan.seed, task)
    check_models(plan, task, models.load_config(str(student_dir)), AutoTokenizer.from_pretrained(student_dir),
                 [models.load_config(str(teacher_dir))], [AutoTokenizer.from_pretrained(teacher_dir)])
    assert (task.teacher_max_length, task.teacher_doc_stride) == (96, 24)
    # and a window longer than that teacher's position table names that teacher's key
    short = load_config(None, [*[f"{k}={v}" for k, v in (("task.family", "qa"),)], f"student.model={student_dir}",
                               f"teachers=[{{model: {teacher_dir}, finetuned: true, max_length: 900}}]"])
    with pytest.raises(StageError, match=r"teachers\[0\].max_length=900 is longer"):
        check_models(plan_stage(short, "student"), get_task(short.task, short.data), models.load_config(str(student_dir)),
                     AutoTokenizer.from_pretrained(student_dir), [models.load_config(str(teacher_dir))],
                     [AutoTokenizer.from_pretrained(teacher_dir)])


def test_a_finished_student_stays_finished_when_its_teacher_folder_moves(tmp_path, tiny_bert_dir):
    """The student's identity is its teacher's settings, not the folder it lies in: after moving
    a finished teacher and updating teacher.dir, the finished student is still complete (before:
    refused as "a different config", and the only way out deleted it)."""
    path = recipe(tmp_path, f"teacher: {{model: {tiny_bert_dir}, dir: {tmp_path}/teachers/a}}\nstudent: {{num_layers: 1}}")
    cfg = load_config(path)
    student = tmp_path / "run" / "student"
    (student / "model").mkdir(parents=True)
    (student / "metrics.json").write_text("{}")
    (student / "config.yaml").write_text(to_yaml(cfg))
    moved = load_config(path, [f"teacher.dir={tmp_path}/teachers/b"])
    assert check_stage_dir(plan_stage(moved, "student")) == "complete"
    changed = load_config(path, [f"teacher.dir={tmp_path}/teachers/b", "teacher.lr=0.5"])
    with pytest.raises(StageError, match=r"different config \(differs in: teacher.lr\)"):
        check_stage_dir(plan_stage(changed, "student"))


def test_a_student_cut_from_a_finetuned_checkpoint_keeps_its_rows_in_the_data_label_order(tmp_path):
    """A checkpoint fine-tuned with labels [pos, neg] cut into a student for data whose labels
    are [neg, pos]: the head's rows follow the data's order (before: the checkpoint's rows were
    kept under the data's names, so every prediction started swapped)."""
    config = tiny_bert_config(num_labels=2, id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1})
    ckpt = save_tiny(config, tmp_path / "finetuned", minilm_path())
    original = AutoModelForSequenceClassification.from_pretrained(ckpt).classifier
    labels = ["neg", "pos"]
    kwargs = {"num_labels": 2, "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    student, _ = models.build_trained_model(
        "student", TeacherConfig(model=str(ckpt), finetuned=True), StudentConfig(num_layers=1),
        AutoModelForSequenceClassification, kwargs,
    )
    assert torch.equal(student.classifier.weight[0], original.weight[1])  # "neg"
    assert torch.equal(student.classifier.weight[1], original.weight[0])  # "pos"
    assert torch.equal(student.classifier.bias, original.bias.flip(0))
    assert student.config.id2label == {0: "neg", 1: "pos"}


def test_distill_run_goes_through_the_plan_for_each_stage(tmp_path, tiny_bert_dir):
    """`distill run` with a teacher seed: each stage's folder records the plan's seed and the
    student's metrics name the fine-tuned teacher the plan pointed at."""
    path = recipe(tmp_path, f"teacher: {{model: {tiny_bert_dir}, seed: 9}}\nstudent: {{num_layers: 1}}\nrun: {{baseline: true}}")
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    assert load_config(run / "teacher" / "config.yaml").seed == 9
    assert load_config(run / "student" / "config.yaml").seed == 5
    info = json.loads((run / "student" / "metrics.json").read_text())["info"]
    assert info["teacher"] == str(run / "teacher" / "model") and info["stage"] == "student"
    assert json.loads((run / "baseline" / "metrics.json").read_text())["info"]["teacher"] is None
