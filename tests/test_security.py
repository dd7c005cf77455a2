"""Secrets and untrusted files.

- Hub and wandb tokens live only in the environment (or the user's login): a full run with
  checkpoints, a resume, wandb (offline) tracking and an export never writes them to
  config.yaml, log.jsonl, checkpoints, metrics, predictions, the model card, wandb's files or
  the console; a recipe cannot carry one.
- Weights load from safetensors only: a folder holding just a pickle is refused, unopened.
- Code shipped with a model runs only when the recipe turns trust_remote_code on, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import signal
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

import distill.loop.train as train
from distill import models
from distill.cli import main
from tests.conftest import minilm_path, save_tiny, tiny_bert_config

HF_TOKEN = "hf_" + "TestOnlySecret" + "".join(random.Random(7).choices("abcdefghijkmnopqrstuvwxyz0123456789", k=20))
WANDB_KEY = "".join(random.Random(8).choices("0123456789abcdef", k=40))
SECRETS = (HF_TOKEN, WANDB_KEY)


def write_recipe(root: Path, teacher: Path) -> Path:
    rng = random.Random(0)
    words = {"pos": ["bueno", "genial"], "neg": ["malo", "roto"]}
    for split, n in (("train", 32), ("validation", 8), ("test", 8)):
        lines = []
        for _ in range(n):
            label = rng.choice(sorted(words))
            lines.append(json.dumps({"text": f"el producto es {rng.choice(words[label])}", "label": label}) + "\n")
        (root / f"{split}.jsonl").write_text("".join(lines))
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"""# security: distill run recipe.yaml (tokens only in the environment)
task: {{family: classification, name: tiny}}
data:
  files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}
  max_length: 32
teacher: {{model: {teacher}, epochs: 2}}
student: {{num_layers: 1}}
train: {{lr: 1e-3, batch_size: 8, epochs: 1, logging_steps: 1, checkpoint_steps: 2}}
tracking: {{report_to: [wandb], project: security-test}}
hub: {{org: someone}}
output_dir: {root}/run
seed: 3
"""
    )
    return recipe


def leaks(folder: Path) -> list[str]:
    """Files under `folder` whose bytes contain a secret (binary files included)."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path} holds {s[:6]}..." for s in SECRETS if s.encode() in data]
    return found


@pytest.mark.slow
def test_tokens_from_the_environment_are_never_written(tmp_path, monkeypatch, capfd, tiny_bert_dir):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", HF_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    recipe = write_recipe(tmp_path, tiny_bert_dir)
    run = tmp_path / "run"

    # preempted at step 3: the checkpoints (pickled RNG states, optimizer, loop state) stay on disk
    original = train.Trainee.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train.Trainee, "forward", forward)
        with pytest.raises(SystemExit):
            main(["teacher", str(recipe)])
    assert list((run / "teacher" / "checkpoints").glob("step-*/random_states_0.pkl"))
    assert leaks(run) == []

    assert main(["run", str(recipe)]) == 0
    assert main(["export", str(run / "student")]) == 0
    written = [p.name for p in run.rglob("*") if p.is_file()]
    assert {"config.yaml", "log.jsonl", "metrics.json", "README.md", "model.safetensors"} <= set(written)
    assert list((tmp_path / "wandb").rglob("*.wandb")), "wandb wrote no offline run to check"
    assert leaks(run) == []
    assert leaks(tmp_path / "wandb") == []
    out, err = capfd.readouterr()
    assert not any(s in out or s in err for s in SECRETS)


def test_a_token_cannot_be_put_in_a_recipe(tmp_path, capsys, tiny_bert_dir):
    recipe = write_recipe(tmp_path, tiny_bert_dir)
    assert main(["run", str(recipe), f"hub.token={HF_TOKEN}"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'hub.token'" in err
    assert HF_TOKEN not in err


def test_pickle_weights_are_refused_unopened(tmp_path, capsys, tiny_bert_dir):
    """A model folder with only pytorch_model.bin (here a pickle that would write a file when
    unpickled) is refused with a message naming safetensors; the pickle never runs."""
    folder = tmp_path / "pickle-model"
    save_tiny(tiny_bert_config(), folder, minilm_path())
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "the pickle ran"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    recipe = write_recipe(tmp_path, tiny_bert_dir)
    code = main(["student", str(recipe), "student.num_layers=null", f"student.model={folder}", "teacher.model=null",
                 "tracking.report_to=[]"])
    assert code == 2
    assert "no file named model.safetensors" in capsys.readouterr().err
    assert not marker.exists()


def custom_code_model(folder: Path, marker: Path) -> Path:
    """A model folder whose config points at code in the folder (auto_map); importing that code
    writes `marker`."""
    save_tiny(tiny_bert_config(), folder, minilm_path())
    (folder / "custom_bert.py").write_text(
        f"""from pathlib import Path
Path({str(marker)!r}).write_text("remote code ran")
from transformers import BertConfig, BertForSequenceClassification


class CustomBertConfig(BertConfig):
    model_type = "custom-bert"


class CustomBertForSequenceClassification(BertForSequenceClassification):
    config_class = CustomBertConfig
"""
    )
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "custom-bert"
    config["auto_map"] = {
        "AutoConfig": "custom_bert.CustomBertConfig",
        "AutoModelForSequenceClassification": "custom_bert.CustomBertForSequenceClassification",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_runs_only_when_the_recipe_allows_it(tmp_path, capsys, caplog, tiny_bert_dir):
    marker = tmp_path / "ran"
    folder = custom_code_model(tmp_path / "custom", marker)
    recipe = write_recipe(tmp_path, tiny_bert_dir)
    # off by default: refused with the way out named, and the code never imported
    code = main(["student", str(recipe), "student.num_layers=null", f"student.model={folder}", "teacher.model=null",
                 "tracking.report_to=[]"])
    assert code == 2
    assert "trust_remote_code=True" in capsys.readouterr().err
    assert not marker.exists()
    # turned on explicitly: it runs, with a warning
    with caplog.at_level(logging.WARNING, logger="distill"):
        model = models.load_model(str(folder), AutoModelForSequenceClassification, trust_remote_code=True)
    assert type(model).__name__ == "CustomBertForSequenceClassification"
    assert marker.exists()
    assert any("trust_remote_code is on" in r.getMessage() for r in caplog.records)
