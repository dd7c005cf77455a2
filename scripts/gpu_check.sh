#!/usr/bin/env bash
# The GPU checks of docs/training-speed.md in one run of under 8 minutes on one H100/H200: a
# verdict (pass / fail) per target, then a Markdown block to paste into docs/training-speed.md.
#
#   bash scripts/gpu_check.sh                 # on a machine with a CUDA GPU; any directory
#   OUT=/tmp/gpu_check bash scripts/gpu_check.sh
#   DEVICE=cpu bash scripts/gpu_check.sh      # a dry run of the script itself, tiny sizes
#
# Python: the current environment ($PYTHON, else python3). No virtual environment is created
# and nothing is installed: it must import torch (with CUDA), transformers, accelerate,
# datasets, omegaconf, seqeval and tokenizers (`pip install -e '.[bench]'` once; on a machine
# without network, carry the wheels). The repository itself is put on PYTHONPATH. Models are
# random-weight BETO- and ALBETO-tiny-shaped ones with a WordPiece vocabulary trained here on
# the demo data, so nothing is downloaded.
#
# 1. scripts/bench_train.py in bf16: plain fine-tuning vs cached-logits KD vs cached hidden-state
#    KD vs a two-phase stage's second phase vs online KD (samples/s, host reads per step, and
#    CUDA's own count of the steps' synchronizing calls).
# 2. `distill run` of the demo data in bf16 (teacher stage, then the student from the cache).
# 3. The student again in fp16 (accelerate's GradScaler): it must finish, its skipped steps
#    counted (metrics.json info.skipped_steps, log.jsonl train/skipped_steps).
# 4. If time is left: inference latency of the study's models in bf16 (`distill bench`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-470}"  # the whole script, under 8 minutes
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }  # seconds left in the budget
if [ "$DEVICE" = cuda ]; then
  EXAMPLES=4096; REPEATS=3; EPOCHS=2; CPU_FLAG=""; SMALL=()
else  # the dry run: the same steps on a few rows
  EXAMPLES=64; REPEATS=1; EPOCHS=1; CPU_FLAG="--cpu"; SMALL=(data.max_train_samples=96 data.max_eval_samples=48)
fi

log "0/4 environment: $PY"
"$PY" - "$DEVICE" <<'PY' 2>&1 | tee "$OUT/env.txt" || { log "the environment cannot run the checks (see above)"; exit 2; }
import importlib, sys
missing = [m for m in ("torch", "transformers", "accelerate", "datasets", "omegaconf", "seqeval", "tokenizers")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {missing}. Install the project's dependencies into this "
             "environment (pip install -e '.[bench]'), or point PYTHON at one that has them")
