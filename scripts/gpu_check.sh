#!/usr/bin/env bash
# GPU check: the GPU-only paths of main.py and benchmark.py in one go, on one GPU (sized for
# about 7 minutes on an H100/H200-class GPU, 8 at most; not yet timed on one):
#   amp_epoch        one synthetic epoch of DeiT-S with --amp (fp16 autocast + GradScaler)
#   amp_resume       --resume from that checkpoint, its GradScaler scale set to 1536 first
#   scaler_restored  the resumed run's checkpoint still has scale 3 * 2^k <= 1536: restored,
#                    not a fresh GradScaler (whose scale is always a power of two, 65536 at start)
#   bf16_train       benchmark.py training steps under bf16 autocast (main.py's --amp is fp16
#                    on CUDA and it has no bf16 switch, so bf16 training is checked here)
#   compile_epoch    one synthetic epoch with --compile (inductor) and --amp
#   torchrun         torchrun, one process: main.py's epoch, then an NCCL all_reduce + DDP step
#   benchmark_sweep  benchmark.py, batch 256, bf16: DeiT-S/B, EViT 0.7, ToMe r=13, shrink,
#                    LTM ViT-S, DWNet-T, RaftMLP-S; channels-last for the conv models, compile
#                    for DeiT-S/B (timed against eager)
#   benchmark_table  the sweep's JSONL as a Markdown table
#
#   scripts/gpu_check.sh [--dry-run] [OUT_DIR]        (default OUT_DIR: output/gpu_check)
#
# Each step prints a header and PASS / FAIL / SKIP, the run goes on after a failure, and the
# exit status is 1 if any step failed. OUT_DIR gets summary.md (step, status, seconds),
# benchmark.jsonl, benchmark.md, the runs' output folders and logs/<step>.log.
#
# --dry-run: the same steps on CPU with a tiny model and 32 px images, in about a minute on
# 2 cores (CI runs it through tests/e2e/test_gpu_check.py): --amp means bf16 autocast there, so
# there is no GradScaler and scaler_restored is SKIP; torchrun uses gloo; the sweep runs fp32
# at batch 2; torch.compile traces with dynamo + AOT autograd (aot_eager backend, through
# TORCH_COMPILE_OVERRIDE_BACKENDS) instead of generating inductor C++ code.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg; usage: scripts/gpu_check.sh [--dry-run] [OUT_DIR]" >&2; exit 2 ;;
    *) if [ -n "$OUT" ]; then echo "gpu_check: one OUT_DIR only (got $OUT and $arg)" >&2; exit 2; fi; OUT=$arg ;;
  esac
done
OUT=${OUT:-output/gpu_check}
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python}; fi
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "gpu_check: $OUT is not empty; pass a new OUT_DIR (the runs must start from nothing)" >&2
  exit 2
fi

if [ "$DRY_RUN" = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 threads thrash on a busy 2-core machine
  export TORCH_COMPILE_OVERRIDE_BACKENDS=${TORCH_COMPILE_OVERRIDE_BACKENDS:->=0:aot_eager}
  MODE="dry run (CPU)"
  DEVICE=cpu
  BACKEND=gloo
  STEP_LIMIT=${STEP_LIMIT:-240}
  TRAIN=(--model deit_tiny_patch16_224 --model-kwargs "{'depth': 1, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}"
         --input-size 32 --data-set SYNTHETIC --synthetic-train-size 64 --synthetic-val-size 32
         --device cpu --batch-size 32 --num_workers 0 --print-freq 0 --warmup-epochs 0)
  BF16=(--model deit_tiny_patch16_224 --img-size 32 -b 4 --device cpu --threads 1
        --rounds 2 --warmup 1 --iters-per-round 1)
  SWEEP=(--device cpu --img-size 32 -b 2 --threads 1 --rounds 1 --warmup 1 --iters-per-round 1
         --counter fvcore)
  SWEEP_COMPILED=(deit_small_patch16_224)
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY; run scripts/gpu_check.sh --dry-run on a CPU machine" >&2
    exit 2
  fi
  MODE="GPU"
  DEVICE=cuda
  BACKEND=nccl
  STEP_LIMIT=${STEP_LIMIT:-300}
  WORKERS=$(( $(nproc) > 8 ? 8 : $(nproc) ))
  TRAIN=(--model deit_small_patch16_224 --input-size 224 --data-set SYNTHETIC --synthetic-train-size 2048
         --synthetic-val-size 512 --device cuda --batch-size 128 --num_workers "$WORKERS" --print-freq 8
         --warmup-epochs 0)
  BF16=(--model deit_small_patch16_224 -b 128 --device cuda --rounds 3 --warmup 5 --iters-per-round 10)
  SWEEP=(--device cuda -b 256 --rounds 5 --warmup 10 --iters-per-round 10 --counter fvcore)
  SWEEP_COMPILED=(deit_small_patch16_224 deit_base_patch16_224)
fi

mkdir -p "$OUT/logs" "$OUT/runs" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }

SWEEP_MODELS="$OUT/sweep_models.txt"
cat > "$SWEEP_MODELS" <<'EOF'
# DeiT-S/B, EViT keep 0.7 (fused), ToMe r=13, shrink (blocks 0,2,4,6 removed), LTM ViT-S, DWNet-T, RaftMLP-S
deit_small_patch16_224
deit_base_patch16_224
deit_small_patch16_shrink_base --base_keep_rate 0.7 --fuse_token
deit_small_patch16_224 --tome-r 13
deit_small_patch16_224_shrink --done_layer [0,2,4,6]
ltm_vit_small_patch16_224 --compression-ratio 0.8
dwnet_tiny_patch4_window7_224
raftmlp_s
EOF
# channels-last pays off where convolutions dominate (DWNet's depth-wise convs, RaftMLP's
# token mixing on NCHW maps); the ViTs hold [B, N, C] tokens, for which it changes nothing.
SWEEP_CHANNELS_LAST=(dwnet_tiny_patch4_window7_224 raftmlp_s)

NAMES=()
STATUSES=()
SECONDS_TAKEN=()
NOTES=()

limited() { timeout --kill-after=15 "$STEP_LIMIT" "$@"; }

record() {  # name status seconds note
  NAMES+=("$1"); STATUSES+=("$2"); SECONDS_TAKEN+=("$3"); NOTES+=("$4")
  echo "[$1] $2 (${3} s)${4:+: $4}"
}

run_step() {  # name description function [args]
  local name=$1 description=$2
  shift 2
  echo
  echo "=== [$name] $description"
  local start log rc
  start=$(date +%s.%N)
  log="$OUT/logs/$name.log"
  "$@" > "$log" 2>&1
  rc=$?
  local took
  took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" = 0 ]; then
    record "$name" PASS "$took" "$(tail -n 1 "$log" | cut -c1-160)"
  else
    echo "--- last lines of $log:"
    tail -n 25 "$log" | sed 's/^/    /'
    local why="exit $rc"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then why="timed out after ${STEP_LIMIT} s"; fi
    record "$name" FAIL "$took" "$why; see logs/$name.log"
  fi
}

skip_step() {  # name description reason
  echo
  echo "=== [$1] $2"
  record "$1" SKIP 0.0 "$3"
}

# ---------------------------------------------------------------- the steps

amp_epoch() {
  limited "$PY" main.py "${TRAIN[@]}" --amp --epochs 1 --output_dir "$OUT/runs/amp" || return
  test -f "$OUT/runs/amp/checkpoint.pth" && echo "checkpoint $OUT/runs/amp/checkpoint.pth written"
}

amp_resume() {
  local source="$OUT/runs/amp/checkpoint.pth" resume_from="$OUT/runs/amp/checkpoint.pth"
  test -f "$source" || { echo "no $source: amp_epoch failed"; return 1; }
  if [ "$DRY_RUN" = 0 ]; then
    resume_from="$OUT/runs/amp_scale_1536.pth"
    # A scale no fresh GradScaler can reach (it only ever holds powers of two).
    limited "$PY" - "$source" "$resume_from" <<'EOF' || return
import sys
import torch
from utils.checkpoint import load_checkpoint_file

checkpoint = load_checkpoint_file(sys.argv[1])
assert checkpoint.get("scaler") and "scale" in checkpoint["scaler"], "the --amp checkpoint holds no GradScaler state"
print(f"GradScaler scale after the first epoch: {checkpoint['scaler']['scale']}; resuming with 1536.0")
checkpoint["scaler"]["scale"] = 1536.0
torch.save(checkpoint, sys.argv[2])
EOF
  fi
  limited "$PY" main.py "${TRAIN[@]}" --amp --epochs 2 --resume "$resume_from" --output_dir "$OUT/runs/amp_resumed" \
    || return
  limited "$PY" - "$OUT/runs/amp_resumed/checkpoint.pth" <<'EOF'
import sys
from utils.checkpoint import load_checkpoint_file

checkpoint = load_checkpoint_file(sys.argv[1])
assert checkpoint["epoch"] == 1 and checkpoint["epoch_complete"], f"resumed run ended at epoch {checkpoint['epoch']}"
print("resumed at epoch 1 from the first run's checkpoint and finished it")
EOF
}

