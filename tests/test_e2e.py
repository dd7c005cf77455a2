"""End to end: `distill run` (teacher -> student -> baseline) on tiny models and a learnable task.

The synthetic task: each text holds filler words and one keyword of its class. The teacher (the
real pretrained MiniLM) learns it from gold labels; the student, one layer cut from the
pretrained MiniLM with a fresh head, sees no gold label at all (ce_weight=0, KL only) and must
still end up agreeing with the teacher.
"""

import json
import random

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill import models
from distill.cli import main
from tests.conftest import minilm_path

KEYWORDS = {"rojo": ["red", "fire", "blood"], "verde": ["green", "grass", "forest"], "azul": ["blue", "sea", "sky"]}
FILLER = "the a house dog cat run walk big small old new good day night water book city table".split()


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(KEYWORDS))
        words = rng.choices(FILLER, k=rng.randint(3, 12))
        words.insert(rng.randrange(len(words) + 1), rng.choice(KEYWORDS[label]))
        rows.append({"sentence": " ".join(words), "color": label})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, minilm_dir):
    root = tmp_path_factory.mktemp("e2e")
    for split, n, seed in (("train", 384, 0), ("validation", 90, 1), ("test", 150, 2)):
        write_jsonl(root / f"{split}.jsonl", make_rows(n, seed))
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"""# tiny end-to-end run
#   distill run recipe.yaml
task: {{family: classification, name: colors}}
data:
  files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}
  columns: {{text: sentence, label: color}}
  max_length: 24
teacher: {{model: {minilm_dir}, lr: 2e-4, epochs: 2}}
student: {{num_layers: 1}}
distill: {{ce_weight: 0.0, kd_weight: 1.0, kd_loss: kl, temperature: 2.0, hidden_weight: 0.0}}
train: {{lr: 5e-4, batch_size: 32, epochs: 6, warmup_ratio: 0.0, logging_steps: 5}}
run: {{baseline: true}}
tracking: {{report_to: []}}
output_dir: {root}/run
seed: 3
"""
    )
    assert main(["run", str(recipe)]) == 0
    return root


@pytest.mark.slow
def test_every_stage_writes_its_files(run_dir):
    run = run_dir / "run"
    for stage in ("teacher", "student", "baseline"):
        out = run / stage
        for name in ("config.yaml", "log.jsonl", "metrics.json", "model/config.json", "model/model.safetensors",
                     "model/tokenizer.json", "predictions_test.jsonl"):
            assert (out / name).exists(), f"{stage}/{name}"
        assert not (out / "checkpoints").exists() and not (out / "best").exists()
        metrics = json.loads((out / "metrics.json").read_text())
        for split in ("validation", "test"):
            assert 0.0 <= metrics[split]["accuracy"] <= 1.0
            assert metrics[split]["loss"] > 0
        config = json.loads((out / "model/config.json").read_text())
        assert set(config["id2label"].values()) == {"azul", "rojo", "verde"}
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        train = [r for r in records if "train/loss" in r]
        assert train and all(r["train/samples_per_s"] > 0 for r in train)
        assert any("validation/accuracy" in r for r in records)
    student_log = (run / "student/log.jsonl").read_text()
    assert "train/loss_kd" in student_log and "train/loss_ce" not in student_log
    assert "train/loss_ce" in (run / "teacher/log.jsonl").read_text()
    teacher = json.loads((run / "teacher/metrics.json").read_text())
    assert teacher["test"]["accuracy"] > 0.9, teacher
    summary = json.loads((run / "summary.json").read_text())
    assert [r["stage"] for r in summary] == ["teacher", "student", "baseline"]
    assert all(r["latency_ms"] > 0 for r in summary)


@pytest.mark.slow
def test_student_model_holds_only_the_student(run_dir):
    path = run_dir / "run/student/model/model.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("bert.", "classifier.")) for k in keys), keys[:5]
    layers = {k.split(".")[3] for k in keys if k.startswith("bert.encoder.layer.")}
    assert layers == {"0"}  # the one kept layer, no teacher tensors


@pytest.mark.slow
def test_kd_alone_transfers_the_teacher(run_dir):
    """Trained on soft labels only, the student agrees with the teacher on >= 90 % of held-out
    examples, far above the same student untrained."""
    run = run_dir / "run"

    def preds(stage):
        return [json.loads(line)["prediction"] for line in (run / stage / "predictions_test.jsonl").read_text().splitlines()]

    teacher, student = preds("teacher"), preds("student")
    agreement = sum(a == b for a, b in zip(teacher, student)) / len(teacher)

    torch.manual_seed(0)
    base = models.load_model(str(minilm_path()), AutoModelForSequenceClassification, new_head=True, num_labels=3)
    untrained = models.student_from_teacher(base, models.uniform_layers(6, 1)).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    texts = [json.loads(line)["sentence"] for line in (run_dir / "test.jsonl").read_text().splitlines()]
    labels = json.loads((run / "teacher/model/config.json").read_text())["id2label"]
    with torch.no_grad():
        ids = untrained(**tok(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    untrained_agreement = sum(labels[str(i)] == t for i, t in zip(ids, teacher)) / len(teacher)
    assert agreement >= 0.9, agreement
    assert agreement >= untrained_agreement + 0.3, (agreement, untrained_agreement)


@pytest.mark.slow
def test_rerun_skips_complete_stages(run_dir, capsys):
    before = (run_dir / "run/student/metrics.json").stat().st_mtime_ns
    assert main(["run", str(run_dir / "recipe.yaml")]) == 0
    assert (run_dir / "run/student/metrics.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_eval_command_scores_a_saved_model(run_dir, capsys):
    """`distill eval` on the saved student reproduces the numbers the run wrote."""
    capsys.readouterr()
    model = run_dir / "run/student/model"
    assert main(["eval", str(run_dir / "recipe.yaml"), f"checkpoint={model}"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{"):])
    saved = json.loads((run_dir / "run/student/metrics.json").read_text())
    for split in ("validation", "test"):
        assert printed[split]["accuracy"] == pytest.approx(saved[split]["accuracy"])
        assert printed[split]["loss"] == pytest.approx(saved[split]["loss"], rel=1e-4)
