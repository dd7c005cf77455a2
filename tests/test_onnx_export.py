"""ONNX and int8 exports with the parity gate, for every task family.

A classification student really trained by `distill run` (so its accuracy is far above chance
and a broken int8 file has something to lose), and random tiny tagging / QA models on the
shipped Spanish mini sets (their int8 scores move by noise, so those tests widen the margin and
check the fp32 parity, the scores against the training-side evaluation, and the card's
ONNX Runtime snippet). Each export converts a 2-layer, hidden-32 model: seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from huggingface_hub import ModelCard
from onnx import numpy_helper
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from distill.ship import onnx as ox
from distill.ship.evidence import ExportError
from distill.config import ConfigError, load_config, to_yaml
from distill.ship.export import ParityError, export_student, main as export_main
from tests.conftest import minilm_path, save_tiny, tiny_bert_config, write_keyword_data

DATA = Path(__file__).parent.parent / "distill" / "sample_data"
KEYWORDS = {"positivo": ["excelente", "genial", "perfecto"], "negativo": ["horrible", "pésimo", "roto"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A keyword-polarity student fine-tuned by `distill run` until it separates the classes
    (validation accuracy 1.0 on this seed); returns its stage folder."""
    from distill.cli import main

    root = tmp_path_factory.mktemp("onnx-cls")
    model = save_tiny(tiny_bert_config(), root / "init", minilm_path())
    write_keyword_data(root, KEYWORDS, {"train": 64, "validation": 40, "test": 20})
    files = {split: str(root / f"{split}.jsonl") for split in ("train", "validation", "test")}
    (root / "recipe.yaml").write_text(
        "task: {family: classification, name: reviews}\n"
        f"data: {{files: {json.dumps(files)}, max_length: 32}}\n"
        f"student: {{model: {model}}}\n"
        "train: {lr: 1e-2, batch_size: 8, epochs: 15, logging_steps: 8}\n"
        "tracking: {report_to: []}\n"
        f"output_dir: {root / 'run'}\n"
    )
    assert main(["run", str(root / "recipe.yaml")]) == 0
    stage = root / "run" / "student"
    accuracy = json.loads((stage / "metrics.json").read_text())["validation"]["accuracy"]
    assert accuracy >= 0.9, "the fixture's student must be well above chance for the gate tests"
    return stage


def random_stage(root: Path, family: str, overrides: list[str]) -> Path:
    """A finished-looking stage folder holding a random tiny model whose head matches the data's
    labels (read as training reads them), and metrics.json without a validation score."""
    from distill.data.features import load_data
    from distill.tasks import get_task

    cfg = load_config(None, [f"task.family={family}", f"task.name={family}-mini", f"output_dir={root / 'run'}",
                             f"student.model={root / 'init'}", *overrides])
    task = get_task(cfg.task, cfg.data)
    load_data(cfg.data, cfg.seed, task)
    stage = root / "run" / "student"
    save_tiny(tiny_bert_config(**task.model_kwargs()), stage / "model", minilm_path(), model_class=task.model_class())
    (stage / "config.yaml").write_text(to_yaml(cfg))
    info = {"stage": "student", "metric": task.metric, "parameters": 1000, "teacher": None, "loss_weights": {"ce": 1.0}}
    (stage / "metrics.json").write_text(json.dumps({"validation": {}, "test": {}, "info": info}))
    return stage


TAGGING = [f"data.source={DATA / 'ner_es'}", "data.splits.test=null", "data.max_length=32", "data.doc_stride=8"]
QA = [f"data.source={DATA / 'qa_es'}", "data.splits.test=null", "data.max_length=64", "data.doc_stride=16"]


def onnx_snippet(card_text: str) -> str:
    """The Python block of the card's ONNX Runtime section."""
    section = card_text.split("## ONNX Runtime and int8", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def run_snippet(code: str, repo_id: str, folder: Path, monkeypatch, capsys) -> str:
    """Run a card snippet against the local export (hf_hub_download answers from the folder)."""
    import huggingface_hub

    assert repo_id in code
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, **kw: str(Path(repo) / filename))
    capsys.readouterr()
    exec(compile(code.replace(repo_id, str(folder)), "onnx-snippet", "exec"), {})
    return capsys.readouterr().out


def evaluated_scores(stage: Path) -> dict[str, float]:
    """The validation metrics the training-side evaluation gives the stage's PyTorch model."""
    from distill.loop.evaluate import evaluate_checkpoint

    cfg = load_config(stage / "config.yaml")
    return {k: v for k, v in evaluate_checkpoint(cfg, str(stage / "model"))["validation"].items() if k != "loss"}


