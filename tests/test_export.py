"""Export: the folder is exactly the student, reloads with plain transformers, and its card
parses back with huggingface_hub holding the run's numbers. One tiny real `distill run`
(teacher hidden 64 -> student hidden 32, so hidden-state projections exist during training)
and hand-made stage folders for the tagging and QA families."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tests.conftest import minilm_path, save_tiny, tiny_bert_config
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    pipeline,
)

from distill.config import ConfigError, load_config, to_yaml
from distill.ship.card import CARD_CONFIG_NAME
from distill.ship.evidence import ExportError, load_evidence, repo_name, student_name
from distill.ship.export import RESULTS_NAME, export_student, main as export_main, safetensors_keys

POSITIVE = ["Me encantó, volvería sin dudarlo.", "Excelente servicio y muy buena comida.", "Todo perfecto, lo recomiendo."]
NEGATIVE = ["Llegó roto y nadie respondió.", "Muy mala experiencia, no vuelvo.", "Dejó de funcionar al segundo día."]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> Path:
    """A real distillation (`distill student`) on 12 rows from an already fine-tuned teacher of
    hidden size 64 into a student of hidden size 32, with the hidden-state loss on, so learned
    projections exist during training. The teacher and baseline stages' metrics.json and the
    closing summary.json are then written beside it by hand (their format is all export reads),
    which keeps this fixture to one training stage."""
    from distill.cli import main

    root = tmp_path_factory.mktemp("cls-run")
    labels = {"id2label": {0: "negativo", 1: "positivo"}, "label2id": {"negativo": 0, "positivo": 1}}
    teacher = save_tiny(tiny_bert_config(hidden=64, **labels), root / "teacher-ft", minilm_path())
    student = save_tiny(tiny_bert_config(hidden=32), root / "student-init", minilm_path())
    rows = [{"text": t, "label": "positivo"} for t in POSITIVE] + [{"text": t, "label": "negativo"} for t in NEGATIVE]
    files = {split: write_jsonl(root / f"{split}.jsonl", rows * n) for split, n in (("train", 2), ("validation", 1), ("test", 1))}
    out = root / "run"
    recipe = root / "recipe.yaml"
    recipe.write_text(
        "task: {family: classification, name: reviews}\n"
        f"data: {{files: {json.dumps(files)}, max_length: 32}}\n"
        f"teacher: {{model: {teacher}, finetuned: true}}\n"
        f"student: {{model: {student}}}\n"
        "distill: {ce_weight: 0.5, kd_weight: 0.5, temperature: 2.0, hidden_weight: 1.0}\n"
        "train: {lr: 1e-3, batch_size: 8, epochs: 1, logging_steps: 1}\n"
        "tracking: {report_to: []}\n"
        "hub: {license: mit, language: [es]}\n"
        f"output_dir: {out}\n"
    )
    assert main(["student", str(recipe)]) == 0
    info = {"parameters": 1_500_000, "loss_weights": {"ce": 1.0}}
    for stage, score in (("teacher", 0.8125), ("baseline", 0.4375)):
        (out / stage).mkdir()
        metrics = {split: {"accuracy": score, "loss": 0.5} for split in ("validation", "test")}
        (out / stage / "metrics.json").write_text(json.dumps({**metrics, "info": {**info, "stage": stage}}))
    summary = [{"stage": "teacher", "latency_ms": 9.0, "speedup": 1.0}, {"stage": "student", "latency_ms": 3.0, "speedup": 3.0}]
    (out / "summary.json").write_text(json.dumps(summary))
    return out


@pytest.mark.slow
def test_export_reloads_and_predicts_like_training(cls_run, tmp_path):
    out = export_student(cls_run / "student", tmp_path / "export", repo_id="someorg/tiny-distilled-reviews")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    trained = AutoModelForSequenceClassification.from_pretrained(cls_run / "student" / "model").eval()
    assert model.config.id2label == {0: "negativo", 1: "positivo"}
    assert model.config.label2id == {"negativo": 0, "positivo": 1}
    for (name, a), (_, b) in zip(model.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(a, b), name
    # the predictions written at the end of training, reproduced by a plain pipeline
    test_rows = [json.loads(line) for line in (cls_run.parent / "test.jsonl").read_text().splitlines()]
    preds = [json.loads(line) for line in (cls_run / "student" / "predictions_test.jsonl").read_text().splitlines()]
    clf = pipeline("text-classification", model=str(out), device="cpu")
    got = clf([test_rows[p["example_id"]]["text"] for p in preds])
    assert [g["label"] for g in got] == [p["prediction"] for p in preds]


@pytest.mark.slow
def test_export_holds_the_student_only(cls_run, tmp_path):
    log = [json.loads(line) for line in (cls_run / "student" / "log.jsonl").read_text().splitlines()]
    assert any("train/loss_hidden" in r for r in log)  # the projections 32 -> 64 were trained
    out = export_student(cls_run / "student", tmp_path / "export")
    keys = set(safetensors_keys(out))
    plain = AutoModelForSequenceClassification.from_pretrained(cls_run / "student" / "model")
    assert keys == set(plain.state_dict())
    assert set(safetensors_keys(cls_run / "student" / "model")) == keys  # training saved the student alone
    assert not [k for k in keys if "hidden_loss" in k or "projection" in k or k.startswith("teacher")]
    # the teacher (hidden 64) left no tensor behind: every exported tensor has the student's width
    hidden = {t.shape[-1] for k, t in load_file(str(out / "model.safetensors")).items() if k.endswith("LayerNorm.weight")}
    assert hidden == {32}
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", CARD_CONFIG_NAME, RESULTS_NAME} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]  # no pickles, no optimizer state
    assert load_config(out / CARD_CONFIG_NAME).distill.hidden_weight == 1.0


@pytest.mark.slow
def test_export_drops_tensors_that_are_not_the_student(cls_run, tmp_path):
    stage = tmp_path / "run" / "student"
    shutil.copytree(cls_run / "student", stage, ignore=shutil.ignore_patterns("export"))
    weights = stage / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["hidden_loss.projections.0.weight"] = torch.ones(64, 32)
    tensors["teacher.bert.pooler.dense.weight"] = torch.ones(64, 64)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    out = export_student(stage)
    assert out == stage / "export"
    keys = set(safetensors_keys(out))
    assert "hidden_loss.projections.0.weight" not in keys and "teacher.bert.pooler.dense.weight" not in keys
    assert len(keys) == len(tensors) - 2


@pytest.mark.slow
def test_card_parses_back_with_the_runs_numbers(cls_run, tmp_path, capsys):
    out = export_student(cls_run / "student", tmp_path / "export", repo_id="someorg/tiny-distilled-reviews")
    card = ModelCard.load(out / "README.md")
    metrics = json.loads((cls_run / "student" / "metrics.json").read_text())
    data = card.data
    assert data.pipeline_tag == "text-classification"
    assert data.license == "mit" and data.language == ["es"]
    assert "knowledge-distillation" in data.tags and data.library_name == "transformers"
    assert data.model_name == "tiny-distilled-reviews"
    found = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    for split in ("validation", "test"):
        assert found[(split, "accuracy")] == pytest.approx(metrics[split]["accuracy"], abs=1e-6)
    assert {r.task_type for r in data.eval_results} == {"text-classification"}
    body = card.text
    teacher = json.loads((cls_run / "teacher" / "metrics.json").read_text())
    baseline = json.loads((cls_run / "baseline" / "metrics.json").read_text())
    assert f"{teacher['test']['accuracy']:.4f}" in body and f"{baseline['test']['accuracy']:.4f}" in body
    summary = {r["stage"]: r for r in json.loads((cls_run / "summary.json").read_text())}
    assert f"{summary['student']['speedup']:.2f}×" in body and "teacher 9.0 ms, this model 3.0 ms" in body
    # this summary.json does not say how many forwards it timed: the card claims no count
    assert "median of repeated forwards after a warm-up" in body
    assert "| same student fine-tuned without a teacher |" in body and "already fine-tuned on the task" in body
    assert 'pipeline("text-classification", model="someorg/tiny-distilled-reviews")' in body
    assert "'label': '" in run_usage_snippet(body, "someorg/tiny-distilled-reviews", out, capsys)
    assert f"distill run {CARD_CONFIG_NAME}" in body
    assert "T = 2" in body and "`hidden` × 1" in body and "`kd` × 0.5" in body
    assert str(cls_run) not in body  # local paths stay out of the published card
    assert_rendered(body)
    results = json.loads((out / RESULTS_NAME).read_text())
    assert results["repo_id"] == "someorg/tiny-distilled-reviews"  # the repo the card was written for
    assert results["student"]["test"] == metrics["test"] and results["teacher"]["parameters"] > results["student"]["parameters"]
    assert results["teacher"]["cpu_latency_ms"] == 9.0 and results["student"]["speedup_vs_teacher"] == 3.0
    assert "teachers" not in results and "teacher_combine" not in results  # one teacher: the keys as before


@pytest.mark.slow
def test_cli_export_and_its_errors(cls_run, tmp_path, capsys):
    assert export_main([str(cls_run / "student" / "model"), "--out", str(tmp_path / "e")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    unfinished = tmp_path / "unfinished"
    shutil.copytree(cls_run / "student", unfinished, ignore=shutil.ignore_patterns("metrics.json", "export"))
    assert export_main([str(unfinished)]) == 2
    assert "metrics.json" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_student(cls_run / "student", occupied)
    assert (occupied / "notes.txt").read_text() == "mine"


def test_an_existing_file_as_out_is_refused_and_kept(tmp_path, capsys):
    """`--out` naming a file (or a path under one) stops with exit 2, naming the path and what
    to pass instead, before anything is written; the file keeps its bytes."""
    stage = make_stage(tmp_path, "classification")
    taken = tmp_path / "results.json"
    taken.write_text('{"mine": true}')
    assert export_main([str(stage), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert f"--out {taken} is a file, not a folder; it was left as it is" in err
    assert "a folder that does not exist yet" in err and str(stage / "export") in err
    assert "Traceback" not in err
    assert export_main([str(stage), "--out", str(taken / "export")]) == 2
    assert f"lies under {taken}, which is a file" in capsys.readouterr().err
    assert taken.read_text() == '{"mine": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "run"]  # no temporary folder left
    assert not (stage / "export").exists()


# --- the other task families, from hand-made stage folders ---------------------------------


def make_stage(root: Path, family: str, overrides: list[str] = ()) -> Path:
    """A finished-looking student stage folder for `family` (tiny random model, made-up scores)."""
    labels = {"classification": ["negativo", "positivo"], "tagging": ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"], "qa": []}[family]
    head = {"classification": AutoModelForSequenceClassification, "tagging": AutoModelForTokenClassification, "qa": AutoModelForQuestionAnswering}[family]
    stage = root / "run" / "student"
    kw = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}
    save_tiny(tiny_bert_config(**kw), stage / "model", minilm_path(), model_class=head)
    cfg = load_config(None, [f"task.family={family}", f"task.name={family}-demo", f"student.model={root / 'init'}", f"output_dir={root / 'run'}", "data.doc_stride=64", *overrides])
    (stage / "config.yaml").write_text(to_yaml(cfg))
    metric = {"classification": "accuracy", "tagging": "f1", "qa": "f1"}[family]
    scores = {"validation": {metric: 0.61, "loss": 1.2}, "test": {metric: 0.58, "loss": 1.3}}
    if family == "qa":
        scores["test"]["exact_match"] = 0.41
    info = {"stage": "student", "task": cfg.task.name, "family": family, "metric": metric, "select_metric": metric,
            "best_step": 10, "steps": 20, "parameters": 12345, "teacher": None, "loss_weights": {"ce": 1.0}}
    (stage / "metrics.json").write_text(json.dumps({**scores, "info": info}))
    return stage


def assert_rendered(card_text: str) -> None:
    """The template left no Jinja syntax behind, and no run of blank lines where a block was skipped."""
    assert "{{" not in card_text and "{%" not in card_text and "{#" not in card_text
    assert "\n\n\n" not in card_text


def test_the_card_template_ships_with_the_package():
    """An installed (not editable) package holds only the data files pyproject lists."""
    import fnmatch
    import tomllib

    from distill.ship.card import TEMPLATE

    root = Path(__file__).parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["distill"]
    shipped = TEMPLATE.relative_to(root / "distill").as_posix()
    assert TEMPLATE.exists() and any(fnmatch.fnmatch(shipped, p) for p in patterns), (shipped, patterns)


def test_tagging_export_with_hub_dataset_metadata(tmp_path, capsys):
    stage = make_stage(tmp_path, "tagging", ["data.source=conll2002", "data.name=es", "data.revision=refs/convert/parquet", "data.max_eval_samples=200"])
    out = export_student(stage, repo_id="org/tiny-ner")
    assert_rendered((out / "README.md").read_text())
    tagger = pipeline("token-classification", model=str(out), device="cpu")
    words = tagger("Ana vive en Madrid.")
    assert words and {w["entity"] for w in words} <= {"O", "B-LOC", "I-LOC", "B-PER", "I-PER"}
    card = ModelCard.load(out / "README.md")
    printed = run_usage_snippet(card.text, "org/tiny-ner", out, capsys)
    # the snippet prints what the aggregating pipeline finds in its sentence, nothing else
    expected = tagger("Ana vive en Madrid y trabaja en la Universidad de Chile.", aggregation_strategy="simple")
    assert printed.strip() == str(expected)
    assert all(e["entity_group"] in {"LOC", "PER"} for e in expected)
    data = card.data
    assert data.pipeline_tag == "token-classification" and data.datasets == ["conll2002"]
    assert "knowledge-distillation" not in data.tags  # plain fine-tuning: no teacher, no such claim
    r = {(x.dataset_split, x.metric_type): x for x in data.eval_results}
    assert r[("test[:200]", "f1")].metric_value == 0.58 and r[("test[:200]", "f1")].dataset_config == "es"
    assert r[("validation[:200]", "f1")].dataset_revision == "refs/convert/parquet"
    assert ("test[:200]", "loss") not in r


def run_usage_snippet(card_text: str, repo_id: str, folder: Path, capsys) -> str:
    """Execute the card's Python snippet against the local export; returns what it printed."""
    code = card_text.split("```python\n", 1)[1].split("```", 1)[0]
    assert repo_id in code
    capsys.readouterr()
    exec(compile(code.replace(repo_id, str(folder)), "usage-snippet", "exec"), {})
    return capsys.readouterr().out


