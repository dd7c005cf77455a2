#!/usr/bin/env python
"""Training-speed benchmark: what distillation costs next to plain fine-tuning of the student.

One run, one data set, one student init and one batch order (length-grouped, seed 0, epoch 0)
for every mode:

  plain     the student fine-tuned alone (gold labels): the floor distillation cannot beat
  trainer   KD with the teacher online, as a `transformers.Trainer` subclass overriding
            `compute_loss` does it (written below the way users write it)
  online    our loop's step with the teacher online (`teachers.OnlineTeacher`)
  cached    our loop's step reading the teacher's logits from the cache (`distill.teachers.cache`)
  hidden    the same plus the hidden-state term, its teacher states (4 mapped layers) cached too
  phase2    a two-phase stage (hidden, attention and relation terms, then KD) in its second
            phase: logits from the cache; the Q/K/V hooks stay attached, the online teacher idle
  build     the cache build on its own, next to one plain teacher inference pass

Every mode of our loop is the stage's own: the objective `loop.setup.build_objective` builds,
the teacher `teachers.make_teacher` builds, the training collate that gathers cached rows
(`teachers.with_cached_targets`) and `loop.step.train_step`. A mode's epoch time counts its
batches' collation (the cache gather included) and its steps. Each group runs in its own
process, one after the other: build; the modes of our loop interleaved batch by batch (so that
all see the same machine load), then one untimed pass each counting host reads per optimizer
step; peak memory of plain and of cached training (teacher not resident), one process each;
the Trainer.

plus the padding ratio (real / processed tokens) with and without length grouping, on lengths
drawn like XNLI sentence pairs (long-tailed; median ~45 tokens, truncated at 128).

Shapes: a BETO-shaped teacher (BERT 12 x 768, vocab 31002) and an ALBETO-tiny-shaped student
(ALBERT 4 x 312, embeddings 128, vocab 31000, one shared layer), random weights, max length 128;
token ids are drawn below 31000 so both models read the same inputs.

    python scripts/bench_train.py --out results.json --markdown table.md

takes about 10-15 minutes on 2 CPU cores with the defaults (256 examples, batch 32). On a machine
shared with other jobs, add `--threads 1`: timings then measure the work, not the contention.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

NUM_LABELS = 3  # XNLI: entailment / neutral / contradiction
VOCAB = 31000  # the smaller of the two vocabularies: ids below it are valid for both models
TEACHER_SHAPE = dict(vocab_size=31002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
STUDENT_SHAPE = dict(
    vocab_size=31000, embedding_size=128, hidden_size=312, num_hidden_layers=4, num_hidden_groups=1,
    num_attention_heads=12, intermediate_size=1248,
)
TARGETS = {
    "cached_vs_plain": ("cached logits KD epoch / plain fine-tuning epoch", "<=", 1.02),
    "hidden_vs_plain": ("cached hidden-state KD epoch / plain fine-tuning epoch", "<=", 1.10),
    "phase2_vs_cached": ("two-phase, second phase epoch / logits-only KD epoch", "<=", 1.05),
    "trainer_vs_cached": ("Trainer-subclass online KD epoch / cached KD epoch", ">=", 4.0),
    "build_vs_inference": ("cache build / one plain teacher inference pass", "<=", 1.2),
    "padding_grouped": ("padding ratio with length grouping", ">=", 0.90),
    "memory_cached_vs_plain": ("peak memory, cached KD / plain fine-tuning", "<=", 1.10),
}


# ---------------------------------------------------------------------------------------------
# Data, models and the task
# ---------------------------------------------------------------------------------------------


def pair_lengths(n: int, max_length: int, seed: int) -> np.ndarray:
    """Token counts of sentence pairs, long-tailed like XNLI (log-normal, median 45, cut at max)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(np.log(45), 0.45, n)), 8, max_length).astype(np.int64)


def make_features(n: int, max_length: int, seed: int):
    """Tokenized pair-classification features as the task's preprocessing would make them."""
    from datasets import Dataset

    rng = np.random.default_rng(seed + 1)
    lengths = pair_lengths(n, max_length, seed)
    rows: dict[str, list] = {k: [] for k in ("input_ids", "token_type_ids", "attention_mask", "labels")}
    for length in lengths:
        first = int(length * 0.6)
        ids = rng.integers(5, VOCAB, length)
        ids[0], ids[first - 1], ids[-1] = 2, 3, 3  # [CLS] premise [SEP] hypothesis [SEP]
        rows["input_ids"].append(ids.tolist())
        rows["token_type_ids"].append([0] * first + [1] * (length - first))
        rows["attention_mask"].append([1] * int(length))
        rows["labels"].append(int(rng.integers(0, NUM_LABELS)))
    rows["example_id"] = rows["feature_id"] = list(range(n))
    rows["length"] = lengths.tolist()
    return Dataset.from_dict(rows)


