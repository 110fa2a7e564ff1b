#!/usr/bin/env bash
# The README's second command: set up the environment if needed, then run the whole
# test suite (unit, end-to-end and reliability tests, the slow ones included).
# Extra arguments go to pytest, e.g. `scripts/run_tests.sh -m "not slow"`.
# Tests run in one pytest-xdist worker per core (at most 4; PYTEST_WORKERS overrides,
# 0 runs them in this process), each with one OpenMP thread: most of the suite is tiny
# models and single-threaded subprocesses, which a second core speeds up nearly 2x.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
cores=$(nproc 2>/dev/null || echo 1)
workers=${PYTEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
if [ "$workers" -gt 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec .venv/bin/python -m pytest -n "$workers" "${@:--q}"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest "${@:--q}"