def test_qa_export(tmp_path, capsys):
    stage = make_stage(tmp_path, "qa", ["data.source=PlanTL-GOB-ES/SQAC"])
    out = export_student(stage, repo_id="org/tiny-qa")
    AutoModelForQuestionAnswering.from_pretrained(out)
    card = ModelCard.load(out / "README.md")
    assert_rendered(card.text)
    answer = run_usage_snippet(card.text, "org/tiny-qa", out, capsys).strip()
    assert answer and answer in "El Museo del Prado se encuentra en Madrid."
    assert card.data.pipeline_tag == "question-answering"
    assert {x.metric_type for x in card.data.eval_results} == {"f1", "exact_match"}
    assert "Labels (" not in card.text


def test_repo_names_follow_the_study():
    cfg = load_config(None, ["student.model=albeto-base-6", "task.name=pawsx"])
    assert repo_name(cfg, "dccuchile") == "dccuchile/albert-base-6-spanish-distilled-pawsx"
    cut = load_config(None, ["teacher.model=dccuchile/bert-base-spanish-wwm-cased", "student.num_layers=4", "task.name=xnli"])
    assert student_name(cut) == "bert-base-spanish-wwm-cased-4-layers"
    # a cut of the student's own model, and a trimmed vocabulary, are students of their own
    own = load_config(None, ["student.model=/models/multilingual-e5-small", "student.num_layers=4", "task.name=pos"])
    assert student_name(own) == "multilingual-e5-small-4-layers"
    trimmed = load_config(None, ["student.model=/models/multilingual-e5-small", "student.num_layers=2",
                                 "student.vocab.trim=true", "task.name=pos"])
    assert repo_name(trimmed, "org") == "org/multilingual-e5-small-2-layers-trimmed-distilled-pos"
    bad = load_config(None, ["student.model=albeto-tiny"])
    bad.hub.repo_id = "{org}/{model}"
    with pytest.raises(ConfigError, match="hub.repo_id"):
        repo_name(bad, "x")