def make_tokenizer():
    """A word-level tokenizer that only knows the special tokens: collate needs its padding."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
    )


def make_accelerator(args: argparse.Namespace):
    """The device and precision of the run (`--device`, `--precision`), as `accelerate launch`
    would set them."""
    from accelerate import Accelerator

    return Accelerator(cpu=args.device == "cpu", mixed_precision=args.precision)


def synchronize(accelerator) -> None:
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()


def on_device(teacher, accelerator):
    """The frozen teacher placed as a stage places it (device; bf16/fp16 weights when training
    in mixed precision)."""
    from distill.teachers.teacher import place_teacher

    return place_teacher(teacher, accelerator)


def make_cfg(workdir: Path, args: argparse.Namespace, cache_dir: Path):
    from distill.config import Config

    cfg = Config()
    cfg.output_dir = str(workdir / "run")
    cfg.student.model = "albeto-tiny"
    cfg.data.max_length = args.max_length
    cfg.train.batch_size = args.batch_size
    cfg.distill.ce_weight, cfg.distill.kd_weight = 0.0, 1.0  # the study's published setting
    cfg.distill.cache_dir = str(cache_dir)
    cfg.seed = args.seed
    return cfg


def make_task(cfg):
    from distill.tasks.classification import ClassificationTask

    task = ClassificationTask(cfg.task, cfg.data)
    task.labels = ["entailment", "neutral", "contradiction"]
    task.bind(make_tokenizer())
    return task


def teacher_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=NUM_LABELS, **TEACHER_SHAPE)).eval()


def student_model():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(1)
    return AlbertForSequenceClassification(AlbertConfig(num_labels=NUM_LABELS, **STUDENT_SHAPE))


def batch_sampler(features, args: argparse.Namespace, group_by_length: bool = True):
    from distill.data.sampling import LengthGroupedBatchSampler

    return LengthGroupedBatchSampler(features["length"], args.batch_size, shuffle=True, group_by_length=group_by_length, seed=args.seed)


def loader(task, features, args: argparse.Namespace):
    from torch.utils.data import DataLoader

    return DataLoader(features, batch_sampler=batch_sampler(features, args), collate_fn=task.collate)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def release_memory() -> None:
    """Give freed heap memory back to the OS, so RSS reflects what is still held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Our loop's step, and the Trainer-subclass baseline
# ---------------------------------------------------------------------------------------------


def cached_teacher(cfg, task, teacher, features, accelerator):
    """The cached teacher a stage builds (`distill.teachers.teacher.make_teacher`), built or found."""
    from distill.loop.plan import plan_stage
    from distill.loop.setup import cache_settings
    from distill.teachers.teacher import make_teacher

    fn, _ = make_teacher(
        teacher, task, accelerator, features, mode="cached", cache_root=Path(cfg.distill.cache_dir),
        cache_settings=cache_settings(plan_stage(cfg, "student")), batch_size=max(4 * cfg.train.batch_size, cfg.train.eval_batch_size or 0),
    )
    return fn


