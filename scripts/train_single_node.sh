#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes):
#   NPROC=8 scripts/train_single_node.sh --model deit_small_patch16_224 --data-path /imagenet \
#       --batch-size 128 --output_dir out/deit_s --auto-resume
# Any main.py flags may follow; --cfg configs/deit_small_patch16_224.yaml works too.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$ROOT/main.py" "$@"
