"""A stage folder can be trusted: damaged checkpoints are skipped for the last good one, changed
data is never resumed into nor skipped as complete, one process at a time owns a folder, a
signal before training exits 75 leaving no temporary folder, a full disk fails with a message,
and keys that do not change a stage's result do not make a finished stage "different".

Runs are the teacher stage of the resume tests' tiny recipe (8 steps per epoch, 2 epochs, a
checkpoint every 3 steps, the 2 newest kept).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from distill import files
from distill.teachers import cache
from distill.loop import folders as stage
from distill.loop.plan import plan_stage
from distill.loop.checkpoints import latest_checkpoint, verify
from distill.cli import main
from distill.config import load_config
from tests.test_resume import max_diff, sigterm_at_forward, weights, write_data, write_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("trust")
    write_data(root)
    recipe = write_recipe(root, tiny_bert_dir)
    reference = root / "uninterrupted"
    assert main(["teacher", str(recipe), f"output_dir={reference}"]) == 0
    return root, recipe, reference


def stopped_run(recipe: Path, run: Path, at: int, monkeypatch) -> Path:
    """A teacher stage stopped by SIGTERM at training forward `at`; its checkpoint folder."""
    with monkeypatch.context() as patch:
        sigterm_at_forward(patch, at)
        with pytest.raises(SystemExit) as info:
            main(["teacher", str(recipe), f"output_dir={run}"])
    assert info.value.code == 75
    return run / "teacher" / "checkpoints"


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_checkpoint_is_skipped_for_the_previous_good_one(setup, tmp_path, monkeypatch, capsys, caplog, damage):
    _, recipe, reference = setup
    run = tmp_path / "run"
    ckpts = stopped_run(recipe, run, 11, monkeypatch)
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-11", "step-9"]
    weights_file = next((ckpts / "step-11").rglob("model.safetensors"))
    data = bytearray(weights_file.read_bytes())
    if damage == "flipped":
        data[len(data) // 2] ^= 0xFF
        weights_file.write_bytes(bytes(data))
    else:
        weights_file.write_bytes(bytes(data[: len(data) // 3]))
    assert "changed since they were written" in verify(ckpts / "step-11")
    assert verify(ckpts / "step-9") is None
    assert latest_checkpoint(ckpts, verified=True).name == "step-9"

    assert main(["teacher", str(recipe), f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "resuming teacher from" in out and "step-9 (epoch 1, batch 1, step 9)" in out
    assert "step-11 is not usable" in caplog.text
    assert max_diff(weights(run), weights(reference)) <= 1e-6  # resumed from step 9, same result


def test_changed_data_is_not_resumed_into_nor_skipped_as_complete(setup, tmp_path, monkeypatch, capsys):
    root, recipe, reference = setup
    data = tmp_path / "data"
    shutil.copytree(root, data, ignore=shutil.ignore_patterns("uninterrupted", "recipe.yaml"))
    moved = write_recipe(data, Path(load_config(recipe).teacher.model))
    run = tmp_path / "run"
    stopped_run(moved, run, 5, monkeypatch)
    train_file = data / "train.jsonl"
    lines = train_file.read_text().splitlines()
    train_file.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same rows, another order
    assert main(["teacher", str(moved), f"output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "was trained on other data (splits ['train'] changed since)" in err
    assert sorted(p.name for p in (run / "teacher" / "checkpoints").glob("step-*")) == ["step-3", "step-5"]

    # a finished stage whose validation file was edited is not "complete"
    assert main(["teacher", str(moved), f"output_dir={run}", "overwrite=true"]) == 0
    rows = [json.loads(line) for line in (data / "validation.jsonl").read_text().splitlines()]
    rows[0]["text"] += " otra"
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["teacher", str(moved), f"output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "complete" not in err and "splits ['validation'] changed" in err


def test_a_second_run_on_a_locked_folder_stops_at_once(setup, tmp_path, capsys):
    _, recipe, _ = setup
    run = tmp_path / "run"
    (run / "teacher").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = run / "teacher" / stage.LOCK_FILE
        lock.write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid}))
        assert main(["teacher", str(recipe), f"output_dir={run}"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {holder.pid}" in err
        assert lock.exists() and not (run / "teacher" / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over
    assert main(["teacher", str(recipe), f"output_dir={run}", "train.epochs=1"]) == 0
    assert "taking over a stale lock" in capsys.readouterr().out
    assert not lock.exists()


def test_sigterm_while_the_cache_builds_exits_75_and_leaves_no_temp_folder(setup, tmp_path, monkeypatch, capsys):
    _, recipe, reference = setup
    run = tmp_path / "run"
    overrides = [f"output_dir={run}", f"teacher.dir={reference / 'teacher'}", "train.epochs=1"]
    original = cache._batch_table

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(cache, "_batch_table", signalled)
    with pytest.raises(SystemExit) as info:
        main(["student", str(recipe), *overrides])
    assert info.value.code == 75
    assert "before training started" in capsys.readouterr().err
    assert not list((run / "teacher_cache").glob(".tmp-*"))
    assert not (run / "student" / "config.yaml").exists()
    monkeypatch.setattr(cache, "_batch_table", original)
    assert main(["student", str(recipe), *overrides]) == 0


def test_a_full_disk_fails_with_a_message_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch, capsys):
    _, recipe, _ = setup
    run = tmp_path / "run"
    usage = namedtuple("usage", "total used free")
    saves = {"n": 0}
    real = shutil.disk_usage

    def disk_usage(path):
        if "checkpoints" in str(path):
            saves["n"] += 1
            if saves["n"] == 2:  # the second checkpoint finds the disk full
                return usage(10**9, 10**9, 1024)
        return real(path)

    monkeypatch.setattr(files.shutil, "disk_usage", disk_usage)
    assert main(["teacher", str(recipe), f"output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "not enough disk space to write a checkpoint" in err and "MiB free" in err
    assert [p.name for p in (run / "teacher" / "checkpoints").glob("step-*")] == ["step-3"]
    assert verify(run / "teacher" / "checkpoints" / "step-3") is None


def test_keys_that_do_not_change_a_result_keep_a_finished_stage(setup, tmp_path):
    _, recipe, reference = setup
    same = load_config(recipe, [f"output_dir={reference}"])
    assert stage.check_stage_dir(plan_stage(same, "teacher")) == "complete"
    other = load_config(recipe, [
        f"output_dir={reference}", "run.baseline=true", "train.logging_steps=7", "train.checkpoint_steps=0",
        "train.keep_checkpoints=5", "distill.teacher_outputs=online", "tracking.project=x",
    ])
    assert stage.check_stage_dir(plan_stage(other, "teacher")) == "complete"
    changed = load_config(recipe, [f"output_dir={reference}", "train.lr=1e-4"])
    with pytest.raises(stage.StageError, match="different config"):
        stage.check_stage_dir(plan_stage(changed, "teacher"))
    # a finished teacher folder copied elsewhere (teacher.dir) is the same teacher, still complete
    copy = tmp_path / "shared-teacher"
    shutil.copytree(reference / "teacher", copy)
    moved = load_config(recipe, [f"output_dir={tmp_path / 'elsewhere'}", f"teacher.dir={copy}"])
    assert stage.check_stage_dir(plan_stage(moved, "teacher")) == "complete"
    other_teacher = load_config(recipe, [f"output_dir={tmp_path / 'elsewhere'}", f"teacher.dir={copy}", "teacher.lr=1e-3"])
    with pytest.raises(stage.StageError, match="different config"):
        stage.check_stage_dir(plan_stage(other_teacher, "teacher"))


def test_a_dry_writability_check_creates_nothing(tmp_path, monkeypatch):
    """Preflight runs on every process of a launch at once: a dry check that created (and then
    removed) the output folders could remove a folder another process was probing, failing it
    with "not writable". The dry check creates no folder at all."""
    target = tmp_path / "a" / "b" / "c"
    made = []
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        made.append(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    stage.check_writable(target, keep=False)
    assert made == []
    assert list(tmp_path.iterdir()) == []
    stage.check_writable(target)  # a real stage creates its folder
    assert target.is_dir()


def test_preprocessing_fingerprint_follows_the_code(monkeypatch):
    """Cached features are named by the preprocessing code too: after an upgrade that changes a
    task's module, datasets never serves features made by the old code."""
    from datasets import Dataset

    from distill.config import Config
    from distill.tasks import base
    from distill.tasks.classification import ClassificationTask
    from distill.tasks.tagging import TaggingTask

    assert base._code_digest(ClassificationTask) == base._code_digest(ClassificationTask)
    assert base._code_digest(ClassificationTask) != base._code_digest(TaggingTask)
    task = ClassificationTask(Config().task, Config().data)
    raw = Dataset.from_dict({"text": ["hola"], "label": [0]})
    before = task.features_fingerprint(raw, "train")
    assert task.features_fingerprint(raw, "train") == before
    monkeypatch.setattr(base, "_code_digest", lambda cls: "an upgraded module")
    assert task.features_fingerprint(raw, "train") != before
