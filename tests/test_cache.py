"""The teacher-output cache: same loss as the online teacher, keyed rebuilds, trimmed rows for
every task family, hidden states on request, disk-space checks, and a 2-process build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    RobertaConfig,
)

from tests.conftest import SPANISH, online_teacher, pair, teacher_outputs, tiny_bert_config
from distill.teachers import cache
from distill.teachers.teacher import CachedTeacher
from distill.config import Config
from distill.objective.losses import HiddenStateLoss, SoftLabelLoss
from distill.data.sampling import LengthGroupedBatchSampler
from distill.tasks.classification import ClassificationTask
from distill.tasks.qa import QATask
from distill.tasks.tagging import TaggingTask

TESTS = Path(__file__).parent
TAGS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
KD = SoftLabelLoss("kl", temperature=2.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine spinning threads
    cost more than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def tok(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def bpe_tok(tiny_roberta_dir):
    return AutoTokenizer.from_pretrained(tiny_roberta_dir)


def make_cfg(tmp_path: Path, family: str = "classification", **data) -> Config:
    cfg = Config()
    cfg.task.family = family
    cfg.student.model = "student"
    cfg.output_dir = str(tmp_path / "run")
    cfg.train.batch_size = 4
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def sharpen(model: torch.nn.Module, scale: float = 30.0) -> torch.nn.Module:
    """Random tiny heads give logits near 0; scaled ones give the KD loss something to measure."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(scale)
    return model.eval()


def seeded(factory, config, seed: int = 0):
    torch.manual_seed(seed)
    return factory.from_config(config)


def roberta_config(tokenizer, **kw) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id, **kw,
    )


# --- tasks and features built in code -------------------------------------------------------


def classification(cfg: Config, tok, teacher_tok=None, texts=None) -> tuple[ClassificationTask, Dataset]:
    texts = texts or [f"{a} {b}" if i % 3 else a for i, (a, b) in enumerate(zip(SPANISH * 4, SPANISH[1:] * 5))]
    raw = DatasetDict(train=Dataset.from_dict({"text": texts, "label": [i % 3 for i in range(len(texts))]}))
    task = ClassificationTask(cfg.task, cfg.data)
    task.setup(raw)
    task.bind(tok, teacher_tok)
    return task, task.preprocess(raw["train"], "train")


def tagging(cfg: Config, tok, teacher_tok=None) -> tuple[TaggingTask, Dataset]:
    rng = np.random.default_rng(0)
    sentences = [s.split() for s in SPANISH] + [(SPANISH[i] + " " + SPANISH[i + 1]).split() for i in range(6)]
    rows = {"tokens": sentences, "tags": [rng.integers(0, len(TAGS), len(s)).tolist() for s in sentences]}
    raw = DatasetDict(train=Dataset.from_dict(rows, features=Features({"tokens": List(Value("string")), "tags": List(ClassLabel(names=TAGS))})))
    cfg.data.columns = {"tokens": "tokens", "tags": "tags"}
    task = TaggingTask(cfg.task, cfg.data)
    task.setup(raw)
    task.bind(tok, teacher_tok)
    return task, task.preprocess(raw["train"], "train")


def qa(cfg: Config, tok) -> tuple[QATask, Dataset]:
    rows = [json.loads(line) for line in (TESTS / "data" / "squad_flat.jsonl").read_text().splitlines()]
    context = " ".join(SPANISH)
    for i, sentence in enumerate(SPANISH):
        word = sentence.split()[1]
        rows.append({
            "id": f"s{i}", "title": "", "context": context, "question": f"¿{sentence.split()[0]}?",
            "answers": {"text": [word], "answer_start": [context.index(sentence) + len(sentence.split()[0]) + 1]},
        })
    raw = DatasetDict(train=Dataset.from_list(rows))
    task = QATask(cfg.task, cfg.data)
    task.setup(raw)
    task.bind(tok)
    return task, task.preprocess(raw["train"], "train")


def shuffled_batches(task, features: Dataset, batch_size: int = 4, epochs: int = 2):
    sampler = LengthGroupedBatchSampler(features["length"], batch_size, shuffle=True, seed=11, group_size=2)
    loader = DataLoader(features, batch_sampler=sampler, collate_fn=task.collate)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        yield from loader


