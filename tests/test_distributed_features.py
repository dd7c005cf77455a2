"""This round's training features under 2 CPU processes as under one: the attention, relation
and hidden terms with TinyBERT's two phases, and unlabelled transfer rows (no gold loss), train
to nearly the same weights with the same global batch; a run with transfer rows resumes after
SIGTERM to the uninterrupted weights.

Not bitwise: like every DDP loop, each process averages a term over its own rows or tokens and
the gradients are then averaged, so token-averaged terms (hidden states, attention maps) and
the gold loss over a process's labelled rows weigh rows slightly differently than one process
averaging all of them. (Logits-only KD, whose terms are row means, matches to 1e-7: see
tests/test_distributed.py.)

ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m distill student recipe.yaml
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distill.cli import main
from tests.conftest import minilm_path, save_tiny, tiny_bert_config, write_keyword_data
from tests.test_distributed import student_on_one_and_two_processes
from tests.test_resume import sigterm_at_forward

WORDS = {"pos": ["bueno", "genial"], "neg": ["malo", "roto"], "neu": ["normal", "regular"]}
TOLERANCE = 0.05  # per-process averaging of token means (see above); measured 0.012


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    write_keyword_data(root, WORDS, {"train": 32, "validation": 12, "test": 12})
    unlabelled = [{"text": f"frase sin etiqueta {i} {'bueno' if i % 2 else 'malo'}"} for i in range(32)]
    (root / "unlabelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unlabelled))
    config = tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              id2label=dict(enumerate(sorted(WORDS))))
    teacher = save_tiny(config, root / "teacher", minilm_path())
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"""# 1 vs 2 processes, intermediate terms and transfer rows:
#   ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m distill student recipe.yaml
task: {{family: classification, name: tiny}}
data:
  files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}
  max_length: 32
  transfer: [{{files: [{root}/unlabelled.jsonl]}}]
teacher: {{model: {teacher}, finetuned: true}}
student: {{num_layers: 1}}
distill: {{ce_weight: 0.5, kd_weight: 1.0, hidden_weight: 1.0, attention_weight: 1.0, relation_weight: 1.0,
          intermediate_epochs: 1, teacher_outputs: online}}
train: {{lr: 5e-3, batch_size: 8, eval_batch_size: 6, epochs: 2, warmup_ratio: 0.25, logging_steps: 1,
         group_by_length: false, checkpoint_steps: 2}}
tracking: {{report_to: []}}
seed: 5
"""
    )
    return root, recipe


def weights(run: Path) -> dict:
    return load_file(str(run / "student" / "model" / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_agree_with_one_with_intermediate_terms_and_transfer_rows(setup):
    one, two, _ = student_on_one_and_two_processes(*setup, timeout=600)
    a, b = weights(one), weights(two)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |weight difference|, 1 vs 2 processes (relations, attention, hidden, two phases, transfer rows): {diff:.3g}")
    assert diff <= TOLERANCE
    info1 = json.loads((one / "student" / "metrics.json").read_text())["info"]
    info2 = json.loads((two / "student" / "metrics.json").read_text())["info"]
    assert info2["processes"] == 2 and info1["train_rows"] == info2["train_rows"]
    assert info1["train_rows"]["transfer"] == 32
    log2 = [json.loads(x) for x in (two / "student" / "log.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in log2 if "train/loss" in r]
    assert phases == ["intermediate"] * 4 + ["prediction"] * 4  # 64 rows / 16 per step, 2 epochs


def test_a_run_with_transfer_rows_resumes_to_the_same_weights(setup, tmp_path, monkeypatch):
    _, recipe = setup
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["student", str(recipe), f"output_dir={reference}"]) == 0
    with monkeypatch.context() as patch:
        sigterm_at_forward(patch, 11)  # mid-way through the second (prediction) epoch
        with pytest.raises(SystemExit) as info:
            main(["student", str(recipe), f"output_dir={run}"])
    assert info.value.code == 75
    assert main(["student", str(recipe), f"output_dir={run}"]) == 0
    a, b = weights(reference), weights(run)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