# --- classification: a trained student -------------------------------------------------------


@pytest.mark.slow
def test_classification_export_passes_the_gate_and_runs_at_any_shape(trained, tmp_path, monkeypatch, capsys):
    out = export_student(trained, tmp_path / "export", repo_id="org/tiny-reviews", onnx=True, int8=True)
    report = ox.ParityReport.from_dict(json.loads((out / ox.PARITY_NAME).read_text()))
    recorded = json.loads((trained / "metrics.json").read_text())["validation"]["accuracy"]
    assert not report.failures and not report.forced and report.exporter == "torch.export"
    assert report.examples == 40 and report.metric == "accuracy"
    assert report.score("pytorch") == pytest.approx(recorded)  # the number training reported
    assert report.files["onnx"].max_abs_diff <= ox.FP32_ATOL
    assert report.score("onnx") == report.score("pytorch")
    assert ox.metric_drop(report, "int8") <= ox.INT8_MARGIN
    assert 0 < report.files["int8"].max_abs_diff  # int8 rounds, so it is not the fp32 graph
    assert report.files["int8"].size_mb < report.files["onnx"].size_mb / 2
    assert all(r.latency_ms > 0 for r in report.files.values()) and report.latency.seq == 32

    # dynamic batch and sequence axes: shapes never seen at export time, padding included
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    session = ox.OnnxModel(out / ox.ONNX_NAME)
    assert [i.name for i in session.session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    for texts in (["excelente"], ["muy pésimo envío hoy", "genial", "el producto llegó roto ayer por la tarde"]):
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = model(**enc).logits.numpy()  # [batch, labels]
        got = session.run({k: v.numpy() for k, v in enc.items()})["logits"]
        assert got.shape == expected.shape and np.abs(got - expected).max() < ox.FP32_ATOL

    card = ModelCard.load(out / "README.md")
    assert "onnx" in card.data.tags
    text = card.text
    assert "| `model.onnx` | ONNX Runtime fp32 | 1.0000 |" in text and "| `model.int8.onnx` | ONNX Runtime int8 |" in text
    assert f"median of {ox.LATENCY_RUNS} runs after {ox.LATENCY_WARMUP} warm-up" in text and "sequence length 32" in text
    assert "Both checks passed." in text
    results = json.loads((out / "distill_results.json").read_text())["onnx"]
    assert results["passed"] and results["files"]["model.int8.onnx"]["accuracy"] == report.score("int8")

    # the card's ONNX Runtime snippet runs the int8 file and names the label PyTorch predicts
    code = onnx_snippet(text)
    assert '"model.int8.onnx"' in code and len(code.strip().splitlines()) <= 14
    printed = run_snippet(code, "org/tiny-reviews", out, monkeypatch, capsys)
    sentence = "El servicio fue excelente y volvería sin dudarlo."
    with torch.no_grad():
        label = model.config.id2label[int(model(**tokenizer([sentence], return_tensors="pt")).logits.argmax())]
    assert printed.strip() == str([label]) and label == "positivo"


def zeroed_quantiser(src, dst) -> None:
    """A deliberately broken quantisation: the real one, over a copy whose weight matrices are
    all zero (so every input gets the same logits)."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.ndim == 2 and value.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(value), init.name))
    broken = Path(dst).with_suffix(".broken.onnx")
    onnx.save(model, str(broken))
    real_quantize(broken, dst)
    broken.unlink()


real_quantize = ox.quantize_int8


@pytest.mark.slow
def test_broken_int8_fails_the_gate_and_force_writes_it_with_a_warning(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ox, "quantize_int8", zeroed_quantiser)
    out = tmp_path / "export"
    with pytest.raises(ParityError) as caught:
        export_student(trained, out, repo_id="org/tiny-reviews", int8=True)
    report = caught.value.report
    drop = ox.metric_drop(report, "int8")
    assert drop > 30  # constant logits: one class for every row, far below the trained 1.0
    message = str(caught.value)
    assert f"{drop:.2f} points worse, more than the 0.5-point margin" in message and "model.int8.onnx" in message
    assert "model.onnx differs" not in message  # the fp32 file was fine
    assert not out.exists() and not list(tmp_path.glob(".export*"))  # nothing half-written

    # a wider margin lets the same file through; --force writes it and says so on the card
    export_student(trained, out, repo_id="org/tiny-reviews", int8=True, margin=drop + 1)
    capsys.readouterr()
    assert export_main([str(trained), "--int8", "--force", "--out", str(out), "--repo-id", "org/tiny-reviews"]) == 0
    assert "FAILED (written with --force)" in capsys.readouterr().out
    text = (out / "README.md").read_text()
    assert "**These files failed that check and were published anyway:**" in text and f"{drop:.2f} points worse" in text
    assert '"model.onnx"' in onnx_snippet(text)  # the snippet steers users to the file that passed
    assert json.loads((out / ox.PARITY_NAME).read_text())["forced"] is True


@pytest.mark.slow
def test_wrong_fp32_graph_fails_the_gate(trained, tmp_path, monkeypatch):
    """An exporter that writes a different function (here: the classifier's bias shifted by
    0.01) is caught by the fp32 tolerance even though the predictions barely move."""
    real_export = ox.export_onnx

    def shifted(model, names, path):
        with torch.no_grad():
            model.classifier.bias[0] += 0.01
        try:
            return real_export(model, names, path)
        finally:
            with torch.no_grad():
                model.classifier.bias[0] -= 0.01

    monkeypatch.setattr(ox, "export_onnx", shifted)
    with pytest.raises(ParityError, match=r"model.onnx differs from the PyTorch model by up to 0.01 .*tolerance 0.001"):
        export_student(trained, tmp_path / "export", onnx=True)
    with pytest.raises(ParityError):  # a tighter tolerance is honoured too
        export_student(trained, tmp_path / "export", onnx=True, atol=1e-12)


@pytest.mark.slow
def test_recipe_keys_choose_the_files(trained, tmp_path):
    stage = tmp_path / "student"
    import shutil

    shutil.copytree(trained, stage, ignore=shutil.ignore_patterns("export", "checkpoints"))
    cfg = load_config(stage / "config.yaml", ["hub.export.onnx=true"])
    (stage / "config.yaml").write_text(to_yaml(cfg))
    out = export_student(stage, tmp_path / "a")
    assert (out / ox.ONNX_NAME).exists() and not (out / ox.INT8_NAME).exists()
    out = export_student(stage, tmp_path / "b", onnx=False)  # the command line wins
    assert not (out / ox.ONNX_NAME).exists() and not (out / ox.PARITY_NAME).exists()
    assert "## ONNX Runtime" not in (out / "README.md").read_text()


def test_recipe_keys_are_checked():
    cfg = load_config(None, ["student.model=albeto-tiny", "hub.export.int8=true", "hub.export.int8_margin=1.5"])
    assert cfg.hub.export.int8 and cfg.hub.export.int8_margin == 1.5 and not cfg.hub.export.onnx
    with pytest.raises(ConfigError, match="hub.export.int8_margin=-1.0 is out of range"):
        load_config(None, ["student.model=albeto-tiny", "hub.export.int8_margin=-1"])
    with pytest.raises(ConfigError, match="hub.export.int9"):
        load_config(None, ["student.model=albeto-tiny", "hub.export.int9=true"])


# --- tagging and QA: random tiny models ------------------------------------------------------


def test_tagging_export(tmp_path, monkeypatch, capsys):
    stage = random_stage(tmp_path, "tagging", TAGGING)
    out = export_student(stage, repo_id="org/tiny-ner", onnx=True)
    report = ox.ParityReport.from_dict(json.loads((out / ox.PARITY_NAME).read_text()))
    assert not report.failures and "int8" not in report.files
    assert report.files["onnx"].max_abs_diff <= ox.FP32_ATOL
    # the gate scores the PyTorch model exactly as training's evaluation does
    expected = evaluated_scores(stage)
    assert report.files["pytorch"].metrics == pytest.approx(expected)
    assert report.files["pytorch"].metrics["accuracy"] > 0  # a real score, not an empty one
    assert report.files["onnx"].metrics == pytest.approx(expected)
    # token logits [batch, seq, labels] with both axes dynamic
    session = ox.OnnxModel(out / ox.ONNX_NAME)
    assert [d for d in session.session.get_outputs()[0].shape[:2]] == ["batch", "seq"]

    # the snippet prints each token with the label PyTorch's argmax gives it
    printed = run_snippet(onnx_snippet((out / "README.md").read_text()), "org/tiny-ner", out, monkeypatch, capsys)
    model = AutoModelForTokenClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer("Ana vive en Madrid y trabaja en la Universidad de Chile.", return_tensors="pt")
    with torch.no_grad():
        ids = model(**enc).logits[0].argmax(-1).tolist()  # [seq]
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    pairs = [(t, model.config.id2label[i]) for t, i in zip(tokens, ids) if t not in tokenizer.all_special_tokens]
    assert printed.strip() == str(pairs) and len(pairs) >= 10


def test_qa_export(tmp_path, monkeypatch, capsys):
    stage = random_stage(tmp_path, "qa", QA)
    # a random model's int8 F1 moves by noise: a wide margin keeps this test about the plumbing
    out = export_student(stage, repo_id="org/tiny-qa", onnx=True, int8=True, margin=100)
    report = ox.ParityReport.from_dict(json.loads((out / ox.PARITY_NAME).read_text()))
    assert not report.failures and report.files["onnx"].max_abs_diff <= ox.FP32_ATOL
    assert report.features >= report.examples > 0
    expected = evaluated_scores(stage)
    assert report.files["pytorch"].metrics == pytest.approx(expected)
    assert set(report.files["int8"].metrics) == set(expected)
    assert ox.OnnxModel(out / ox.ONNX_NAME).outputs == ["start_logits", "end_logits"]

    text = (out / "README.md").read_text()
    code = onnx_snippet(text)
    assert '"model.int8.onnx"' in code
    answer = run_snippet(code, "org/tiny-qa", out, monkeypatch, capsys).strip()
    assert answer and answer in "El Museo del Prado se encuentra en Madrid."


def test_the_gate_needs_the_evaluated_data(tmp_path):
    stage = random_stage(tmp_path, "tagging", TAGGING)
    cfg = load_config(stage / "config.yaml", [f"data.source={tmp_path / 'moved-away'}"])
    (stage / "config.yaml").write_text(to_yaml(cfg))
    with pytest.raises(ExportError, match="parity gate .*moved-away"):
        export_student(stage, tmp_path / "export", onnx=True)
    assert not (tmp_path / "export").exists()


def test_labels_that_differ_from_the_data_are_refused(tmp_path):
    stage = random_stage(tmp_path, "tagging", TAGGING)
    config = json.loads((stage / "model" / "config.json").read_text())
    names = list(config["id2label"].values())
    names[0], names[1] = names[1], names[0]
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    (stage / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="not the data's"):
        export_student(stage, tmp_path / "export", onnx=True)


# --- the metric arithmetic of the gate, by hand ---------------------------------------------


def report_with(pytorch: float, int8: float, greater: bool = True, margin: float = 0.5, diff: float = 0.0) -> ox.ParityReport:
    files = {
        "pytorch": ox.FileResult("pytorch", "model.safetensors", {"f1": pytorch}),
        "onnx": ox.FileResult("onnx", "model.onnx", {"f1": pytorch}, max_abs_diff=diff),
        "int8": ox.FileResult("int8", "model.int8.onnx", {"f1": int8}, max_abs_diff=0.1),
    }
    report = ox.ParityReport("validation", 10, 10, "f1", greater, ox.FP32_ATOL, margin, files, ox.LatencySettings())
    ox.judge(report)
    return report


def test_margin_is_in_points_and_only_a_loss_fails():
    assert ox.metric_drop(report_with(0.8000, 0.7960), "int8") == pytest.approx(0.40)
    assert not report_with(0.8000, 0.7960).failures  # 0.4 points lost: within 0.5
    failed = report_with(0.8000, 0.7940).failures  # 0.6 points lost
    assert len(failed) == 1 and "0.60 points worse" in failed[0]
    assert not report_with(0.8000, 0.9000).failures  # a gain is reported, never failed
    assert report_with(0.30, 0.31, greater=False).failures  # lower-is-better metrics: a rise is a loss
    assert report_with(0.8, 0.8, margin=0.0).failures == []
    assert "differs from the PyTorch model by up to inf" in report_with(0.8, 0.8, diff=float("inf")).failures[0]
    assert report_with(0.8, 0.8, diff=float("nan")).failures  # NaN never passes


def test_missing_onnx_packages_are_named_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    stage = random_stage(tmp_path, "tagging", TAGGING)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    with pytest.raises(ExportError, match=r"ONNX exports need onnxscript: pip install 'distill\[bench\]'"):
        export_student(stage, tmp_path / "export", onnx=True)
    assert not (tmp_path / "export").exists()
    with pytest.raises(ExportError, match="--threads \\(0\\) >= 1"):
        export_student(stage, tmp_path / "export", onnx=True, threads=0)