class OurLoop:
    """A stage's own parts, timed: the objective `loop.setup.build_objective` builds (from the two
    models' configs), the student capture when a term reads Q/K/V, the training collate that
    gathers the cached teacher's rows (`teachers.with_cached_targets`), and
    `loop.step.train_step`: teacher signals (online or cached) -> student forward -> weighted loss
    terms -> backward -> clip -> the one read -> step. Nothing here re-implements them.
    `phase` puts a two-phase objective in that phase (and tells the teacher)."""

    def __init__(self, cfg, task, student, features, args, teacher_fn=None, teacher_config=None, phase=None):
        from torch.utils.data import DataLoader
        from transformers import get_linear_schedule_with_warmup

        from distill.loop.setup import build_objective, student_capture
        from distill.loop.step import StepGuard
        from distill.objective.losses import Trainee
        from distill.teachers.teacher import select, with_cached_targets

        self.accelerator = make_accelerator(args)
        self.task, self.teacher_fn = task, teacher_fn
        # without a teacher config the student's stands in (the KD terms read no layers)
        objective = build_objective(task, cfg.distill, student.config, (teacher_config or student.config) if teacher_fn else None)
        if phase is not None:
            objective.intermediate_phase = phase == 1
        if teacher_fn is not None:
            select(teacher_fn, objective.needs("teacher"))
        self.objective = objective
        trainee = Trainee(student, objective, student_capture(objective, student))
        optimizer = torch.optim.AdamW(trainee.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        collate = with_cached_targets(teacher_fn, task.collate)
        train_loader = DataLoader(features, batch_sampler=batch_sampler(features, args), collate_fn=collate)
        scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10 * len(train_loader) * (args.repeats + 4))
        self.trainee, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(
            trainee, optimizer, train_loader, scheduler
        )
        self.guard = StepGuard(self.accelerator)
        self.trainee.train()

    def batches(self):
        """Epoch 0's batches, collated by this mode's collate as they are drawn."""
        self.loader.set_epoch(0)  # the prepared loader would otherwise count epochs itself
        return iter(self.loader)

    def step(self, batch: dict) -> None:
        from distill.loop.step import train_step

        result = train_step(
            self.accelerator, self.trainee, batch, self.task, self.teacher_fn, self.optimizer, self.scheduler, 1.0, self.guard
        )
        if result.error is not None:
            raise RuntimeError(f"non-finite {result.error}: {result.terms}")

    def epoch(self) -> tuple[float, float]:
        """(wall, CPU) seconds for one pass over epoch 0's batches, loading included."""
        start, cpu = time.perf_counter(), time.process_time()
        for batch in self.batches():
            self.step(batch)
        synchronize(self.accelerator)
        return time.perf_counter() - start, time.process_time() - cpu


READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def reads_per_step(loop: OurLoop) -> tuple[float, Optional[float]]:
    """Host reads of device values (item, tolist, bool/float/int of a tensor, cpu, numpy) made by
    the project's code in the steps of one epoch of `loop`, per optimizer step. (The data
    pipeline's own tensors are host tensors: the sampler and the collate are not counted.) On a
    CUDA device, also the synchronizing calls CUDA itself reports in those steps
    (`torch.cuda.set_sync_debug_mode`: `nonzero`, a boolean-mask index, a copy to the host...,
    whoever makes them), per optimizer step; None elsewhere."""
    package = str(Path(__file__).resolve().parents[1] / "distill")
    count, stepping = [0], [False]
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    cuda = loop.accelerator.device.type == "cuda"

    def counting(method):
        def wrapper(self, *args, **kwargs):
            if stepping[0] and sys._getframe(1).f_code.co_filename.startswith(package):
                count[0] += 1
            return method(self, *args, **kwargs)

        return wrapper

    steps = syncs = 0
    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counting(method))
        for batch in loop.batches():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
                stepping[0] = True
                try:
                    loop.step(batch)
                finally:
                    stepping[0] = False
                    if cuda:
                        torch.cuda.set_sync_debug_mode("default")
            syncs += sum("synchroniz" in str(w.message) for w in caught)
            steps += 1
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    return count[0] / max(steps, 1), (syncs / max(steps, 1) if cuda else None)