def assert_same_kd_loss(task, student, teacher, features, fn, accelerator, epochs: int = 2) -> int:
    """Cached and online teachers give the same KD loss on every shuffled batch."""
    online = online_teacher(teacher, task, accelerator, hidden=False)
    checked = 0
    for batch in shuffled_batches(task, features, epochs=epochs):
        with torch.no_grad():
            s = task.kd_targets(student(**task.model_inputs(batch)), batch, teacher=False)
        cached, hidden = pair(fn(batch))
        live, _ = pair(online(batch))
        assert hidden is None and set(cached) == set(live)
        loss_cached = KD(task.kd_pairs(s, cached, batch))
        loss_online = KD(task.kd_pairs(s, live, batch))
        assert float(loss_online) > 1e-3  # a loss that measures something
        assert float(loss_cached) == pytest.approx(float(loss_online), rel=2e-3, abs=1e-4)
        checked += 1
    return checked


# --- same loss, cached or online ------------------------------------------------------------


@pytest.mark.parametrize("own_teacher_tokenizer", [False, True])
def test_classification_cached_matches_online(tmp_path, tok, bpe_tok, accelerator, own_teacher_tokenizer):
    cfg = make_cfg(tmp_path, max_length=24)
    if own_teacher_tokenizer:  # the teacher reads its own teacher_ inputs
        task, feats = classification(cfg, tok, bpe_tok)
        teacher = sharpen(seeded(AutoModelForSequenceClassification, roberta_config(bpe_tok, num_labels=3)))
        assert "teacher_input_ids" in feats.column_names
    else:
        task, feats = classification(cfg, tok)
        teacher = sharpen(seeded(AutoModelForSequenceClassification, tiny_bert_config(num_labels=3)))
    student = seeded(AutoModelForSequenceClassification, tiny_bert_config(num_labels=3), seed=1).eval()
    fn = teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=False)
    assert isinstance(fn, CachedTeacher)
    assert assert_same_kd_loss(task, student, teacher, feats, fn, accelerator) == 2 * -(-len(feats) // 4)
    # stored as float16, one [labels] row per feature, every feature once
    assert fn.cache.specs["logits"].dtype == "float16"
    ids = np.load(fn.cache.path / "shard-00000" / "feature_id.npy")
    assert sorted(ids.tolist()) == list(range(len(feats)))
    rows = fn.cache.gather([5, 0, 5])["logits"]
    assert rows.shape == (3, 3) and rows.dtype == torch.float16 and torch.equal(rows[0], rows[2])


def test_tagging_rows_are_trimmed_to_words_and_match_online(tmp_path, tok, bpe_tok, accelerator):
    for own in (False, True):
        cfg = make_cfg(tmp_path / str(own), family="tagging", max_length=12, doc_stride=4)
        task, feats = tagging(cfg, tok, bpe_tok if own else None)
        assert len(feats) > len(set(feats["example_id"]))  # long sentences gave several windows
        config = roberta_config(bpe_tok, num_labels=len(TAGS)) if own else tiny_bert_config(num_labels=len(TAGS))
        teacher = sharpen(seeded(AutoModelForTokenClassification, config))
        student = seeded(AutoModelForTokenClassification, tiny_bert_config(num_labels=len(TAGS)), seed=1).eval()
        fn = teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=False)
        for fid, words in enumerate(feats["num_words"]):
            assert fn.cache.count["word_logits"][fid] == fn.cache.count["word_mask"][fid] == words
            assert fn.cache.gather([fid])["word_logits"].shape == (1, words, len(TAGS))
        assert assert_same_kd_loss(task, student, teacher, feats, fn, accelerator, epochs=1) > 0


def test_qa_rows_are_trimmed_to_the_window_and_match_online(tmp_path, tok, accelerator):
    cfg = make_cfg(tmp_path, family="qa", max_length=40, doc_stride=12)
    task, feats = qa(cfg, tok)
    assert len(feats) > len(set(feats["example_id"]))
    teacher = sharpen(seeded(AutoModelForQuestionAnswering, tiny_bert_config()), scale=10.0)
    student = seeded(AutoModelForQuestionAnswering, tiny_bert_config(), seed=1).eval()
    fn = teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=False)
    for fid, length in enumerate(feats["length"]):
        assert fn.cache.gather([fid], ["start_logits"])["start_logits"].shape == (1, length)
    assert assert_same_kd_loss(task, student, teacher, feats, fn, accelerator, epochs=1) > 0


