"""`distill report`: a hand-made tree of runs -> the study's Summary and All results tables."""

from __future__ import annotations

import csv
import functools
import json
import os
import time
from pathlib import Path

import pytest

from distill.study import published, report
from distill.bench.shapes import shape_config
from distill.config import load_config, to_yaml

TEACHER = "dccuchile/albert-xxlarge-spanish"
FAMILY_OVERRIDES = {
    "classification": [],
    "tagging": ["data.max_length=256"],
    "qa": ["data.max_length=256"],
}


@functools.lru_cache(maxsize=None)
def config_yaml(task: str, family: str, student: str) -> str:
    overrides = [f"task.name={task}", f"task.family={family}", f"teacher.model={TEACHER}",
                 f"student.model={student}", *FAMILY_OVERRIDES[family]]
    return to_yaml(load_config(None, overrides))


def make_stage(root: Path, rel: str, *, task: str, family: str, stage: str, student: str = "albeto-tiny",
               val: dict, test: dict, select: str = "loss", params: int = 5_000_000,
               shape: str | None = None, teacher_path: str | None = "x/teacher/model") -> Path:
    """A finished stage folder as `distill run` leaves it: config.yaml, metrics.json, model/."""
    out = root / rel / stage
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(config_yaml(task, family, student))
    distilled = stage == "student"
    info = {"stage": stage, "task": task, "family": family, "metric": "accuracy" if family == "classification" else "f1",
            "select_metric": select, "best_step": 10, "steps": 20, "parameters": params,
            "teacher": teacher_path if distilled else None,
            "loss_weights": {"kd": 1.0} if distilled else {"ce": 1.0}}
    (out / "metrics.json").write_text(json.dumps({"validation": val, "test": test, "info": info}))
    (out / "model").mkdir()
    if shape:
        shape_config(shape).save_pretrained(out / "model")
    return out


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """Three tasks (classification, tagging, QA): a teacher each, ALBETO tiny distilled with a
    2-setting grid on PAWS-X, its baseline, and an ALBETO base-6 student on two tasks."""
    root = tmp_path / "runs"
    s = make_stage
    for task, family, test in (("pawsx", "classification", {"accuracy": 0.9100}),
                               ("ner", "tagging", {"f1": 0.8306, "accuracy": 0.97}),
                               ("sqac", "qa", {"f1": 0.8149, "exact_match": 0.6267})):
        s(root, task, task=task, family=family, stage="teacher", student="albeto-tiny",
          val={"loss": 0.3}, test=test, params=222_740_000, shape="albeto-xxlarge")
    # PAWS-X, ALBETO tiny distilled: lr1e-4 has the lower validation loss but the worse test score
    s(root, "pawsx/albert-tiny-spanish/lr5e-5", task="pawsx", family="classification", stage="student",
      val={"loss": 0.40, "accuracy": 0.85}, test={"accuracy": 0.8010}, shape="albeto-tiny")
    s(root, "pawsx/albert-tiny-spanish/lr1e-4", task="pawsx", family="classification", stage="student",
      val={"loss": 0.35, "accuracy": 0.84}, test={"accuracy": 0.8505}, shape="albeto-tiny")
    s(root, "pawsx/albert-tiny-spanish/lr1e-4", task="pawsx", family="classification", stage="baseline",
      val={"loss": 0.50, "accuracy": 0.80}, test={"accuracy": 0.7985}, shape="albeto-tiny")
    s(root, "ner/albert-tiny-spanish/lr5e-5", task="ner", family="tagging", stage="student",
      val={"loss": 0.2, "f1": 0.7}, test={"f1": 0.7252, "accuracy": 0.95}, shape="albeto-tiny")
    s(root, "sqac/albert-tiny-spanish/lr5e-5", task="sqac", family="qa", stage="student",
      val={"loss": 1.0, "f1": 0.6}, test={"f1": 0.6303, "exact_match": 0.4335}, shape="albeto-tiny")
    # ALBETO base-6 on two tasks only, selected by validation accuracy (higher is better)
    s(root, "pawsx/albert-base-6-spanish/a", task="pawsx", family="classification", stage="student",
      student="albeto-base-6", select="accuracy", val={"loss": 0.3, "accuracy": 0.88},
      test={"accuracy": 0.8845}, params=11_813_891, shape="albeto-base-6")
    s(root, "pawsx/albert-base-6-spanish/b", task="pawsx", family="classification", stage="student",
      student="albeto-base-6", select="accuracy", val={"loss": 0.2, "accuracy": 0.87},
      test={"accuracy": 0.9000}, params=11_813_891, shape="albeto-base-6")
    s(root, "ner/albert-base-6-spanish/a", task="ner", family="tagging", stage="student",
      student="albeto-base-6", select="accuracy", val={"accuracy": 0.9}, test={"f1": 0.7841},
      params=11_813_891, shape="albeto-base-6")
    return root