def trainer_epochs(task, student, teacher, features, args, workdir: Path) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of epochs of KD the way a `Trainer` subclass does it: `compute_loss`
    runs the teacher under no_grad on every batch. It gets our epoch-0 batches every epoch (same
    order, same padding) so that only the distillation step differs."""
    from torch.utils.data import DataLoader

    from transformers import Trainer, TrainerCallback, TrainingArguments

    class DistillationTrainer(Trainer):
        def __init__(self, *a, teacher=None, temperature: float = 1.0, alpha: float = 0.0, train_loader=None, **kw):
            super().__init__(*a, **kw)
            self.teacher = teacher.to(self.args.device).eval()
            self.temperature, self.alpha, self.train_loader = temperature, alpha, train_loader

        def get_train_dataloader(self):
            return self.accelerator.prepare(self.train_loader)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            t = self.temperature
            kd = F.kl_div(
                F.log_softmax(outputs.logits / t, dim=-1), F.softmax(teacher_logits / t, dim=-1), reduction="batchmean"
            ) * t * t
            loss = self.alpha * outputs.loss + (1 - self.alpha) * kd
            return (loss, outputs) if return_outputs else loss

    class EpochTimer(TrainerCallback):
        epochs: list[tuple[float, float]] = []

        def on_epoch_begin(self, *a, **kw):
            self.start = (time.perf_counter(), time.process_time())

        def on_epoch_end(self, *a, **kw):
            EpochTimer.epochs.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))

    model_keys = ("input_ids", "attention_mask", "token_type_ids", "labels")

    def collate(rows):  # what a user's dataset holds: model inputs and labels only
        return {k: v for k, v in task.collate(rows).items() if k in model_keys}

    training_args = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.online_repeats,
        learning_rate=5e-5, weight_decay=0.01, max_grad_norm=1.0, use_cpu=args.device == "cpu", bf16=args.precision == "bf16", report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    frozen = list(batch_sampler(features, args))  # epoch 0's batches, replayed every epoch
    train_loader = DataLoader(features, batch_sampler=frozen, collate_fn=collate)
    trainer = DistillationTrainer(
        model=student, args=training_args, train_dataset=features, teacher=teacher,
        train_loader=train_loader, callbacks=[EpochTimer()],
    )
    warm = next(iter(train_loader))  # first-call setup of both models, as the other modes get
    with torch.no_grad():
        teacher(**{k: v for k, v in warm.items() if k != "labels"})
    student(**warm).loss.backward()
    student.zero_grad(set_to_none=True)
    trainer.train()
    return EpochTimer.epochs


# ---------------------------------------------------------------------------------------------
# Workers (one process each)
# ---------------------------------------------------------------------------------------------


def open_features(workdir: Path):
    from datasets import load_from_disk

    return load_from_disk(str(workdir / "features"))


def worker_build(workdir: Path, args: argparse.Namespace) -> dict:
    """One plain teacher inference pass over the training batches, and the cache build."""


    features = open_features(workdir)
    accelerator = make_accelerator(args)
    teacher = on_device(teacher_model(), accelerator)
    results: dict[str, Any] = {"inference_s": [], "build_s": [], "inference_cpu_s": [], "build_cpu_s": []}
    task = make_task(make_cfg(workdir, args, workdir / "cache"))
    batches = list(loader(task, features, args))
    batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in batches]
    with torch.inference_mode(), accelerator.autocast():
        teacher(**task.model_inputs(batches[0], teacher=True))  # warm-up: first-call setup

    def inference_pass() -> None:
        with torch.inference_mode(), accelerator.autocast():
            for batch in batches:
                teacher(**task.model_inputs(batch, teacher=True))
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    def build(r: int) -> None:  # into a fresh folder each time
        cfg = make_cfg(workdir, args, workdir / f"cache-{r}")
        fn = cached_teacher(cfg, task, teacher, features, accelerator)
        results["cache_path"] = str(fn.cache.path)
        results["cache_bytes"] = fn.cache.metadata["bytes"]
        results["cache_batch_size"] = fn.cache.metadata["batch_size"]

    for r in range(args.build_repeats):  # interleaved, the order alternating: A B, B A, ...
        runs = [("inference", inference_pass), ("build", lambda: build(r))]
        for name, run in runs if r % 2 == 0 else runs[::-1]:
            start, cpu = time.perf_counter(), time.process_time()
            run()
            results[f"{name}_s"].append(time.perf_counter() - start)
            results[f"{name}_cpu_s"].append(time.process_time() - cpu)
    cfg = make_cfg(workdir, args, Path(results["cache_path"]).parent)
    start = time.perf_counter()
    again = cached_teacher(cfg, task, teacher, features, accelerator)
    results["reuse_s"] = time.perf_counter() - start  # key (teacher + data hashes) and open
    assert str(again.cache.path) == results["cache_path"]
    return results


def intermediate_cfg(workdir: Path, args: argparse.Namespace, two_phase: bool):
    """The hidden-state mode's config (KD + hidden states, both cached), or the two-phase one's
    (hidden, attention and relations for an epoch, then KD)."""
    cfg = make_cfg(workdir, args, workdir / "cache")
    d = cfg.distill
    d.hidden_weight, d.cache_hidden_states, d.cache_hidden_dtype = 1.0, True, args.hidden_dtype
    if two_phase:
        d.attention_weight, d.relation_weight, d.intermediate_epochs = 1.0, 1.0, 1
    return cfg


def stage_teacher(cfg, task, teacher, features, accelerator):
    """The teacher a student stage of `cfg` gets (`loop.setup.build_teachers` in one teacher's
    case): what every phase's terms read, cached where the recipe says, online otherwise."""
    from distill.loop.plan import plan_stage
    from distill.loop.setup import build_objective, cache_settings
    from distill.teachers.teacher import make_teacher

    student = student_model()
    needs = build_objective(task, cfg.distill, student.config, teacher.config).needs("teacher", every_phase=True)
    fn, _ = make_teacher(
        teacher, task, accelerator, features, mode=cfg.distill.teacher_outputs, cache_root=Path(cfg.distill.cache_dir),
        cache_settings=cache_settings(plan_stage(cfg, "student")), hidden_layers=sorted(needs.hidden),
        qkv_layers=sorted(needs.qkv), cache_hidden_states=True, hidden_dtype=cfg.distill.cache_hidden_dtype,
        batch_size=max(4 * cfg.train.batch_size, cfg.train.eval_batch_size or 0),
    )
    return fn


