#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from requirements.txt.
# Idempotent: does nothing when .venv already matches requirements.txt.
# Honours PYTHON (interpreter to build the venv from) and VENV_DIR (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV_DIR=${VENV_DIR:-.venv}
stamp="$VENV_DIR/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -x "$VENV_DIR/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $VENV_DIR from requirements.txt (one-time, about a minute) ..."
[ -x "$VENV_DIR/bin/python" ] || "$PYTHON" -m venv "$VENV_DIR"
"$VENV_DIR/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
"$VENV_DIR/bin/python" -c "import torch, timm, torchvision" \
  || { echo "[setup] installing requirements failed: see the pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] ready: $("$VENV_DIR/bin/python" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)')"
