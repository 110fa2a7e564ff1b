#!/usr/bin/env bash
# The README's second command: set up the environment if needed, then run the whole
# test suite (unit, end-to-end and reliability tests, the slow ones included).
# Extra arguments go to pytest, e.g. `scripts/run_tests.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest "${@:--q}"