scaler_restored() {
  limited "$PY" - "$OUT/runs/amp_resumed/checkpoint.pth" <<'EOF'
import math
import sys
from utils.checkpoint import load_checkpoint_file

scaler = load_checkpoint_file(sys.argv[1]).get("scaler")
assert scaler and "scale" in scaler, "the resumed run's checkpoint holds no GradScaler state"
scale = float(scaler["scale"])
exponent = math.log2(scale / 3) if scale > 0 else float("nan")
# Restored: 1536 = 3 * 2^9, halved on overflow steps, doubled only after 2000 clean steps.
assert scale <= 1536 and exponent == round(exponent), (
    f"GradScaler scale {scale} after resuming with 1536: the scaler state was not restored")
print(f"GradScaler restored: scale 1536 at resume, {scale:g} after the resumed epoch")
EOF
}

bf16_train() {
  limited "$PY" benchmark.py "${BF16[@]}" --precision bf16 --mode train --no-flops --output "$OUT/bf16_train.jsonl" \
    || return
  limited "$PY" - "$OUT/bf16_train.jsonl" <<'EOF'
import json
import sys

record = json.loads(open(sys.argv[1]).readline())
assert record["autocast_dtype"] == "bfloat16" and record["mode"] == "train" and not record["error"], record["error"]
print(f"bf16 autocast training steps: {record['throughput']['median']:.1f} img/s at batch {record['batch_size']} "
      f"on {record['device_name']}")
EOF
}

compile_epoch() {
  limited "$PY" main.py "${TRAIN[@]}" --amp --compile --epochs 1 --output_dir "$OUT/runs/compile" || return
  test -f "$OUT/runs/compile/checkpoint.pth" && echo "compiled run finished: $OUT/runs/compile/checkpoint.pth"
}

torchrun_one_process() {
  # main.py starts no process group at world size 1 (utils/distributed.init_distributed_mode), so the
  # backend is exercised by a DDP step under the same launcher: init, all_reduce, a DDP backward.
  limited "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 main.py "${TRAIN[@]}" --amp --epochs 1 \
    --dist-backend "$BACKEND" --output_dir "$OUT/runs/torchrun" || return
  test -f "$OUT/runs/torchrun/checkpoint.pth" || { echo "torchrun run wrote no checkpoint"; return 1; }
  cat > "$OUT/runs/ddp_step.py" <<'EOF'
import os
import sys

import torch
import torch.distributed as dist

backend, device_type = sys.argv[1], sys.argv[2]
device = torch.device(device_type, int(os.environ["LOCAL_RANK"])) if device_type == "cuda" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group(backend=backend)
value = torch.ones(4, device=device) * (dist.get_rank() + 1)
dist.all_reduce(value)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 2).to(device),
                                                  device_ids=[device.index] if device.type == "cuda" else None)
model(torch.randn(16, 8, device=device)).square().mean().backward()
grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
assert dist.get_backend() == backend and value[0].item() == dist.get_world_size() * (dist.get_world_size() + 1) / 2
assert grads_finite, "DDP backward gave non-finite gradients"
print(f"{backend}: process group of {dist.get_world_size()}, all_reduce and a DDP backward on {device} ok")
dist.destroy_process_group()
EOF
  limited "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$OUT/runs/ddp_step.py" "$BACKEND" "$DEVICE"
}

benchmark_sweep() {
  local jsonl="$OUT/benchmark.jsonl" precision=bf16 failed=0
  if [ "$DRY_RUN" = 1 ]; then precision=fp32; fi  # bf16 matmuls are emulated (slow) on most CPUs
  limited "$PY" benchmark.py --models-file "$SWEEP_MODELS" "${SWEEP[@]}" --precision "$precision" \
    --output "$jsonl" || failed=1
  limited "$PY" benchmark.py --model "${SWEEP_CHANNELS_LAST[@]}" "${SWEEP[@]}" --precision "$precision" \
    --channels-last --output "$jsonl" || failed=1
  limited "$PY" benchmark.py --model "${SWEEP_COMPILED[@]}" "${SWEEP[@]}" --precision "$precision" \
    --compile --output "$jsonl" || failed=1
  echo "$(wc -l < "$jsonl") records in $jsonl"
  return "$failed"
}

