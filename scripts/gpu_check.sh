#!/usr/bin/env bash
# The GPU measurements issue-style evidence asks for, in one run of under 10 minutes on one
# H100/H200. Writes everything under ${OUT:-runs/gpu_check}; paste the tables into
# docs/benchmarks.md and docs/training-speed.md.
#
#   bash scripts/gpu_check.sh            # on a machine with a CUDA GPU and this repo checked out
#
# 1. distill bench --device cuda: the study's models (random weights), batch 1, seq 128/512,
#    fp32 and bf16, to compare with the study's RTX 3090 latencies (PAPER-FACTS.md).
# 2. scripts/bench_train.py in bf16 on the GPU: plain vs cached vs online KD (samples/s, peak
#    GPU memory), BETO-shaped teacher, ALBETO-tiny-shaped student.
# 3. A 2-epoch `distill run` of a BETO-shaped teacher -> ALBETO-tiny-shaped student with the
#    single-GPU bf16 launcher config (recipes/accelerate/single_gpu_bf16.yaml).
# 4. The H100-hours of the full study grid, estimated from (2) by scripts/estimate_study_cost.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
log() { echo "[gpu_check $(date +%T)] $*"; }

if ! python -c "import distill" 2>/dev/null; then
  log "installing the project (torch as found on the machine)"
  python -m pip install --quiet -e '.[demo,bench]'
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"

log "1/4 inference latency of the study's models (bench --device cuda)"
for dtype in fp32 bf16; do
  timeout 150 python -m distill bench --all --device cuda --dtype "$dtype" --batch 1 --seq 128 512 \
    --warmup 10 --runs 100 --out "$OUT/bench-$dtype" 2>&1 | tail -40 | tee "$OUT/bench-$dtype.txt" || log "bench $dtype: failed or timed out"
done

log "2/4 training step: plain vs cached vs online KD, bf16"
timeout 240 python scripts/bench_train.py --device cuda --precision bf16 --examples 4096 --batch-size 32 \
  --max-length 128 --repeats 3 --out "$OUT/train_bf16.json" --markdown "$OUT/train_bf16.md" 2>&1 | tail -30 \
  || log "bench_train: failed or timed out"

log "3/4 a 2-epoch BETO-shaped -> ALBETO-tiny-shaped run, single-GPU bf16 launcher"
python - "$OUT" <<'PY'
import sys
from pathlib import Path
from transformers import AlbertConfig, AlbertForSequenceClassification, BertConfig, BertForSequenceClassification
from distill.models import packaged_minilm
from tests.conftest import copy_tokenizer

out = Path(sys.argv[1])
tok = Path(packaged_minilm())  # a real WordPiece tokenizer; its ids (< 30522) fit both vocabularies
BertForSequenceClassification(BertConfig(vocab_size=31002, num_labels=2)).save_pretrained(out / "beto-shaped")
AlbertForSequenceClassification(AlbertConfig(vocab_size=31000, embedding_size=128, hidden_size=312, num_hidden_layers=4,
    num_attention_heads=12, intermediate_size=1248, num_labels=2)).save_pretrained(out / "albeto-tiny-shaped")
for name in ("beto-shaped", "albeto-tiny-shaped"):
    copy_tokenizer(tok, out / name)
PY
start=$(date +%s)
timeout 180 accelerate launch --config_file recipes/accelerate/single_gpu_bf16.yaml -m distill run recipes/demo.yaml \
  teacher.model="$OUT/beto-shaped" student.model="$OUT/albeto-tiny-shaped" student.num_layers=null \
  teacher.epochs=2 train.epochs=2 output_dir="$OUT/run" run.baseline=false 2>&1 | tail -25 | tee "$OUT/run.txt" \
  || log "run: failed or timed out"
echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/run.txt"

log "4/4 the study grid's GPU-hours from the measured training throughput"
python scripts/estimate_study_cost.py "$OUT/train_bf16.json" | tee "$OUT/study_cost.md" || true
log "done: $OUT"
