"""`student.vocab.trim` in the student and baseline stages (distill/loop/trim.py): the teacher of
the student's own tokenizer reads the trimmed student's ids with unchanged outputs, a trim that
drops training pieces distils across tokenizers (and refuses position terms early), and
`distill run` writes a trimmed student that `transformers.pipeline` loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from distill import models
from distill.cli import main
from distill.config import load_config
from distill.data.features import load_data
from distill.loop.plan import plan_stage
from distill.loop.setup import make_accelerator, setup_stage
from distill.loop.trim import row_texts, trim_stage
from distill.models.vocab import piece_counts
from distill.tasks import get_task
from tests.conftest import minilm_path, save_tiny, tiny_bert_config, write_keyword_data

KEYWORDS = {"positivo": ["excelente", "genial", "perfecto"], "negativo": ["horrible", "pésimo", "roto"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Keyword data and a 4-layer tiny BERT (MiniLM tokenizer) standing in for a fine-tuned teacher."""
    root = tmp_path_factory.mktemp("trim")
    write_keyword_data(root, KEYWORDS, {"train": 48, "validation": 24, "test": 24})
    with (root / "train.jsonl").open("a") as f:  # words used once, which student.vocab.min_count=2 drops
        f.write(json.dumps({"text": "la zarzamora llegó hoy, excelente", "label": "positivo"}) + "\n")
    save_tiny(tiny_bert_config(layers=4), root / "teacher", minilm_path())
    return root


def recipe(root: Path, name: str, extra: str = "") -> Path:
    files = {split: str(root / f"{split}.jsonl") for split in ("train", "validation", "test")}
    path = root / f"{name}.yaml"
    path.write_text(
        "task: {family: classification, name: reviews}\n"
        f"data: {{files: {json.dumps(files)}, max_length: 32}}\n"
        f"teacher: {{model: {root / 'teacher'}, finetuned: true}}\n"
        "student: {num_layers: 2, vocab: {trim: true}}\n"
        "distill: {kd_weight: 1.0, hidden_weight: 1.0, temperature: 2.0}\n"
        "train: {lr: 1e-3, batch_size: 8, epochs: 1, logging_steps: 4}\n"
        "run: {baseline: true}\n"
        "tracking: {report_to: []}\n"
        f"output_dir: {root / name}\n" + extra
    )
    return path


def test_row_texts_reads_the_task_columns_once_each():
    qa = Dataset.from_dict({
        "id": ["a", "b"], "question": ["¿Dónde?", "¿Cuándo?"], "context": ["En Madrid.", "En Madrid."],
        "answers": [{"text": ["Madrid"], "answer_start": [3]}] * 2,
    })
    assert row_texts(qa, "qa", {}) == ["¿Dónde?", "¿Cuándo?", "En Madrid."]
    tagging = Dataset.from_dict({"words": [["Ana", "vive"], ["Ana", "vive"], ["Sí"]], "tags": [["B", "O"], ["B", "O"], ["O"]]})
    assert row_texts(tagging, "tagging", {"tokens": "words"}) == [["Ana", "vive"], ["Sí"]]
    pairs = Dataset.from_dict({"a": ["uno", "dos"], "b": ["tres", ""], "label": ["x", "y"]})
    assert row_texts(pairs, "classification", {"text": "a", "text_pair": "b"}) == ["uno", "dos", "tres"]


def stage_parts(root: Path, name: str, overrides: list[str]):
    cfg = load_config(recipe(root, name), overrides)
    plan = plan_stage(cfg, "student")
    task = get_task(plan.task, plan.data)
    raw = load_data(plan.data, plan.seed, task)
    head, kwargs = task.model_class(), task.model_kwargs()
    teacher, teacher_tok = models.load_teacher(str(root / "teacher"), None, False, head, task.labels)
    model, tok = models.build_trained_model("student", plan.base, plan.student, head, kwargs)
    return plan, raw, model, tok, [(teacher, teacher_tok)]