# --- the key: reuse and rebuilds -------------------------------------------------------------


def count_forwards(model: torch.nn.Module) -> list[int]:
    """Rows the model has run on, updated by a forward hook."""
    seen = [0]
    model.register_forward_hook(lambda m, args, kwargs, out: seen.__setitem__(0, seen[0] + len(kwargs["input_ids"])), with_kwargs=True)
    return seen


def test_cache_is_reused_when_nothing_changed_and_rebuilt_when_anything_did(tmp_path, tok, bpe_tok, accelerator):
    cfg = make_cfg(tmp_path, max_length=24)
    task, feats = classification(cfg, tok)
    teacher = sharpen(seeded(AutoModelForSequenceClassification, tiny_bert_config(num_labels=3)))
    rows = count_forwards(teacher)

    def build(cfg=cfg, task=task, teacher=teacher, feats=feats) -> Path:
        return teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=False).cache.path

    first = build()
    assert rows[0] == len(feats) + 2  # one pass, plus the 2-row probe
    assert build() == first and rows[0] == len(feats) + 2  # reused: the teacher never ran
    paths = {first}

    # teacher weights
    changed = sharpen(seeded(AutoModelForSequenceClassification, tiny_bert_config(num_labels=3)))
    with torch.no_grad():
        changed.bert.encoder.layer[1].output.dense.bias[0] += 1e-3
    paths.add(build(teacher=changed))
    # tokenizer (same features, another definition)
    other_tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    other_tok.add_tokens(["madrileño"])
    task_tok = ClassificationTask(cfg.task, cfg.data)
    task_tok.setup(DatasetDict(train=Dataset.from_dict({"text": ["a"], "label": [0]})))
    task_tok.labels = task.labels
    task_tok.bind(other_tok)
    paths.add(build(task=task_tok))
    # max length (same features: the option alone changes the key)
    shorter = make_cfg(tmp_path, max_length=16)
    paths.add(build(cfg=shorter))
    # data: one row edited
    def edit(row: dict, i: int) -> dict:
        ids = list(row["input_ids"])
        if i == 3:
            ids[1] += 1  # another word in row 3
        return {"input_ids": ids}

    edited = feats.map(edit, with_indices=True)
    assert edited["input_ids"] != feats["input_ids"]
    paths.add(build(feats=edited))
    # max_train_samples: a subset of the rows
    paths.add(build(feats=feats.select(range(10))))
    assert len(paths) == 6
    kept = sorted(p.name for p in (tmp_path / "run" / "teacher_cache").iterdir())
    assert kept == sorted(p.name for p in paths)  # complete folders only, no temporary ones
    assert json.loads((first / "metadata.json").read_text())["parts"]["max_length"] == 24


def test_data_fingerprint_follows_content_not_history(tok, tmp_path):
    cfg = make_cfg(tmp_path, max_length=24)
    _, a = classification(cfg, tok)
    _, b = classification(cfg, tok)
    assert cache.data_fingerprint(a) == cache.data_fingerprint(b)
    assert cache.data_fingerprint(a) != cache.data_fingerprint(a.select(range(1, len(a))))
    assert cache.data_fingerprint(a.select(range(5))) == cache.data_fingerprint(b.select(range(5)))


