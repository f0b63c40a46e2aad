#!/usr/bin/env bash
# The test command: set up, lint, type-check, then the whole suite on LiteRT and the
# backend-independent part again on tflite-runtime. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test

echo "== ruff" && .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy" && scripts/typecheck.sh

# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
run_pytest() {
  local status=0
  "$@" || status=$?
  if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
  fi
  return "$status"
}

echo "== pytest (LiteRT)"
EDGEFLEET_BACKEND=litert run_pytest .venv/bin/python -m pytest "$@"
if [ -x .venv-tflite/bin/python ]; then
  echo "== pytest (tflite-runtime, backend tests)"
  EDGEFLEET_BACKEND=tflite-runtime run_pytest .venv-tflite/bin/python -m pytest -m backend "$@"
else
  echo "== tflite-runtime not installable here: its backend run was skipped (see above)"
fi
