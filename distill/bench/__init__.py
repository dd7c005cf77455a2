"""Speed of encoder models: analytic MACs/FLOPs, measured latency, inference back-ends.

    from distill.bench import count, measure, resolve_model
    counts = count(resolve_model("albeto-base-6").config, batch=1, seq=512)  # counts.macs / 1e9 = 21.81

Command line: `distill bench` / `python -m distill.bench` (see distill/bench/cli.py).
"""

from distill.bench.flops import Counts, count, speedup
from distill.latency import Timing, measure
from distill.bench.shapes import STUDY_MODELS, BenchModel, resolve_model, shape_config

__all__ = ["BenchModel", "Counts", "STUDY_MODELS", "Timing", "count", "measure", "resolve_model",
           "shape_config", "speedup"]