def worker_students(workdir: Path, args: argparse.Namespace) -> dict:
    """The modes of our loop, interleaved batch by batch in one process (the order rotating every
    batch) so that all see the same machine load; a mode's epoch time is the sum of its batches'
    collation and steps over epoch 0. Then one untimed epoch each counting host reads."""
    from distill.teachers import cache
    from distill.teachers.teacher import CachedTeacher, OnlineTeacher

    features = open_features(workdir)
    cfg = make_cfg(workdir, args, workdir / "cache")
    task = make_task(cfg)
    stored = cache.TeacherCache(args.cache_path)
    accelerator = make_accelerator(args)
    teacher = on_device(teacher_model(), accelerator)
    hidden_cfg, phased_cfg = intermediate_cfg(workdir, args, False), intermediate_cfg(workdir, args, True)
    loops = {
        "plain": OurLoop(cfg, task, student_model(), features, args),
        "cached": OurLoop(cfg, task, student_model(), features, args, CachedTeacher(stored, accelerator.device)),
        "hidden": OurLoop(hidden_cfg, task, student_model(), features, args,
                          stage_teacher(hidden_cfg, task, teacher, features, accelerator), teacher.config),
        "phase2": OurLoop(phased_cfg, task, student_model(), features, args,
                          stage_teacher(phased_cfg, task, teacher, features, accelerator), teacher.config, phase=2),
        "online": OurLoop(cfg, task, student_model(), features, args, OnlineTeacher(teacher, task, accelerator)),
    }
    for loop in loops.values():  # warm-up: first-call setup of every model
        batches = loop.batches()
        for _ in range(2):
            loop.step(next(batches))
    wall: dict[str, list[float]] = {name: [] for name in loops}
    cpu: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.repeats):
        modes = [m for m in loops if m != "online" or r < args.online_repeats]
        spent = {m: [0.0, 0.0] for m in modes}
        drawn = {m: loops[m].batches() for m in modes}
        for i in range(len(loops["plain"].loader)):
            k = (i + r) % len(modes)
            for m in modes[k:] + modes[:k]:
                start, used = time.perf_counter(), time.process_time()
                loops[m].step(next(drawn[m]))
                synchronize(accelerator)  # on a GPU: charge each mode its own kernels
                spent[m][0] += time.perf_counter() - start
                spent[m][1] += time.process_time() - used
        for m, (w, c) in spent.items():
            wall[m].append(w)
            cpu[m].append(c)
    counted = {m: reads_per_step(loop) for m, loop in loops.items()}
    reads = {m: r for m, (r, _) in counted.items()}
    syncs = {m: c for m, (_, c) in counted.items() if c is not None}
    # what the cache gathers themselves cost per epoch (in the collate: workers on a real run)
    gather: dict[str, float] = {}
    lengths = np.asarray(features["length"])
    for m in ("cached", "hidden"):
        start = time.perf_counter()
        for ids in batch_sampler(features, args):
            loops[m].teacher_fn.rows(ids, int(lengths[ids].max()))
        gather[m] = time.perf_counter() - start
    return {"epoch_s": wall, "epoch_cpu_s": cpu, "reads_per_step": reads, "cuda_syncs_per_step": syncs, "gather_s": gather,
            "hidden_bytes": json.loads((loops["hidden"].teacher_fn.cache.path / "metadata.json").read_text())["bytes"]}