def test_a_failed_build_leaves_no_cache_behind(tmp_path, tok, accelerator, monkeypatch):
    cfg = make_cfg(tmp_path, max_length=24)
    task, feats = classification(cfg, tok)
    teacher = sharpen(seeded(AutoModelForSequenceClassification, tiny_bert_config(num_labels=3)))
    calls = [0]
    original = task.kd_targets

    def flaky(outputs, batch, teacher):
        calls[0] += 1
        if calls[0] == 3:  # the probe, one batch, then a crash
            raise RuntimeError("simulated crash")
        return original(outputs, batch, teacher)

    monkeypatch.setattr(task, "kd_targets", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=False)
    root = tmp_path / "run" / "teacher_cache"
    assert not [p for p in root.iterdir() if not p.name.startswith(".tmp-")]
    monkeypatch.setattr(task, "kd_targets", original)
    fn = teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=False)
    assert len(fn.cache) == len(feats)


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, tok, accelerator, monkeypatch):
    cfg = make_cfg(tmp_path, max_length=24)
    cfg.distill.cache_dir = str(tmp_path / "cache")
    task, feats = classification(cfg, tok)
    teacher = sharpen(seeded(AutoModelForSequenceClassification, tiny_bert_config(num_labels=3)))
    usage = cache.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: usage._replace(free=100))
    with pytest.raises(cache.CacheError, match=r"not enough disk space to write the teacher cache in .*: about \d+ MiB needed, 0 MiB free\. Point distill\.cache_dir") as err:
        teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=False)
    assert str(tmp_path / "cache") in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


# --- modes and hidden states ----------------------------------------------------------------


def test_teacher_outputs_modes(tmp_path, tok, accelerator):
    cfg = make_cfg(tmp_path, max_length=24)
    task, feats = classification(cfg, tok, texts=SPANISH)
    teacher = seeded(AutoModelForSequenceClassification, tiny_bert_config(num_labels=3)).eval()
    cfg.distill.teacher_outputs = "online"
    assert teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=False) is None
    cfg.distill.teacher_outputs = "auto"
    assert teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=True) is None  # hidden: online
    assert teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=False) is not None
    cfg.distill.teacher_outputs = "cached"
    with pytest.raises(cache.CacheError, match="cache_hidden_states=true"):
        teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=True)


# stored dtype -> (bytes per value, atol, rtol of the states, rtol of the hidden-state loss)
HIDDEN_DTYPES = {"float32": (4, 1e-5, 1e-5, 1e-5), "float16": (2, 5e-3, 2e-3, 1e-3), "bfloat16": (2, 3e-2, 1e-2, 1e-2)}


@pytest.mark.parametrize("dtype", list(HIDDEN_DTYPES))
def test_hidden_states_are_cached_on_request_with_their_size_printed(tmp_path, tok, accelerator, capsys, dtype):
    """float32 by default, 16-bit on request (distill.cache_hidden_dtype): half the disk, and the
    states and the hidden-state loss still match the online teacher's."""
    size, atol, rtol, loss_rtol = HIDDEN_DTYPES[dtype]
    cfg = make_cfg(tmp_path, max_length=24)
    cfg.student.model, cfg.student.num_layers = None, 1
    cfg.teacher.model = "teacher"
    cfg.distill.hidden_weight, cfg.distill.cache_hidden_states, cfg.distill.include_embeddings = 1.0, True, True
    cfg.distill.cache_hidden_dtype = dtype
    task, feats = classification(cfg, tok)
    teacher = seeded(AutoModelForSequenceClassification, tiny_bert_config(num_labels=3)).eval()
    fn = teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=True)
    tokens = sum(feats["length"])
    out = capsys.readouterr().out
    assert f"{len(feats)} features x 2 layers" in out
    assert f"x 32 x {size} bytes ({dtype}) = {cache._format_bytes(tokens * 2 * 32 * size)}" in out
    assert fn.cache.hidden_layers == [0, 2]  # embeddings + the last of 2 layers for a 1-layer student
    assert (fn.cache.path / "shard-00000" / "hidden_states_2.bin").stat().st_size == tokens * 32 * size
    assert fn.cache.metadata["parts"]["hidden_dtype"] == dtype

    loss = HiddenStateLoss(1, 2, 32, 32, include_embeddings=True)
    online = online_teacher(teacher, task, accelerator, hidden=True)
    student = seeded(AutoModelForSequenceClassification, tiny_bert_config(layers=1, num_labels=3), seed=2).eval()
    for batch in shuffled_batches(task, feats, epochs=1):
        targets, hidden = pair(fn(batch))
        live_targets, live_hidden = pair(online(batch))
        assert hidden[1] is None and len(hidden) == len(live_hidden) == 3
        for j in (0, 2):
            mask = batch["attention_mask"].bool()
            assert hidden[j].shape == live_hidden[j].shape and hidden[j].dtype == torch.float32
            torch.testing.assert_close(hidden[j][mask], live_hidden[j][mask], atol=atol, rtol=rtol)
            assert not hidden[j][~mask].any()  # padding positions are zeros
        with torch.no_grad():
            s_hidden = student(**task.model_inputs(batch), output_hidden_states=True).hidden_states
            a = loss(s_hidden, hidden, batch["attention_mask"])
            b = loss(s_hidden, live_hidden, batch["attention_mask"])
        assert float(a) == pytest.approx(float(b), rel=loss_rtol)
        torch.testing.assert_close(targets["logits"], live_targets["logits"], atol=2e-3, rtol=1e-3)