benchmark_table() {
  limited "$PY" - "$OUT/benchmark.jsonl" "$OUT/benchmark.md" <<'EOF'
import json
import sys


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


with open(sys.argv[1]) as handle:
    records = [json.loads(line) for line in handle if line.strip()]
assert records, f"{sys.argv[1]} holds no benchmark record"
first = records[0]
lines = [f"{first.get('device_name')}, torch {first['versions']['torch']}, timm {first['versions']['timm']}, "
         f"CUDA {first['versions'].get('cuda')}; inference, median of {first.get('rounds')} rounds of "
         f"{first.get('iters_per_round')} batches after {first.get('warmup')} warm-up batches; GMACs: "
         f"{first.get('flops_counter')}; compile x: compiled / eager throughput in the same run", "",
         "| model | precision | channels-last | compile | batch | img/s | IQR | ms/batch | peak MB | GMACs | compile x |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for r in records:
    tp = r.get("throughput") or {}
    lines.append("| " + " | ".join([
        f"`{r['label']}`", str(r.get("precision")), "yes" if r.get("channels_last") else "no",
        "yes" if r.get("compile") else "no", fmt(r.get("batch_size"), "d"), fmt(tp.get("median"), ".0f"),
        fmt(tp.get("iqr"), ".0f"), fmt((r.get("latency_ms") or {}).get("median"), ".2f"),
        fmt(r.get("peak_mem_mb"), ".0f"), fmt(r.get("gmacs"), ".3f"), fmt(r.get("compile_speedup"), ".2f"),
    ]) + " |" + (f" error: {r['error']}" if r.get("error") else ""))
with open(sys.argv[2], "w") as handle:
    handle.write("\n".join(lines) + "\n")
print("\n".join(lines))
errors = [r["label"] for r in records if r.get("error")]
assert not errors, f"failed runs: {', '.join(errors)}"
print(f"wrote {sys.argv[2]} ({len(records)} rows)")
EOF
}

# ---------------------------------------------------------------- run them

echo "gpu_check: $MODE, output in $OUT"
"$PY" -c 'import torch; print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|",
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' 2>&1
if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: CPU, tiny model, --amp = bf16 autocast (no GradScaler), gloo, compile via $TORCH_COMPILE_OVERRIDE_BACKENDS"
fi
TOTAL_START=$(date +%s)

run_step amp_epoch "one synthetic epoch, --amp ($([ "$DRY_RUN" = 1 ] && echo 'bf16 autocast on CPU' || echo 'fp16 + GradScaler'))" amp_epoch
run_step amp_resume "--resume from the --amp checkpoint$([ "$DRY_RUN" = 0 ] && echo ', GradScaler scale set to 1536')" amp_resume
if [ "$DRY_RUN" = 1 ]; then
  skip_step scaler_restored "GradScaler state restored by --resume" "no GradScaler on CPU (--amp is bf16 autocast there)"
else
  run_step scaler_restored "GradScaler state restored by --resume" scaler_restored
fi
run_step bf16_train "benchmark.py training steps, bf16 autocast" bf16_train
run_step compile_epoch "one synthetic epoch with --compile --amp" compile_epoch
run_step torchrun "torchrun, one process, $BACKEND" torchrun_one_process
run_step benchmark_sweep "benchmark.py sweep: $(grep -vc '^#' "$SWEEP_MODELS") models; channels-last: ${SWEEP_CHANNELS_LAST[*]}; compile: ${SWEEP_COMPILED[*]}" benchmark_sweep
run_step benchmark_table "benchmark.jsonl -> benchmark.md" benchmark_table

# ---------------------------------------------------------------- summary

FAILED=0
{
  echo "# GPU check: $MODE"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(
    "$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")' 2>/dev/null), $(( $(date +%s) - TOTAL_START )) s in all"
  echo
  echo "| step | status | seconds | note |"
  echo "|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATUSES[$i]} | ${SECONDS_TAKEN[$i]} | ${NOTES[$i]//|//} |"
    if [ "${STATUSES[$i]}" = FAIL ]; then FAILED=1; fi
  done
  echo
  echo "Benchmark: benchmark.jsonl (one record per run), benchmark.md (table); logs: logs/<step>.log"
} > "$OUT/summary.md"

echo
cat "$OUT/summary.md"
if [ "$FAILED" = 1 ]; then
  echo "gpu_check: FAILED (see the FAIL rows above)" >&2
  exit 1
fi
echo "gpu_check: all steps passed or skipped"