def worker_memory(workdir: Path, args: argparse.Namespace) -> dict:
    """Peak RSS of one training epoch, plain or cached. The cached mode goes through the real
    lookup (`teachers.make_teacher` with the teacher loaded, which finds the cache), then
    releases the teacher before training, as a run that no longer needs it should."""



    features = open_features(workdir)
    cfg = make_cfg(workdir, args, Path(args.cache_path).parent)
    task = make_task(cfg)
    teacher_fn = None
    accelerator = make_accelerator(args)
    if args.mode == "cached":
        teacher = on_device(teacher_model(), accelerator)
        teacher_fn = cached_teacher(cfg, task, teacher, features, accelerator)
        assert str(teacher_fn.cache.path) == args.cache_path, "the cache was not found"
        del teacher
    elif args.mode == "online":
        from distill.teachers.teacher import OnlineTeacher

        teacher_fn = OnlineTeacher(on_device(teacher_model(), accelerator), task, accelerator)
    loop = OurLoop(cfg, task, student_model(), features, args, teacher_fn)
    release_memory()
    supported = reset_peak_rss()
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds, _ = loop.epoch()
    result = {"peak_rss_mb": peak_rss_mb(), "epoch_s": seconds, "peak_reset": supported,
              "samples_per_s": args.examples / seconds}
    if cuda:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def worker_trainer(workdir: Path, args: argparse.Namespace) -> dict:
    features = open_features(workdir)
    cfg = make_cfg(workdir, args, workdir / "cache")
    task = make_task(cfg)
    epochs = trainer_epochs(task, student_model(), teacher_model(), features, args, workdir)
    return {"epoch_s": [w for w, _ in epochs], "epoch_cpu_s": [c for _, c in epochs]}


WORKERS = {
    "build": worker_build,
    "students": worker_students,
    "memory": worker_memory,
    "trainer": worker_trainer,
}


# ---------------------------------------------------------------------------------------------
# The run: data, workers one after the other, ratios, table
# ---------------------------------------------------------------------------------------------


