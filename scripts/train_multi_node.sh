#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 \
#       scripts/train_multi_node.sh --model deit_base_patch16_224 --data-path /imagenet \
#       --batch-size 64 --output_dir /shared/out/deit_b --auto-resume
# NODE_RANK is informational with c10d (torchrun assigns ranks); MASTER_ADDR must be
# reachable from every node; --output_dir must be on a shared file system.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: "${NNODES:?set NNODES (number of nodes)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host name of the rendezvous node)}"
MASTER_PORT=${MASTER_PORT:-29500}
NODE_RANK=${NODE_RANK:-0}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
RDZV_ID=${RDZV_ID:-deit_${MASTER_ADDR}_${MASTER_PORT}}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
  --max_restarts="${MAX_RESTARTS:-0}" \
  "$ROOT/main.py" "$@"
