"""End to end for tagging and QA: `distill run` from a recipe on the shipped Spanish mini sets.

Tagging distils a byte-level BPE teacher (RoBERTa-shaped) into a WordPiece student, the
study's RoBERTa-BNE -> ALBETO situation in miniature, and checks that every stage runs and
writes real, well-formed numbers; QA does the same across tokenizers and checks that teacher
and student learn the questions they are scored on.
"""

import json
from pathlib import Path

import pytest

from distill.cli import main

DATA = Path(__file__).parent.parent / "distill" / "sample_data"


def run(tmp_path, body: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"# tiny run\n#   distill run recipe.yaml\n{body}\ntracking: {{report_to: []}}\noutput_dir: {tmp_path}/run\n")
    assert main(["run", str(recipe)]) == 0
    return tmp_path / "run"


def check_stage(out: Path, metrics_keys: set[str]) -> dict:
    for name in ("config.yaml", "log.jsonl", "metrics.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in metrics_keys:
        assert 0.0 <= metrics["validation"][key] <= 1.0, (key, metrics)
    assert metrics["validation"]["loss"] > 0
    return metrics


@pytest.mark.slow
def test_tagging_run_with_different_tokenizers(tmp_path, tiny_roberta_dir, tiny_bert_dir):
    """Scored on its own 15 training sentences (62.5 % of their words are O): the teacher must
    learn them well beyond tagging everything O, and the student, taught at word level across
    tokenizers, must learn them too (a word-alignment bug leaves it at the O rate or below)."""
    train = DATA / "ner_es" / "train.conll"
    out = run(
        tmp_path,
        f"""task: {{family: tagging, name: ner}}
data:
  files: {{train: {train}, validation: {train}}}
  format: conll
  max_length: 32
  doc_stride: 8
teacher: {{model: {tiny_roberta_dir}, lr: 3e-3, epochs: 25}}
student: {{model: {tiny_bert_dir}}}
distill: {{kd_weight: 1.0, ce_weight: 0.5}}
train: {{lr: 3e-3, batch_size: 8, epochs: 25, warmup_ratio: 0.0, logging_steps: 5}}""",
    )
    teacher = check_stage(out / "teacher", {"f1", "accuracy"})
    student = check_stage(out / "student", {"f1", "accuracy"})
    print(f"teacher accuracy {teacher['validation']['accuracy']:.3f}, student {student['validation']['accuracy']:.3f} (O rate 0.625)")
    assert teacher["validation"]["accuracy"] >= 0.85
    assert student["validation"]["accuracy"] >= 0.8
    assert teacher["info"]["family"] == "tagging"
    labels = json.loads((out / "student/model/config.json").read_text())["id2label"].values()
    assert {"O", "B-PER", "I-PER", "B-LOC"} <= set(labels)
    log = (out / "student/log.jsonl").read_text()
    assert "train/loss_kd" in log and "train/loss_ce" in log


@pytest.mark.slow
def test_qa_run_across_tokenizers_memorises_its_questions(tmp_path, tiny_roberta_dir, tiny_bert_dir):
    """A byte-level BPE teacher (RoBERTa-shaped) distils a WordPiece student on the shipped QA
    set, scored on its own training questions: the teacher must learn them, and the student,
    trained on the teacher's start/end distributions alone (ce_weight=0) moved across
    tokenizers through the context's characters, must answer most of them too (an untrained
    model answers none; targets shifted by one token fail it)."""
    out = run(
        tmp_path,
        f"""task: {{family: qa, name: qa}}
data:
  files: {{train: {DATA / "qa_es" / "train.json"}, validation: {DATA / "qa_es" / "train.json"}}}
  max_length: 256
  doc_stride: 64
teacher: {{model: {tiny_roberta_dir}, lr: 3e-3, epochs: 40}}
student: {{model: {tiny_bert_dir}}}
distill: {{kd_weight: 1.0, ce_weight: 0.0}}
train: {{lr: 3e-3, batch_size: 8, epochs: 40, warmup_ratio: 0.0, logging_steps: 5}}""",
    )
    teacher = check_stage(out / "teacher", {"f1", "exact_match"})
    student = check_stage(out / "student", {"f1", "exact_match"})
    assert teacher["validation"]["examples"] == student["validation"]["examples"] == 15
    assert teacher["validation"]["exact_match"] >= 0.8, teacher
    assert student["validation"]["exact_match"] >= 0.6, student
    assert "train/loss_kd" in (out / "student/log.jsonl").read_text()
    (predictions,) = (out / "student").glob("predictions*.jsonl")
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 15