def test_evidence_without_siblings(tmp_path):
    stage = make_stage(tmp_path, "classification")
    ev = load_evidence(stage)
    assert ev.teacher is None and ev.baseline is None and ev.summary == [] and not ev.distilled
    text = (export_student(stage, repo_id="o/n") / "README.md").read_text()
    assert "Speed was not measured" in text and "teacher (fine-tuned)" not in text


def test_card_finds_the_teacher_through_teacher_dir(tmp_path):
    """Recipes and the grid put the teacher stage at teacher.dir (shared by every student), not
    at <output_dir>/teacher: the card's teacher row and comparison come from there."""
    shared = tmp_path / "shared" / "teacher"
    stage = make_stage(tmp_path, "classification", ["teacher.model=dccuchile/bert-base-spanish-wwm-cased", f"teacher.dir={shared}"])
    metrics = json.loads((stage / "metrics.json").read_text())
    metrics["info"]["teacher"] = "dccuchile/bert-base-spanish-wwm-cased"
    (stage / "metrics.json").write_text(json.dumps(metrics))
    teacher = {split: {"accuracy": 0.8765, "loss": 0.4} for split in ("validation", "test")}
    shared.mkdir(parents=True)
    (shared / "metrics.json").write_text(json.dumps({**teacher, "info": {"stage": "teacher", "parameters": 110_000_000}}))
    # a stale <output_dir>/teacher from an earlier layout must not be read instead
    (stage.parent / "teacher").mkdir()
    (stage.parent / "teacher" / "metrics.json").write_text(json.dumps({"validation": {"accuracy": 0.1111}, "test": {"accuracy": 0.1111}}))
    ev = load_evidence(stage)
    assert ev.teacher["test"]["accuracy"] == 0.8765
    text = (export_student(stage, repo_id="org/tiny") / "README.md").read_text()
    assert "| teacher (fine-tuned) | 110.00M | 0.8765 | 0.8765 |" in text
    assert "66% of its teacher's accuracy (0.8765)" in text and "0.1111" not in text