def test_a_teacher_of_the_students_tokenizer_reads_its_ids_with_unchanged_outputs(world):
    plan, raw, model, tok, loaded = stage_parts(world, "mapped", [])
    original_teacher = models.load_teacher(str(world / "teacher"), None, False, AutoModelForSequenceClassification, ["negativo", "positivo"])[0]
    model, trimmed, info = trim_stage(plan, raw, model, tok, loaded, ["hidden"], verbose=False)
    teacher, teacher_tok = loaded[0]
    assert teacher_tok is trimmed and info["teachers_read_student_ids"] == [0]
    assert teacher.get_input_embeddings().num_embeddings == len(trimmed) == info["pieces_after"] < 200
    assert info["parameters_after"] < info["parameters_before"] and info["pieces_before"] == len(tok)
    assert set(info["unknown"]) == {"validation", "test"}
    texts = list(raw["train"]["text"])
    with torch.no_grad():
        ours = teacher(**trimmed(texts, padding=True, return_tensors="pt")).logits
        theirs = original_teacher(**tok(texts, padding=True, return_tensors="pt")).logits
    assert torch.equal(ours, theirs)  # the teacher teaches exactly what it taught before


def test_a_trim_that_drops_training_pieces_distils_across_tokenizers(world):
    plan, raw, model, tok, loaded = stage_parts(world, "apart", ["student.vocab.min_count=2", "distill.hidden_weight=0"])
    _, trimmed, info = trim_stage(plan, raw, model, tok, loaded, [], verbose=False)
    assert info["teachers_read_student_ids"] == [] and loaded[0][1] is not trimmed  # the teacher keeps its tokenizer
    once = [i for i, c in piece_counts(tok, row_texts(raw["train"], "classification", {})).items() if c == 1]
    assert once and not set(tok.convert_ids_to_tokens(once)) & set(trimmed.get_vocab())  # pieces used once are gone
    stage = setup_stage(plan, make_accelerator(plan))
    assert stage.task.teacher_tokenizer is not None and "teacher_input_ids" in stage.features["train"].column_names
    assert len(stage.tokenizer) == stage.info["vocab"]["pieces_after"]


def test_position_terms_with_dropped_pieces_are_refused_before_anything_trains(world, capsys):
    code = main(["run", str(recipe(world, "refused")), "student.vocab.min_count=2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "student.vocab.min_count=2 drops pieces of the training rows" in err and "hidden" in err
    assert not (world / "refused" / "student").exists()


def test_distill_run_writes_a_trimmed_student_that_a_pipeline_loads(world):
    assert main(["run", str(recipe(world, "run"))]) == 0
    for stage in ("student", "baseline"):
        out = world / "run" / stage
        vocab = json.loads((out / "metrics.json").read_text())["info"]["vocab"]
        assert vocab["pieces_after"] < 200 < vocab["pieces_before"] == 30522
        assert vocab["parameters_after"] < vocab["parameters_before"]
        assert {"validation", "test"} <= set(vocab["unknown"])
        assert 0 <= vocab["unknown"]["test"]["unknown_share"] <= 1
        tok = AutoTokenizer.from_pretrained(out / "model")
        config = json.loads((out / "model" / "config.json").read_text())
        assert len(tok) == config["vocab_size"] == vocab["pieces_after"]
        classify = pipeline("text-classification", model=str(out / "model"))
        text = json.loads((world / "test.jsonl").read_text().splitlines()[0])["text"]
        assert classify([text])[0]["label"] in KEYWORDS
    student = json.loads((world / "run" / "student" / "metrics.json").read_text())["info"]["vocab"]
    assert student["teachers_read_student_ids"] == [0]  # hidden-state term and KD on one tokenization
    # the model card says the vocabulary was trimmed, how far, and what it costs on the test split
    from distill.ship.card import card_body
    from distill.ship.evidence import load_evidence

    body = card_body(load_evidence(world / "run" / "student"), "org/reviews", "text-classification")
    assert f"- **Vocabulary:** trimmed to the pieces of the task's training text: 30,522 → {student['pieces_after']:,} pieces" in body
    assert f"{100 * student['unknown']['test']['unknown_share']:.2f} % of the test split's pieces are unknown" in body