def row(tables: report.Tables, block: str, model: str) -> report.Row:
    found = [r for r in tables.rows if r.block == block and r.model == model]
    assert len(found) == 1, [(r.block, r.model) for r in tables.rows]
    return found[0]


def test_published_scores_reproduce_the_study_average():
    """Every published Score is the study's average of its 8 printed task scores (QA by F1)."""
    checked = 0
    for block in published.BLOCKS:
        for model in published.MODELS[block].values():
            scores = [model.task_score(t) for t in published.TASK_KEYS]
            assert report.study_score(scores) == model.score, model.title
            checked += 1
    assert checked == 17


def test_study_score_cuts_rather_than_rounds():
    assert report.study_score([85.05, 72.52]) == 78.78  # mean 78.785
    assert report.study_score([0.8505 * 100, 0.7251 * 100]) == 78.78  # float noise of fractions
    assert report.study_score([70.0]) == 70.0
    with pytest.raises(ValueError):
        report.study_score([])


def test_task_and_model_lookup():
    assert published.task_info("PAWS-X").key == "pawsx"
    assert published.task_info("qa-tar").key == "tar"
    assert published.task_info("demo") is None
    assert published.find_model("distilled", "albeto-base-6").title == "ALBETO base-6"
    assert published.find_model("finetuned", TEACHER).key == "albeto-xxlarge"
    assert published.find_model("finetuned", "/models/albert-tiny-spanish/").key == "albeto-tiny"
    assert published.find_model("distilled", "albeto-xxlarge") is None


def test_collect_classifies_blocks_and_models(tree: Path):
    runs = report.collect_runs(tree)
    assert len(runs) == 11
    by_stage = {(r.path.relative_to(tree).as_posix()): (r.block, r.model) for r in runs}
    assert by_stage["pawsx/teacher"] == ("finetuned", TEACHER)
    assert by_stage["pawsx/albert-tiny-spanish/lr1e-4/student"] == ("distilled", "albeto-tiny")
    assert by_stage["pawsx/albert-tiny-spanish/lr1e-4/baseline"] == ("finetuned", "albeto-tiny")


def test_selection_uses_the_validation_select_metric(tree: Path):
    best = report.select_best(report.collect_runs(tree))
    assert len(best) == 3 + 3 + 1 + 2  # teachers, tiny distilled, tiny baseline, base-6
    tiny = best[("distilled", "pawsx", "albeto-tiny")]
    assert tiny.path.parent.name == "lr1e-4"  # lowest validation loss, not best test score
    base6 = best[("distilled", "pawsx", "albeto-base-6")]
    assert base6.path.parent.name == "a"  # highest validation accuracy


def test_tables_as_the_study_prints_them(tree: Path):
    tables, paths = report.report(tree, compare=True)
    assert [c.task for c in tables.columns] == ["pawsx", "ner", "sqac"]  # the study's order
    assert [(r.block, r.model) for r in tables.rows] == [
        ("finetuned", "albeto-tiny"), ("finetuned", TEACHER),
        ("distilled", "albeto-tiny"), ("distilled", "albeto-base-6"),
    ]
    summary = report.summary_values(row(tables, "distilled", "albeto-tiny"), tables)
    assert summary["score"] == 73.53  # (85.05 + 72.52 + 63.03) / 3 = 73.5333
    assert summary["tasks"] == 3 and summary["parameters"] == 5_000_000
    assert summary["speedup"] == 18.0  # BETO's MACs over ALBETO tiny's at batch 1, seq 512
    assert summary["published_score_same_tasks"] == report.study_score([85.05, 72.51, 63.03])
    assert summary["published_score"] == 76.49 and summary["published_speedup"] == 18.05
    base6 = report.summary_values(row(tables, "distilled", "albeto-base-6"), tables)
    assert base6["score"] == 83.43 and base6["tasks"] == 2  # (88.45 + 78.41) / 2
    assert base6["speedup"] == 2.0

    md = paths["markdown"].read_text()
    assert "| **Fine-tuning** |" in md and "| **Task-specific Knowledge Distillation** |" in md
    assert md.index("**Fine-tuning**") < md.index("ALBETO xxlarge") < md.index("**Task-specific")
    assert "| Model | PAWS-X (accuracy) | NER (F1) | SQAC (F1 / EM) |" in md
    assert "| ALBETO tiny | 85.05 | 72.52 | 63.03 / 43.35 |" in md
    assert "| ↳ published | 85.05 | 72.51 | 63.03 / 43.35 |" in md
    assert "| ALBETO base-6 | 88.45 | 78.41 | – |" in md
    assert "| ALBETO base-6 | 12M | 2.00x | 83.43 (2 of 3 tasks) | 1.99x | 83.43 | 82.70 |" in md
    assert "| ALBETO tiny | 79.85 | – | – |" in md  # the baseline, PAWS-X only
    assert "| ↳ published | 80.20 | 75.42 | 59.28 / 39.16 |" in md  # fine-tuned ALBETO tiny

    with open(paths["summary"]) as f:
        summary_rows = list(csv.DictReader(f))
    assert [r["score"] for r in summary_rows] == ["79.85", "85.18", "73.53", "83.43"]
    with open(paths["results"]) as f:
        results = {(r["block"], r["model"]): r for r in csv.DictReader(f)}
    sqac = results[("distilled", "albeto-tiny")]
    assert (sqac["sqac"], sqac["sqac_em"], sqac["sqac_em_published"]) == ("63.03", "43.35", "43.35")