def test_results_list_every_teacher_and_the_combination_rule(tmp_path):
    """Several teachers: `teacher` stays the best one's scores (as before), `teachers` lists each
    in recipe order with its own scores and timing, and `teacher_combine` the rule; a local
    teacher's path stays out of the file."""
    local = tmp_path / "my-teacher"
    teachers = (f"teachers=[{{model: dccuchile/bert-base-spanish-wwm-cased, seed: 1}}, {{model: {local}, seed: 2}}, "
                "{model: PlanTL-GOB-ES/roberta-base-bne, finetuned: true}]")
    stage = make_stage(tmp_path, "classification", [teachers, "distill.teacher_combine=weighted",
                                                    "distill.teacher_weights=[1,3,1]", "distill.temperature=2",
                                                    "distill.intermediate_teacher=1"])
    metrics = json.loads((stage / "metrics.json").read_text())
    metrics["info"].update(teacher=["t0", "t1", "t2"], loss_weights={"ce": 0.5, "kd": 0.5})
    (stage / "metrics.json").write_text(json.dumps(metrics))
    for i, (score, params) in enumerate(((0.70, 110_000_000), (0.80, 125_000_000))):
        (stage.parent / f"teacher-{i}").mkdir()
        metrics = {split: {"accuracy": score, "loss": 0.5} for split in ("validation", "test")}
        (stage.parent / f"teacher-{i}" / "metrics.json").write_text(
            json.dumps({**metrics, "info": {"stage": f"teacher-{i}", "parameters": params}}))
    summary = [{"stage": "teacher-0", "latency_ms": 9.0, "speedup": 1.0}, {"stage": "teacher-1", "latency_ms": 12.0, "speedup": 0.75},
               {"stage": "student", "latency_ms": 3.0, "speedup": 3.0}]
    (stage.parent / "summary.json").write_text(json.dumps(summary))
    out = export_student(stage, repo_id="org/tiny")
    text = (out / RESULTS_NAME).read_text()
    results = json.loads(text)
    assert str(local) not in text and str(tmp_path) not in text
    assert results["teacher"] == {"validation": {"accuracy": 0.80, "loss": 0.5}, "test": {"accuracy": 0.80, "loss": 0.5},
                                  "parameters": 125_000_000, "cpu_latency_ms": 12.0, "speedup_vs_teacher": 0.75}
    assert results["student"]["speedup_vs_teacher"] == 3.0 and results["student"]["test"]["accuracy"] == 0.58
    listed = results["teachers"]
    assert [(t["index"], t["stage"], t["model"], t["finetuned"], t["best"]) for t in listed] == [
        (0, "teacher-0", "dccuchile/bert-base-spanish-wwm-cased", False, False),
        (1, "teacher-1", None, False, True),
        (2, "teacher-2", "PlanTL-GOB-ES/roberta-base-bne", True, False),
    ]
    assert [t["test"].get("accuracy") for t in listed] == [0.70, 0.80, None]
    assert [t["parameters"] for t in listed] == [110_000_000, 125_000_000, None]
    assert [t["cpu_latency_ms"] for t in listed] == [9.0, 12.0, None]
    assert results["teacher_combine"] == {"rule": "weighted", "weights": [1.0, 3.0, 1.0], "temperature": 2.0, "intermediate_teacher": 1}
    card = (out / "README.md").read_text()  # the card says the same
    assert_rendered(card)
    assert "- **Teachers** (3; soft targets combined as a weighted mean of their probabilities at temperature T (weights 1, 3, 1)):" in card


