#!/usr/bin/env bash
# The test command: set up, lint, type-check, then the whole suite on LiteRT and the
# backend-independent part again on tflite-runtime. Extra arguments go to pytest.
# Every stage runs even when an earlier one failed; one summary at the end names each
# stage's outcome, and the exit status is non-zero if any of them failed.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test || exit 1

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
summary=()
failed=0

# stage NAME COMMAND...: run it, its output teed to a log; record the outcome line.
stage() {
  local name=$1 status=0 outcome
  shift
  echo "== $name"
  "$@" 2>&1 | tee "$logs/stage.log" || status=$?
  if [ "$status" -eq 5 ]; then
    # pytest collected no tests: that is a failure here, never a pass.
    outcome="FAILED: pytest collected no tests"
    status=1
  elif [ "$status" -eq 0 ]; then
    outcome="ok"
  else
    outcome="FAILED (exit $status)"
  fi
  # pytest's closing line (counts and time), where the stage is a pytest run.
  local counts
  counts=$(grep -E '(passed|failed|errors?|deselected|no tests ran).* in [0-9.]+s' "$logs/stage.log" | tail -1 | tr -d '=' | xargs)
  summary+=("$(printf '%-34s %s%s' "$name" "$outcome" "${counts:+  [$counts]}")")
  [ "$status" -eq 0 ] || failed=1
}

stage "ruff" bash -c '.venv/bin/ruff check . && .venv/bin/ruff format --check .'
stage "mypy" scripts/typecheck.sh
EDGEFLEET_BACKEND=litert stage "pytest (LiteRT)" .venv/bin/python -m pytest "$@"
if [ -x .venv-tflite/bin/python ]; then
  EDGEFLEET_BACKEND=tflite-runtime \
    stage "pytest (tflite-runtime, backend)" .venv-tflite/bin/python -m pytest -m backend "$@"
else
  summary+=("$(printf '%-34s %s' "pytest (tflite-runtime, backend)" "not run: tflite-runtime is not installable here (see the set-up above)")")
fi

echo "== summary"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "test.sh: FAILED (see the stages above)" >&2
  exit 1
fi
echo "test.sh: all stages passed"
