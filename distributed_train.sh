#!/usr/bin/env bash
# timm-style launcher used by the LTM scripts:
#   ./distributed_train.sh NUM_PROC DATA_DIR [main.py args...]
# runs `torchrun --nproc_per_node=NUM_PROC main.py --defaults timm DATA_DIR args...` on this
# node (standalone rendezvous on a free port): timm train.py's defaults, then the model's
# recipe configs/<model>.yaml when it exists, then the arguments, as the official LTM
# repository (a timm fork) means them. Relative paths stay relative to where you are.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_PROC DATA_DIR [main.py args...]" >&2
  exit 2
fi
NUM_PROC=$1
shift
ROOT=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NUM_PROC" "$ROOT/main.py" --defaults timm "$@"