def test_card_states_how_the_summary_timed_the_models(tmp_path, monkeypatch):
    """The speed sentence names the warm-up and run counts `distill run`'s summary really used."""
    from distill import latency
    from distill.study.summary import summary_rows

    stage = make_stage(tmp_path, "classification", ["teacher.model=dccuchile/bert-base-spanish-wwm-cased"])
    shutil.copytree(stage / "model", stage.parent / "teacher" / "model")
    used = {}

    def fake_interleaved(cases, *, warmup, runs, **kw):
        used.update(warmup=warmup, runs=runs)
        return [latency.summarize([ms / 1000] * runs, batch=1, seq=seq, warmup=warmup, threads=1, device="cpu", device_name="cpu")
                for ms, (_, _, seq) in zip((9.0, 3.0), cases)]

    monkeypatch.setattr(latency, "measure_interleaved", fake_interleaved)
    cfg = load_config(stage / "config.yaml")
    metrics = json.loads((stage / "metrics.json").read_text())
    rows = summary_rows(cfg, {"teacher": metrics, "student": metrics})
    (stage.parent / "summary.json").write_text(json.dumps(rows))
    text = (export_student(stage, repo_id="org/tiny") / "README.md").read_text()
    assert f"median of {used['runs']} forwards after {used['warmup']} warm-up" in text
    assert "teacher 9.0 ms, this model 3.0 ms" in text