import torch, transformers, accelerate
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "accelerate", accelerate.__version__)
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device: run on a GPU machine, or DEVICE=cpu for a dry run")
    print("gpu", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/env.txt"

log "1/4 training step, bf16: plain vs cached logits vs cached hidden states vs phase 2 vs online"
timeout $(( $(left) - 200 )) "$PY" scripts/bench_train.py --device "$DEVICE" --precision bf16 --examples "$EXAMPLES" \
  --batch-size 32 --max-length 128 --repeats "$REPEATS" --online-repeats 1 --build-repeats 1 --padding-examples 20000 \
  --hidden-dtype bfloat16 --skip-trainer --out "$OUT/train_bf16.json" --markdown "$OUT/train_bf16.md" > "$OUT/train_bf16.log" 2>&1 \
  || log "bench_train: failed or out of time (see $OUT/train_bf16.log)"
tail -25 "$OUT/train_bf16.log"

log "2/4 models: BETO-shaped teacher, ALBETO-tiny-shaped student, a WordPiece vocabulary of the demo data"
"$PY" - "$OUT/models" <<'PY' || { log "could not make the models"; exit 2; }
import json, sys
from pathlib import Path
from tokenizers import BertWordPieceTokenizer
from transformers import (AlbertConfig, AlbertForSequenceClassification, BertConfig, BertForSequenceClassification,
                          PreTrainedTokenizerFast)

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
texts = [json.loads(line)["text"] for line in Path("distill/sample_data/demo/train.jsonl").read_text().splitlines()]
wordpiece = BertWordPieceTokenizer(lowercase=False)
wordpiece.train_from_iterator(texts, vocab_size=4000)
tok = PreTrainedTokenizerFast(tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                              cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
labels = {"id2label": {0: "negativo", 1: "positivo"}, "label2id": {"negativo": 0, "positivo": 1}}
models = {
    "beto-shaped": BertForSequenceClassification(BertConfig(vocab_size=31002, num_labels=2, **labels)),
    "albeto-tiny-shaped": AlbertForSequenceClassification(AlbertConfig(
        vocab_size=31000, embedding_size=128, hidden_size=312, num_hidden_layers=4, num_attention_heads=12,
        intermediate_size=1248, num_labels=2, **labels)),
}
for name, model in models.items():  # ids < 4000 fit both vocabularies
    model.save_pretrained(out / name)
    tok.save_pretrained(out / name)
print("models in", out)
PY

RUN_ARGS=(teacher.model="$OUT/models/beto-shaped" student.model="$OUT/models/albeto-tiny-shaped" student.num_layers=null
          teacher.epochs=1 train.epochs="$EPOCHS" run.baseline=false "tracking.report_to=[]" train.logging_steps=1
          "${SMALL[@]}")
launch() {  # launch PRECISION OUTPUT_DIR [overrides...]
  local precision=$1 dir=$2; shift 2
  timeout $(( $(left) - 20 )) "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
    --mixed_precision "$precision" --dynamo_backend no $CPU_FLAG -m distill run recipes/demo.yaml \
    "${RUN_ARGS[@]}" output_dir="$dir" "$@"
}

log "3/4 distill run, bf16 (teacher stage, then the student from the cache)"
launch bf16 "$OUT/run-bf16" > "$OUT/run_bf16.log" 2>&1 && BF16_RC=0 || BF16_RC=$?
tail -5 "$OUT/run_bf16.log"
log "    the student in fp16 (GradScaler), the bf16 run's teacher"
launch fp16 "$OUT/run-fp16" teacher.dir="$OUT/run-bf16/teacher" > "$OUT/run_fp16.log" 2>&1 && FP16_RC=0 || FP16_RC=$?
tail -5 "$OUT/run_fp16.log"

if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 70 ]; then
  log "4/4 inference latency of the study's models, bf16 ($(left)s left)"
  timeout $(( $(left) - 15 )) "$PY" -m distill bench --all --device cuda --dtype bf16 --batch 1 --seq 128 512 \
    --warmup 10 --runs 50 --out "$OUT/bench-bf16" > "$OUT/bench_bf16.txt" 2>&1 || log "bench: failed or out of time"
  tail -20 "$OUT/bench_bf16.txt"
else
  log "4/4 inference latency: skipped ($(left)s left, device $DEVICE)"
fi

log "verdicts"
"$PY" - "$OUT" "$BF16_RC" "$FP16_RC" "$(( $(date +%s) - START ))" "$DEVICE" <<'PY' | tee "$OUT/verdicts.md"
import json, sys
from pathlib import Path

out, bf16_rc, fp16_rc, wall, device = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = []

def verdict(what, value, ok, target):
    rows.append((what, value, target, "pass" if ok else "FAIL"))

bench = out / "train_bf16.json"
if bench.exists():
    r = json.loads(bench.read_text())
    sps = r["samples_per_s"]
    ratio = sps["cached"] / sps["plain"]
    verdict("bf16 cached-logits KD samples/s / plain fine-tuning", f"{ratio:.3f}", ratio >= 0.95, ">= 0.95")
    hidden, phase2 = sps["hidden"] / sps["plain"], sps["phase2"] / sps["cached"]
    verdict("bf16 cached hidden-state KD samples/s / plain fine-tuning (the CPU target is <= 1.10 in time)",
            f"{hidden:.3f}", hidden >= 1 / 1.10, ">= 0.91")
    verdict("bf16 two-phase, second phase samples/s / logits-only KD", f"{phase2:.3f}", phase2 >= 1 / 1.05, ">= 0.95")
    reads = r["host_reads_per_step"]
    verdict("host reads per optimizer step, every path",
            ", ".join(f"{k} {v:g}" for k, v in reads.items()), all(v <= 1 for v in reads.values()), "<= 1")
    syncs = r.get("cuda_syncs_per_step") or {}
    if syncs:  # CUDA's own count (torch.cuda.set_sync_debug_mode) of the steps' synchronizing calls
        verdict("synchronizing CUDA calls per optimizer step, every path",
                ", ".join(f"{k} {v:g}" for k, v in syncs.items()), all(v <= 1 for v in syncs.values()), "<= 1")
    rows.append(("samples/s (bf16)", ", ".join(f"{k} {v:.0f}" for k, v in sps.items()), "", ""))
else:
    verdict("bf16 training-step benchmark", "did not finish", False, "finishes")

def run(name, rc, skipped):
    metrics = out / f"run-{name}" / "student" / "metrics.json"
    if rc != 0 or not metrics.exists():
        verdict(f"{name} `distill run` completes", f"exit {rc}", False, "exit 0")
        return
    info = json.loads(metrics.read_text())["info"]
    test = json.loads(metrics.read_text())["test"]
    if skipped:
        count = info.get("skipped_steps")
        logged = [x for x in (out / f"run-{name}" / "student" / "log.jsonl").read_text().splitlines() if "train/skipped_steps" in x]
        ok = count is not None and len(logged) > 0
        note = " (fp16 does not apply on a CPU: no scaler, nothing to count)" if device == "cpu" else ""
        verdict("fp16 `distill run` completes, its skipped steps counted",
                f"{count} of {info['steps']} steps skipped, {len(logged)} records with train/skipped_steps{note}", ok,
                "completes, counted")
    else:
        verdict(f"{name} `distill run` completes", f"{info['steps']} steps, test {test}", True, "exit 0")

run("bf16", bf16_rc, False)
run("fp16", fp16_rc, True)
verdict("wall time of this script", f"{wall} s", wall < 480, "< 480 s")

print(f"\nGPU checks ({device}), scripts/gpu_check.sh:\n")
print("| check | measured | target | |\n|---|---|---|---|")
for what, value, target, ok in rows:
    print(f"| {what} | {value} | {target} | {ok} |")
env = (out / "env.txt").read_text().strip().replace("\n", "; ") if (out / "env.txt").exists() else ""
print(f"\n{env}")
if (out / "train_bf16.md").exists():
    print("\n" + (out / "train_bf16.md").read_text())
PY
log "done: $OUT (verdicts: $OUT/verdicts.md)"
