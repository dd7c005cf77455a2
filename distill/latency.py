"""Honest forward-pass timing: warm-up, N timed runs, median and inter-quartile range.

Every number says how it was taken: thread count (fixed with torch.set_num_threads for the
measurement and recorded), device and its name, dtype, batch and sequence length. On CUDA the
clock is read only after torch.cuda.synchronize, so queued kernels are not mistaken for done.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Timing:
    """Summary of `runs` timed forwards (milliseconds) and the conditions they ran under."""

    batch: int
    seq: int
    warmup: int
    runs: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    threads: int
    device: str
    device_name: str
    dtype: str

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    @property
    def throughput(self) -> float:
        """Sequences per second at the median latency."""
        return self.batch / (self.median_ms / 1000.0)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "iqr_ms": self.iqr_ms, "throughput": self.throughput}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile), linear interpolation between order statistics."""
    if not values:
        raise ValueError("no timings to summarise (runs must be >= 1)")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize(
    seconds: list[float], *, batch: int, seq: int, warmup: int, threads: int, device: str,
    device_name: str, dtype: str = "fp32",
) -> Timing:
    """Turn raw per-run durations (seconds) into a Timing."""
    ms = [s * 1000.0 for s in seconds]
    p25, median, p75 = quartiles(ms)
    return Timing(
        batch=batch, seq=seq, warmup=warmup, runs=len(ms), median_ms=median, p25_ms=p25,
        p75_ms=p75, mean_ms=statistics.fmean(ms), min_ms=min(ms), max_ms=max(ms),
        threads=threads, device=device, device_name=device_name, dtype=dtype,
    )


def device_name(device: str | torch.device) -> str:
    """A human-readable name of the hardware: the GPU's name, or the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return f"{model} ({os.cpu_count()} logical cores)"


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op thread count fixed; yields the count actually used."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def synchronizer(device: str | torch.device) -> Callable[[], None] | None:
    """torch.cuda.synchronize for a CUDA device, None (nothing to wait for) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def time_calls(
    fn: Callable[[], Any], warmup: int, runs: int, sync: Callable[[], None] | None = None
) -> list[float]:
    """Call `fn` `warmup` times untimed, then `runs` times timed; returns seconds per call."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if sync:
            sync()  # the forward is done only when the device says so
        seconds.append(time.perf_counter() - start)
    return seconds


def random_inputs(
    config: Any, batch: int, seq: int, device: str | torch.device = "cpu", seed: int = 0,
    token_types: bool | None = None, vocab: int | None = None,
) -> dict[str, torch.Tensor]:
    """Random token ids from the model's vocabulary (or its first `vocab` ids), full attention
    mask (no padding).

    `token_types` None = add zero token_type_ids when the config has a token-type vocabulary.
    """
    vocab = min(config.vocab_size, vocab or config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)  # [batch, seq]
    pad = getattr(config, "pad_token_id", None)
    if pad is not None:
        ids[ids == pad] = (pad + 1) % vocab  # no padding: every position is a real token
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # [batch, seq] each
    if token_types is None:
        token_types = getattr(config, "type_vocab_size", 0) > 0 and config.model_type != "distilbert"
    if token_types:
        inputs["token_type_ids"] = torch.zeros_like(ids)  # [batch, seq]
    return {k: v.to(device) for k, v in inputs.items()}


def _check_length(config: Any, seq: int) -> None:
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is None:
        return
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        max_positions -= (config.pad_token_id or 0) + 1  # positions start after the padding index
    if seq > max_positions:
        raise ValueError(
            f"seq {seq} is longer than {config.model_type}'s {max_positions} positions; "
            f"use --seq <= {max_positions}"
        )


def _forward(
    model: nn.Module, batch: int, seq: int, device: str, seed: int, vocab: int | None = None
) -> tuple[Callable[[], Any], str]:
    """A no-argument forward on fixed random inputs (ids below `vocab` when given), and the
    model's dtype name."""
    _check_length(model.config, seq)
    model = model.eval().to(device)
    dtype = next(model.parameters()).dtype
    inputs = random_inputs(model.config, batch, seq, device, seed, vocab=vocab)
    return (lambda: model(**inputs)), {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def measure(
    model: nn.Module, batch: int, seq: int, *, warmup: int = 10, runs: int = 100,
    threads: int | None = None, device: str = "cpu", seed: int = 0,
) -> Timing:
    """Median/IQR latency of `model(**random_inputs)` at (batch, seq) on `device`.

    The model is put in eval mode and moved to `device`; its dtype is recorded as found.
    """
    fn, dtype = _forward(model, batch, seq, device, seed)
    with fixed_threads(threads) as used, torch.inference_mode():
        seconds = time_calls(fn, warmup, runs, synchronizer(device))
    return summarize(
        seconds, batch=batch, seq=seq, warmup=warmup, threads=used, device=str(torch.device(device)),
        device_name=device_name(device), dtype=dtype,
    )


def measure_interleaved(
    cases: list[tuple[nn.Module, int, int]], *, warmup: int = 10, runs: int = 100,
    threads: int | None = None, device: str = "cpu", seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[Timing]:
    """Like `measure` for many (model, batch, seq) cases, timed round-robin: run i of every case
    before run i+1 of any, so a shared machine's changing load hits all cases alike and their
    ratios stay fair. Each forward then starts with the other models' weights in cache. Every
    case draws its ids below the smallest vocabulary among them, so models of one tokenizer
    family (a teacher and its trimmed student) read the same ids at the same shape.
    `progress(done, total)` is called after every round, warm-up included."""
    shared = min(model.config.vocab_size for model, _, _ in cases) if cases else None
    prepared = [_forward(model, batch, seq, device, seed, shared) for model, batch, seq in cases]
    sync = synchronizer(device)
    seconds: list[list[float]] = [[] for _ in cases]
    with fixed_threads(threads) as used, torch.inference_mode():
        for done in range(1, warmup + 1):
            for fn, _dtype in prepared:
                fn()
            if progress:
                progress(done, warmup + runs)
        for done in range(warmup + 1, warmup + runs + 1):
            for i, (fn, _dtype) in enumerate(prepared):
                seconds[i] += time_calls(fn, 0, 1, sync)
            if progress:
                progress(done, warmup + runs)
    name = device_name(device)
    return [
        summarize(s, batch=batch, seq=seq, warmup=warmup, threads=used,
                  device=str(torch.device(device)), device_name=name, dtype=dtype)
        for s, (_, batch, seq), (_fn, dtype) in zip(seconds, cases, prepared)
    ]