def test_targets_arrive_with_the_batch_from_the_collate_and_its_workers(tmp_path, tok, accelerator):
    """The training collate (`CachedTargets`) gathers the cached rows by the rows' feature ids,
    in DataLoader workers too (the cache is pickled to them): the teacher then reads them from
    the batch, never copying an id to the host, and gets what a direct lookup gives."""
    from distill.data.features import make_loader
    from distill.teachers.teacher import with_cached_targets

    cfg = make_cfg(tmp_path, max_length=24)
    cfg.student.model, cfg.student.num_layers = None, 1
    cfg.distill.hidden_weight, cfg.distill.cache_hidden_states, cfg.distill.cache_hidden_dtype = 1.0, True, "bfloat16"
    task, feats = classification(cfg, tok)
    teacher = seeded(AutoModelForSequenceClassification, tiny_bert_config(num_labels=3)).eval()
    fn = teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=True)
    collate = with_cached_targets(fn, task.collate)
    reads = {"n": 0}
    original = torch.Tensor.cpu

    def counting(self, *args, **kwargs):
        reads["n"] += 1
        return original(self, *args, **kwargs)

    for workers in (0, 2):
        loader = make_loader(task, feats, 4, shuffle=True, seed=3, num_workers=workers, collate=collate)
        for batch in loader:
            assert {"cached/0/logits", "cached/0/hidden_states_2"} <= set(batch)
            assert batch["cached/0/hidden_states_2"].dtype == torch.bfloat16  # as stored: half the copy
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(torch.Tensor, "cpu", counting)
                got = fn(batch)
                assert reads["n"] == 0  # read from the batch: no id copied back
                direct = fn({k: v for k, v in batch.items() if not k.startswith("cached/")})
                assert reads["n"] == 1  # the direct lookup reads the ids back
            reads["n"] = 0
            torch.testing.assert_close(got.targets, direct.targets)
            for a, b in zip(got.hidden, direct.hidden):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_the_vectorised_gather_reads_each_row_as_written(tmp_path):
    """`TeacherCache.gather` against the shards read row by row: features spread over three
    shards in any order, rows of every length (zero-length too), scalar and [n, k] targets, bool,
    float16 and bfloat16, padding to a wider batch, repeated ids."""
    rng = np.random.default_rng(0)
    n, k = 23, 3
    lengths = rng.integers(0, 6, n)
    values = {i: rng.normal(size=(lengths[i], k)).astype(np.float32) for i in range(n)}
    specs = {
        "rows": cache.TargetSpec("rows", "float16", [k], "length"),
        "states": cache.TargetSpec("states", "bfloat16", [k], "length"),
        "mask": cache.TargetSpec("mask", "uint8", [], "length", is_bool=True),
        "score": cache.TargetSpec("score", "int64", [], None, scalar=True),
    }
    order = rng.permutation(n)
    shards = [order[:9], order[9:9], order[9:]]  # one empty shard
    path = tmp_path / "cache"
    for rank, ids in enumerate(shards):
        def batches(ids=ids):
            for part in np.array_split(ids, 3):
                per_row = lengths[part]
                flat = np.concatenate([values[i] for i in part]) if len(part) else np.zeros((0, k), np.float32)
                bf16 = torch.from_numpy(flat).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                yield part, {
                    "rows": (flat.astype(np.float16), per_row), "states": (bf16, per_row),
                    "mask": ((flat[:, 0] > 0).astype(np.uint8), per_row), "score": (part * 10, np.ones(len(part), np.int64)),
                }
        cache.write_shard(path / f"shard-{rank:05d}", specs, batches())
    meta = {"num_rows": n, "targets": {s: vars(v) for s, v in specs.items()}, "shards": [{"rank": r} for r in range(3)], "parts": {}}
    (path / "metadata.json").write_text(json.dumps(meta))
    stored = cache.TeacherCache(path)
    ask = [4, 0, 22, 4, int(np.argmax(lengths)), int(np.argmin(lengths))]
    got = stored.gather(ask, widths={"rows": 8})
    assert got["rows"].shape == (6, 8, k) and got["states"].shape == (6, int(lengths.max()), k)
    assert got["states"].dtype == torch.bfloat16 and got["mask"].dtype == torch.bool
    for row, i in enumerate(ask):
        m = lengths[i]
        want = torch.from_numpy(values[i])
        torch.testing.assert_close(got["rows"][row, :m].float(), want.half().float())
        torch.testing.assert_close(got["states"][row, :m].float(), want.bfloat16().float())
        assert torch.equal(got["mask"][row, :m], want[:, 0] > 0)
        assert not got["rows"][row, m:].any() and not got["mask"][row, m:].any()
        assert int(got["score"][row]) == 10 * i
    # a reader opened elsewhere (a DataLoader worker) by pickling
    import pickle

    again = pickle.loads(pickle.dumps(stored))
    assert torch.equal(again.gather(ask)["states"], stored.gather(ask)["states"])