def test_summary_and_export_pass_trust_remote_code_from_the_recipe(tmp_path, monkeypatch):
    """A stage whose saved model ships its own code: the closing summary of `distill run` and the
    export load it with the recipe's trust_remote_code, so transformers never stops at its
    interactive y/N prompt (under a launcher with no terminal that prompt fails the run)."""
    from distill.study.summary import summary_rows
    from tests.test_security import custom_code_model

    prompts = []

    def no_terminal(prompt=""):  # what input() meets when stdin is closed
        prompts.append(prompt)
        raise EOFError

    monkeypatch.setattr("builtins.input", no_terminal)
    stage = make_stage(tmp_path, "classification", ["student.trust_remote_code=true"])
    custom_code_model(stage / "model", tmp_path / "ran")
    config = json.loads((stage / "model" / "config.json").read_text())
    config.update(id2label={"0": "negativo", "1": "positivo"}, label2id={"negativo": 0, "positivo": 1})
    (stage / "model" / "config.json").write_text(json.dumps(config))
    cfg = load_config(stage / "config.yaml")
    metrics = json.loads((stage / "metrics.json").read_text())
    (row,) = summary_rows(cfg, {"student": metrics})
    assert row["latency_ms"] > 0 and (row["warmup"], row["runs"]) == (3, 15)
    assert (tmp_path / "ran").exists() and prompts == []  # the model's own code ran, unasked
    out = export_student(stage, repo_id="org/custom")
    assert (out / "model.safetensors").exists() and prompts == []
    # trust_remote_code off: refused with the way out named, still without a prompt
    cfg.student.trust_remote_code = False
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        summary_rows(cfg, {"student": metrics})
    assert prompts == []