def run_worker(name: str, workdir: Path, args: argparse.Namespace, **extra: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--workdir", str(workdir)]
    for key in ("examples", "batch_size", "max_length", "repeats", "build_repeats", "online_repeats", "seed",
                "device", "precision", "hidden_dtype"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", value]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[bench] {name} {' '.join(f'{k}={v}' for k, v in extra.items() if k != 'cache_path')}", flush=True)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker '{name}' failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # 1-minute load average around the worker: values well above the core count mean other
    # processes shared the CPUs and timings are inflated
    result["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"[bench]   done in {time.perf_counter() - start:.0f}s: {json.dumps(result)[:200]}", flush=True)
    return result


def padding_report(args: argparse.Namespace, features) -> dict:
    from distill.data.sampling import LengthGroupedBatchSampler, padding_ratio

    report = {}
    big = pair_lengths(args.padding_examples, args.max_length, args.seed + 7)
    for name, lengths in (("bench_data", np.asarray(features["length"])), ("xnli_like_%d" % len(big), big)):
        row = {}
        for grouped in (True, False):
            sampler = LengthGroupedBatchSampler(lengths, args.batch_size, group_by_length=grouped, seed=args.seed)
            row["grouped" if grouped else "ungrouped"] = round(padding_ratio(lengths, list(sampler)), 4)
        row["median_length"] = float(np.median(lengths))
        row["p95_length"] = float(np.percentile(lengths, 95))
        row["mean_length"] = round(float(np.mean(lengths)), 1)
        report[name] = row
    return report


def verdict(value: float, op: str, limit: float) -> str:
    ok = value <= limit if op == "<=" else value >= limit
    return "met" if ok else "NOT met"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=256, help="training examples (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs of plain and cached KD (interleaved)")
    p.add_argument("--build-repeats", type=int, default=1, help="cache builds / inference passes to time, interleaved")
    p.add_argument("--online-repeats", type=int, default=1, help="timed epochs of each online KD mode (ours interleaved)")
    p.add_argument("--padding-examples", type=int, default=100_000, help="simulated lengths for the padding ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default cpu)")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no",
                   help="accelerate's mixed precision; the teacher's weights follow it (default no)")
    p.add_argument("--hidden-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="how the hidden-state mode's cache stores the teacher's states (distill.cache_hidden_dtype)")
    p.add_argument("--skip-trainer", action="store_true", help="leave out the Trainer-subclass baseline")
    p.add_argument("--skip-memory", action="store_true", help="leave out the peak-memory workers")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as Markdown here")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    p.add_argument("--cache-path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        import transformers

        if args.threads:
            torch.set_num_threads(args.threads)
        transformers.logging.set_verbosity_error()
        with open(os.devnull, "w") as quiet:  # keep stdout for the one JSON line
            real, sys.stdout = sys.stdout, quiet
            try:
                result = WORKERS[args.worker](args.workdir, args)
            finally:
                sys.stdout = real
        print(json.dumps(result))
        return 0

    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-")) if own_tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    features = make_features(args.examples, args.max_length, args.seed)
    features.save_to_disk(str(workdir / "features"))
    padding = padding_report(args, features)

    build = run_worker("build", workdir, args)
    cache_path = build["cache_path"]
    students = run_worker("students", workdir, args, cache_path=cache_path)
    memory = {} if args.skip_memory else {
        m: run_worker("memory", workdir, args, mode=m, cache_path=cache_path) for m in ("plain", "cached", "online")
    }
    trainer = None if args.skip_trainer else run_worker("trainer", workdir, args)

    # Other processes can only add time: the fastest of the repeats is the best estimate of
    # each mode's own cost (medians are kept in the JSON beside it).
    walls = {**students["epoch_s"], **({"trainer": trainer["epoch_s"]} if trainer else {})}
    cpus = {**students["epoch_cpu_s"], **({"trainer": trainer["epoch_cpu_s"]} if trainer else {})}
    epoch = {k: min(v) for k, v in walls.items()}
    epoch_cpu = {k: min(v) for k, v in cpus.items()}
    inference, build_s = min(build["inference_s"]), min(build["build_s"])
    big = next(k for k in padding if k.startswith("xnli_like"))
    ratios = {
        "cached_vs_plain": epoch["cached"] / epoch["plain"],
        "hidden_vs_plain": epoch["hidden"] / epoch["plain"],
        "phase2_vs_cached": epoch["phase2"] / epoch["cached"],
        "build_vs_inference": build_s / inference,
        "padding_grouped": padding[big]["grouped"],
    }
    if trainer:
        ratios["trainer_vs_cached"] = epoch["trainer"] / epoch["cached"]
    if memory:
        ratios["memory_cached_vs_plain"] = memory["cached"]["peak_rss_mb"] / memory["plain"]["peak_rss_mb"]
    # The same ratios in process CPU time: with one torch thread, CPU time is the work itself
    # and hardly moves when other processes share the machine.
    ratios_cpu = {
        "cached_vs_plain": epoch_cpu["cached"] / epoch_cpu["plain"],
        "hidden_vs_plain": epoch_cpu["hidden"] / epoch_cpu["plain"],
        "phase2_vs_cached": epoch_cpu["phase2"] / epoch_cpu["cached"],
        "build_vs_inference": min(build["build_cpu_s"]) / min(build["inference_cpu_s"]),
        **({"trainer_vs_cached": epoch_cpu["trainer"] / epoch_cpu["cached"]} if trainer else {}),
    }
    tokens = int(np.sum(features["length"]))
    results = {
        "setup": {
            "examples": args.examples, "tokens": tokens, "batch_size": args.batch_size,
            "max_length": args.max_length, "repeats": args.repeats, "seed": args.seed,
            "teacher": {"class": "BertForSequenceClassification", **TEACHER_SHAPE},
            "student": {"class": "AlbertForSequenceClassification", **STUDENT_SHAPE},
            "machine": {
                "cpus": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
                "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
            },
        },
        "epoch_s": epoch,
        "epoch_cpu_s": epoch_cpu,
        "epoch_s_median": {k: statistics.median(v) for k, v in walls.items()},
        "epoch_s_all": walls,
        "epoch_cpu_s_all": cpus,
        "cache": {
            "build_s": build["build_s"], "inference_s": build["inference_s"], "reuse_s": build["reuse_s"],
            "build_cpu_s": build["build_cpu_s"], "inference_cpu_s": build["inference_cpu_s"],
            "bytes": build["cache_bytes"], "build_batch_size": build["cache_batch_size"],
            "gather_per_epoch_s": students["gather_s"], "hidden_bytes": students["hidden_bytes"],
            "hidden_dtype": args.hidden_dtype,
        },
        "host_reads_per_step": students["reads_per_step"],
        "cuda_syncs_per_step": students["cuda_syncs_per_step"],  # {} off CUDA
        "peak_rss_mb": {m: memory[m]["peak_rss_mb"] for m in memory},
        "peak_gpu_mb": {m: memory[m]["peak_gpu_mb"] for m in memory if "peak_gpu_mb" in memory[m]},
        "samples_per_s": {k: args.examples / v for k, v in epoch.items()},
        "device": {"device": args.device, "precision": args.precision,
                   "name": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor()},
        "padding_ratio": padding,
        "ratios": ratios,
        "ratios_cpu_time": ratios_cpu,
        "targets": {
            k: {
                "what": what, "target": f"{op} {limit}", "value": round(ratios[k], 3),
                "verdict": verdict(ratios[k], op, limit),
                **({"value_cpu_time": round(ratios_cpu[k], 3)} if k in ratios_cpu else {}),
            }
            for k, (what, op, limit) in TARGETS.items() if k in ratios
        },
        "load_avg": {name: r["load_avg"] for name, r in (
            ("build", build), ("students", students), ("memory_plain", memory.get("plain")),
            ("memory_cached", memory.get("cached")), ("trainer", trainer),
        ) if r},
        "wall_s": time.perf_counter() - started,
    }
    table = markdown(results)
    print("\n" + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    if own_tmp:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def markdown(r: dict) -> str:
    s, e, c = r["setup"], r["epoch_s"], r["cache"]
    per_ex = lambda t: 1000 * t / s["examples"]  # noqa: E731
    med = r["epoch_s_median"]
    runs = {k: len(v) for k, v in r["epoch_s_all"].items()}
    lines = [
        f"{s['examples']} examples ({s['tokens']} tokens), batch {s['batch_size']}, max length {s['max_length']}, "
        f"{s['machine']['cpus']} CPUs ({s['machine']['torch_threads']} torch threads), torch {s['machine']['torch']}; "
        f"1-min load average during the workers: {min(min(v) for v in r['load_avg'].values()):.1f}-"
        f"{max(max(v) for v in r['load_avg'].values()):.1f}",
        "",
    ]
    rows = (
        ("plain", "plain fine-tuning (no teacher)"),
        ("trainer", "KD, teacher online, Trainer subclass"),
        ("online", "KD, teacher online, ours"),
        ("cached", "KD, cached logits, ours"),
        ("hidden", f"KD + hidden states, both cached ({c['hidden_dtype']}), ours"),
        ("phase2", "two-phase stage in its second phase, ours"),
    )
    reads = r["host_reads_per_step"]
    lines += [
        "| mode | epoch (s), best | median | runs | ms / example | x plain | CPU (s), best | peak RSS (MB) | host reads / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, name in [(k, n) for k, n in rows if k in e]:
        rss = f"{r['peak_rss_mb'][key]:.0f}" if key in r["peak_rss_mb"] else ""
        read = f"{reads[key]:g}" if key in reads else ""
        lines.append(
            f"| {name} | {e[key]:.2f} | {med[key]:.2f} | {runs[key]} | {per_ex(e[key]):.1f} | "
            f"{e[key] / e['plain']:.2f} | {r['epoch_cpu_s'][key]:.2f} | {rss} | {read} |"
        )
    if r.get("cuda_syncs_per_step"):
        lines += ["", "Synchronizing CUDA calls per optimizer step (torch.cuda.set_sync_debug_mode): "
                  + ", ".join(f"{k} {v:g}" for k, v in r["cuda_syncs_per_step"].items())]
    lines += [
        "",
        "| teacher pass | seconds | CPU (s) |",
        "|---|---:|---:|",
        f"| plain inference pass (training batches, inference mode), best of {len(c['inference_s'])} | "
        f"{min(c['inference_s']):.2f} | {min(c['inference_cpu_s']):.2f} |",
        f"| cache build (key + longest-first pass, batches up to {c['build_batch_size']} + write), best of "
        f"{len(c['build_s'])} | {min(c['build_s']):.2f} | {min(c['build_cpu_s']):.2f} |",
        f"| cache reuse (key + open) | {c['reuse_s']:.2f} | |",
        f"| cache gathers during one epoch, logits | {c['gather_per_epoch_s']['cached']:.3f} | |",
        f"| cache gathers during one epoch, logits + hidden states ({c['hidden_bytes'] / 2**20:.0f} MB cache) | "
        f"{c['gather_per_epoch_s']['hidden']:.3f} | |",
        "",
        "| lengths | median | p95 | padding ratio, grouped | ungrouped |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in r["padding_ratio"].items():
        lines.append(f"| {name} | {row['median_length']:.0f} | {row['p95_length']:.0f} | {row['grouped']:.3f} | {row['ungrouped']:.3f} |")
    lines += ["", "| target | value | in CPU time | goal | |", "|---|---:|---:|---:|---|"]
    for t in r["targets"].values():
        in_cpu = f"{t['value_cpu_time']:.3f}" if "value_cpu_time" in t else ""
        lines.append(f"| {t['what']} | {t['value']:.3f} | {in_cpu} | {t['target']} | {t['verdict']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