def test_report_reads_best_json_until_a_newer_run_finishes(tree: Path):
    runs = report.collect_runs(tree)
    best = report.select_best(runs)
    # hand-pick the worse PAWS-X run, as someone overriding the selection would
    worse = next(r for r in runs if r.path.parent.name == "lr5e-5" and r.task == "pawsx")
    best[("distilled", "pawsx", "albeto-tiny")] = worse
    report.write_selection(tree, best)
    link = tree / "best" / "distilled" / "pawsx" / "albeto-tiny"
    assert link.is_symlink() and (link / "metrics.json").exists()
    assert len(report.collect_runs(tree)) == len(runs)  # the best/ links are not counted again

    tables, _ = report.report(tree)
    assert row(tables, "distilled", "albeto-tiny").cell(tables.columns[0], "test") == (pytest.approx(80.10),)
    # a run that finished after best.json was written makes the report select again
    later = time.time() + 5
    os.utime(tree / "ner" / "teacher" / "metrics.json", (later, later))
    tables, _ = report.report(tree)
    assert row(tables, "distilled", "albeto-tiny").cell(tables.columns[0], "test") == (pytest.approx(85.05),)


def test_layer_cut_student_and_plain_finetuning_student(tmp_path: Path):
    out = tmp_path / "r" / "demo" / "student"
    out.mkdir(parents=True)
    cfg = load_config(None, ["task.name=demo", "teacher.model=/m/tiny-bert", "student.num_layers=2"])
    (out / "config.yaml").write_text(to_yaml(cfg))
    info = {"stage": "student", "task": "demo", "family": "classification", "select_metric": "accuracy",
            "parameters": 1000, "teacher": "/m/tiny-bert"}
    (out / "metrics.json").write_text(json.dumps({"validation": {"accuracy": 0.5}, "test": {"accuracy": 0.625},
                                                  "info": info}))
    tables, paths = report.report(tmp_path / "r")
    (r,) = tables.rows
    assert (r.block, r.model, r.title) == ("distilled", "layers-2", "layers-2")
    assert r.speedup is None  # no model/config.json: the cell stays empty
    assert "| layers-2 | 1K | – | 62.50 |" in paths["markdown"].read_text()
    # the same stage with no teacher is plain fine-tuning
    info["teacher"] = None
    (out / "metrics.json").write_text(json.dumps({"validation": {}, "test": {"accuracy": 0.625}, "info": info}))
    tables, _ = report.report(tmp_path / "r")
    assert tables.rows[0].block == "finetuned"


def test_cli_errors_are_for_people(tmp_path: Path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_cli_writes_both_tables(tree: Path, tmp_path: Path, capsys):
    assert report.main([str(tree), "--out", str(tmp_path / "tables"), "--split", "validation"]) == 0
    printed = capsys.readouterr().out
    assert "## Summary" in printed and "## All results" in printed and "validation scores" in printed
    assert {p.name for p in (tmp_path / "tables").iterdir()} == {"tables.md", "summary.csv", "results.csv"}


def test_cuts_and_trims_of_one_model_are_rows_of_their_own():
    from distill.study.runs import student_ref

    base = {"student": {"model": "/m/e5", "num_layers": None, "vocab": {"trim": False}}}
    four = {"student": {"model": "/m/e5", "num_layers": 4, "vocab": {"trim": False}}}
    trimmed = {"student": {"model": "/m/e5", "num_layers": 4, "vocab": {"trim": True}}}
    assert [student_ref(c) for c in (base, four, trimmed)] == ["/m/e5", "/m/e5-4-layers", "/m/e5-4-layers-trimmed"]
    assert student_ref({"student": {"num_layers": 2}}) == "layers-2"
