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
import socket
import subprocess
import sys
import threading
import time
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
    original, calls = cache._Teacher.__call__, {"n": 0}

    def signalled(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:  # the first batch after the probe: the temporary folder exists
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(cache._Teacher, "__call__", signalled)
    with pytest.raises(SystemExit) as info:
        main(["student", str(recipe), *overrides])
    assert info.value.code == 75 and calls["n"] == 2
    assert "before training started" in capsys.readouterr().err
    assert not list((run / "teacher_cache").glob(".tmp-*"))
    assert not (run / "student" / "config.yaml").exists()
    monkeypatch.setattr(cache._Teacher, "__call__", original)
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


# ---------------------------------------------------------------------------------------------
# Locks with a heartbeat; readers of a folder; the status read under the lock
# ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def write_lock(path: Path, **info) -> None:
    """A lock file as another holder writes it (whole, through a rename)."""
    tmp = path.with_name(path.name + ".test")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def test_a_lock_from_another_host_is_taken_over_once_its_heartbeat_is_stale(tmp_path, monkeypatch, capsys):
    """A holder on another host cannot be asked whether it runs: its heartbeat says. One that
    stopped beating (SIGKILL, a lost node) is taken over after DISTILL_LOCK_STALE_S, naming it."""
    monkeypatch.setenv(stage.STALE_ENV, "1")
    folder = tmp_path / "stage"
    folder.mkdir()
    write_lock(folder / stage.LOCK_FILE, host="node-7", pid=4242, beat=time.time())
    start = time.monotonic()
    with stage.StageLock(folder):
        waited = time.monotonic() - start
        out = capsys.readouterr().out
        assert json.loads((folder / stage.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert waited >= 0.5, waited  # it waited for the heartbeat to go stale
    assert "locked by process 4242 on node-7" in out and "waiting up to" in out
    assert "taking over a stale lock" in out and "held by process 4242 on node-7" in out
    assert not (folder / stage.LOCK_FILE).exists()


def test_a_live_holder_on_another_host_is_refused_as_soon_as_it_beats(tmp_path, monkeypatch):
    monkeypatch.setenv(stage.STALE_ENV, "5")
    folder = tmp_path / "stage"
    folder.mkdir()
    stop = threading.Event()

    def holder() -> None:
        while not stop.wait(0.1):
            write_lock(folder / stage.LOCK_FILE, host="node-7", pid=4242, beat=time.time())

    write_lock(folder / stage.LOCK_FILE, host="node-7", pid=4242, beat=time.time())
    thread = threading.Thread(target=holder)
    thread.start()
    try:
        start = time.monotonic()
        with pytest.raises(stage.StageError, match="is in use by process 4242 on node-7"):
            stage.StageLock(folder).__enter__()
        assert time.monotonic() - start < 3
    finally:
        stop.set()
        thread.join()


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setenv(stage.STALE_ENV, "1")  # a beat every 0.1 s
    folder = tmp_path / "stage"
    folder.mkdir()
    with stage.StageLock(folder, what="stage teacher"):
        first = json.loads((folder / stage.LOCK_FILE).read_text())
        time.sleep(0.6)
        later = json.loads((folder / stage.LOCK_FILE).read_text())
    assert later["beat"] > first["beat"] and later["token"] == first["token"] and later["what"] == "stage teacher"
    assert [p.name for p in folder.iterdir()] == []  # released, no temporary file left


def test_a_damaged_lock_is_named_damaged_and_judged_by_its_age(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(stage.STALE_ENV, "1")
    folder = tmp_path / "stage"
    folder.mkdir()
    lock = folder / stage.LOCK_FILE
    lock.write_bytes(b'{"host": "node-7", "pi')  # cut short
    with stage.StageLock(folder):
        out = capsys.readouterr().out
    assert "the lock file is damaged" in out and "taking over a stale lock" in out
    assert "process None" not in out
    lock.write_bytes(b"\x00\x13\x00")  # garbage, last written long ago: taken over at once
    os.utime(lock, (time.time() - 60, time.time() - 60))
    start = time.monotonic()
    with stage.StageLock(folder):
        pass
    assert time.monotonic() - start < 0.5
    assert "the lock file is damaged" in capsys.readouterr().out


def test_a_stage_killed_by_sigkill_resumes_on_another_host_with_the_uninterrupted_weights(setup, tmp_path, monkeypatch, capsys):
    """SIGKILL (OOM, a failed node) leaves the lock behind; the same command requeued on another
    host waits for the lock's heartbeat to go stale, takes it over naming the old holder, resumes
    from the last checkpoint and ends on the weights of a run never interrupted."""
    _, recipe, reference = setup
    run = tmp_path / "run"
    env = {**os.environ, "KILL_AT_STEP": "6", stage.STALE_ENV: "2", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "stage_killed.py"), "teacher", str(recipe), f"output_dir={run}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    lock = json.loads((run / "teacher" / stage.LOCK_FILE).read_text())
    assert lock["host"] == socket.gethostname() and lock["what"] == "stage teacher"
    assert (run / "teacher" / "checkpoints" / "step-6").is_dir()

    monkeypatch.setenv(stage.STALE_ENV, "2")
    monkeypatch.setattr(stage.socket, "gethostname", lambda: "another-node")  # the requeue lands elsewhere
    assert main(["teacher", str(recipe), f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert f"held by process {lock['pid']} on {lock['host']}" in out
    assert "resuming teacher from" in out and "step-6" in out
    assert max_diff(weights(run), weights(reference)) <= 1e-6
    assert not (run / "teacher" / stage.LOCK_FILE).exists()


def test_the_status_is_read_under_the_lock(setup, tmp_path, monkeypatch, capsys):
    """A run that finishes the stage between this run's first look and its lock: this run sees
    it complete under the lock and skips it, instead of training it again from scratch."""
    _, recipe, reference = setup
    run = tmp_path / "run"
    taking = stage.StageLock.__enter__

    def finished_meanwhile(self):
        shutil.copytree(reference / "teacher", run / "teacher", dirs_exist_ok=True)  # the other run's result
        return taking(self)

    monkeypatch.setattr(stage.StageLock, "__enter__", finished_meanwhile)
    forwards = count_forwards(monkeypatch)
    assert main(["teacher", str(recipe), f"output_dir={run}"]) == 0
    assert "complete with the same config, skipping" in capsys.readouterr().out
    assert forwards["n"] == 0
    assert max_diff(weights(run), weights(reference)) == 0


def count_forwards(monkeypatch) -> dict:
    import distill.loop.train as train

    forwards = {"n": 0}
    original = train.Trainee.forward

    def counting(self, *args, **kwargs):
        forwards["n"] += self.training
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train.Trainee, "forward", counting)
    return forwards


def test_a_teacher_being_read_is_not_overwritten_by_another_run(setup, tmp_path, monkeypatch, capsys):
    """`distill run ... overwrite=true` started while another run's student reads the teacher:
    the teacher stage refuses, naming the reader, and the teacher stays as it was."""
    import distill.loop.train as train

    _, recipe, reference = setup
    run = tmp_path / "run"
    shutil.copytree(reference / "teacher", run / "teacher")
    before = {p: b for p, b in snapshot(run / "teacher").items()}
    second = {}
    original = train.Trainee.forward

    def forward(self, *args, **kwargs):
        if self.training and not second:  # the other run starts while this student trains
            marks = list((run / "teacher").glob(".reader-*"))
            second["marks"] = [json.loads(m.read_text()) for m in marks]
            second["code"] = main(["teacher", str(recipe), f"output_dir={run}", "overwrite=true", "train.lr=5e-4"])
            second["err"] = capsys.readouterr().err
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train.Trainee, "forward", forward)
    assert main(["student", str(recipe), f"output_dir={run}", "train.epochs=1"]) == 0
    assert len(second["marks"]) == 1 and second["marks"][0]["what"].startswith("stage student")
    assert second["code"] == 2
    assert f"{run / 'teacher'} is being read by process {os.getpid()}" in second["err"]
    assert snapshot(run / "teacher") == before  # nothing wiped, nothing retrained
    assert not list((run / "teacher").glob(".reader-*"))  # the student's mark is gone with it


def test_a_reader_refuses_a_folder_being_written_and_stale_marks_expire(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(stage.STALE_ENV, "1")
    folder = tmp_path / "teacher"
    folder.mkdir()
    with stage.StageLock(folder, what="stage teacher"):
        with pytest.raises(stage.StageError, match=r"is being written by process \d+ on .*\(stage teacher\)"):
            stage.ReaderMark(folder, "stage student").__enter__()
    assert not list(folder.glob(".reader-*"))
    with stage.ReaderMark(folder, "stage student"):
        with pytest.raises(stage.StageError, match="is being read by"):
            stage.check_no_readers(folder)
    mark = folder / ".reader-node-7-4242-abc"
    write_lock(mark, host="node-7", pid=4242, beat=time.time() - 30, what="stage student")
    os.utime(mark, (time.time() - 30, time.time() - 30))
    stage.check_no_readers(folder)  # its heartbeat stopped half a minute ago
    assert "removing a stale reader mark" in capsys.readouterr().out
    assert not list(folder.glob(".reader-*"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Caches checked before they are trusted; transfer sets in the data's identity
# ---------------------------------------------------------------------------------------------


def student_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "student" / "model" / "model.safetensors"))


def test_a_damaged_teacher_cache_is_built_again_never_trained_on(setup, tmp_path, caplog):
    """Flipped bits are reused silently, and a file cut short fails every re-run with a pyarrow
    traceback, unless the cache checks its checksums: then both are rebuilt, named, and the
    student trained on the rebuilt cache equals the one trained on the first."""
    _, recipe, reference = setup
    shared = tmp_path / "cache"
    args = [f"teacher.dir={reference / 'teacher'}", f"distill.cache_dir={shared}", "distill.teacher_outputs=cached",
            "train.epochs=1"]
    assert main(["student", str(recipe), f"output_dir={tmp_path / 'first'}", *args]) == 0
    (folder,) = shared.iterdir()
    assert files.verify_checksums(folder) is None
    data_file = max((p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".json")),
                    key=lambda p: p.stat().st_size)  # the stored targets
    pristine = data_file.read_bytes()
    for damage in ("flipped", "truncated"):
        data = bytearray(pristine)
        if damage == "flipped":
            for at in range(len(data) // 2, len(data) - 64, 97):  # bits in the stored targets
                data[at] ^= 0x40
        else:
            data = data[: len(data) // 3]
        data_file.write_bytes(bytes(data))
        caplog.clear()
        run = tmp_path / damage
        assert main(["student", str(recipe), f"output_dir={run}", *args]) == 0, damage
        assert f"teacher cache {folder} is damaged" in caplog.text and "building it again" in caplog.text
        assert files.verify_checksums(folder) is None and data_file.read_bytes() == pristine
        assert max_diff(student_weights(run), student_weights(tmp_path / "first")) == 0, damage


def test_changed_transfer_rows_are_not_resumed_into(setup, tmp_path, monkeypatch, capsys):
    """Transfer rows are part of the data a student was trained on: 40 rows cut to 10 between a
    SIGTERM and the resume are noticed, as edited splits are."""
    _, recipe, reference = setup
    transfer = tmp_path / "unlabelled.txt"
    words = ["bueno", "malo", "normal", "genial", "roto", "regular", "caro", "barato"]
    transfer.write_text("".join(f"el envío llegó {words[i % 8]} hoy {i}\n" for i in range(40)))
    run = tmp_path / "run"
    args = ["student", str(recipe), f"output_dir={run}", f"teacher.dir={reference / 'teacher'}",
            f"data.transfer=[{{files: [{transfer}]}}]", "train.checkpoint_steps=2"]
    with monkeypatch.context() as patch:
        sigterm_at_forward(patch, 3)
        with pytest.raises(SystemExit) as info:
            main(args)
    assert info.value.code == 75
    recorded = json.loads((run / "student" / stage.DATA_FILE).read_text())
    assert "data.transfer[0]" in recorded
    transfer.write_text("".join(transfer.read_text().splitlines(keepends=True)[:10]))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "was trained on other data (data.transfer[0] changed since)" in err
    assert (run / "student" / "checkpoints").is_dir()  # nothing lost: the old run is still there


def test_a_moved_teacher_is_the_same_teacher_and_a_changed_one_is_named(setup, tmp_path, capsys):
    """Through `distill run`: a fine-tuned teacher folder moved elsewhere (`teacher.dir`) keeps the
    finished student complete; a student whose fine-tuned teacher is given by path
    (`teacher.model`, finetuned) and now points elsewhere is refused naming that key."""
    _, recipe, reference = setup
    shared, moved = tmp_path / "shared-teacher", tmp_path / "moved-teacher"
    shutil.copytree(reference / "teacher", shared)
    run = tmp_path / "run"
    assert main(["run", str(recipe), f"output_dir={run}", f"teacher.dir={shared}"]) == 0
    shared.rename(moved)
    capsys.readouterr()
    assert main(["run", str(recipe), f"output_dir={run}", f"teacher.dir={moved}"]) == 0
    assert "student: complete with the same config, skipping" in capsys.readouterr().out

    given = tmp_path / "given"
    args = ["run", str(recipe), f"output_dir={given}", "teacher.finetuned=true"]
    assert main([*args, f"teacher.model={moved / 'model'}"]) == 0
    (moved / "model").rename(tmp_path / "model-elsewhere")
    capsys.readouterr()
    assert main([*args, f"teacher.model={tmp_path / 'model-elsewhere'}"]) == 2
    err = capsys.readouterr().err
    assert f"{given / 'student'} holds a run with a different config (differs in: teacher.model)" in err
    assert "overwrite=true" in err