# --- two processes -----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_build_one_cache_and_train_from_it(tmp_path, accelerator):
    """Two processes write a shard each (logits and float16 hidden states) and train from the
    cache; a cache built by one process is read by both (1 -> 2), and theirs by this one
    process (2 -> 1), row for row the same."""
    from tests.cache_two_process import inputs, largest_difference

    cfg, task, features, teacher = inputs(tmp_path / "one", tmp_path / "one" / "cache")
    built_by_one = teacher_outputs(cfg, task, teacher, features, accelerator, hidden=True).cache
    assert len(built_by_one.metadata["shards"]) == 1
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(TESTS / "cache_two_process.py"), str(tmp_path), str(built_by_one.path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    n = ranks[0]["features"]
    # each example computed once, split between the two processes
    assert sum(r["teacher_rows_in_build"] for r in ranks) == n + 2 * 2  # + each process's probe
    assert all(r["teacher_rows_in_build"] > 2 for r in ranks)
    assert ranks[0]["cache"] == ranks[1]["cache"]
    caches = [p for p in (tmp_path / "cache").iterdir()]
    assert [p.name for p in caches] == [Path(ranks[0]["cache"]).name] == [built_by_one.path.name]  # one key
    meta = json.loads((caches[0] / "metadata.json").read_text())
    assert [s["rows"] for s in meta["shards"]] == [-(-n // 2), n // 2]
    assert sorted(p.name for p in caches[0].iterdir() if p.is_dir()) == ["shard-00000", "shard-00001"]
    # N -> M: the same rows whichever number of processes wrote or reads them
    assert all(r["read_one_process_cache"] < 2e-3 for r in ranks)  # float16 rounding of two builds
    assert largest_difference(cache.TeacherCache(caches[0]), built_by_one) < 2e-3
    # both trained from it: every batch read, matching the teacher, finite losses, and the
    # teacher never ran during training
    for r in ranks:
        assert r["train_batches"] > 0 and r["teacher_rows_in_training"] == 0
        assert r["max_abs_diff"] < 5e-3
        assert all(np.isfinite(r["losses"]))
    assert sum(r["train_rows"] for r in ranks) >= n


def test_left_padding_is_refused_for_token_aligned_rows(tmp_path, minilm_dir, accelerator):
    left = AutoTokenizer.from_pretrained(minilm_dir, padding_side="left")
    cfg = make_cfg(tmp_path, max_length=24)
    cfg.student.model, cfg.student.num_layers = None, 1
    cfg.distill.hidden_weight, cfg.distill.cache_hidden_states = 1.0, True
    task, feats = classification(cfg, left)
    teacher = seeded(AutoModelForSequenceClassification, tiny_bert_config(num_labels=3)).eval()
    with pytest.raises(cache.CacheError, match="not right-padded"):
        teacher_outputs(cfg, task, teacher, feats, accelerator, hidden=True)
