#!/usr/bin/env bash
# The test suite while another process keeps every core busy: passing must not depend on the machine's speed.
#
#   tests/stress.sh [RUNS] [SLOW_START_SECONDS]
#
# Runs the README's test command RUNS times in a row (default 3) beside `stress-ng --cpu <cores>` (installed from
# Debian's packages if missing), each `reconciler` command under test starting SLOW_START_SECONDS late (default 0;
# see tests/integration/slow_start.py). Prints each run's outcome and wall time; exits non-zero on the first red run.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
export TESTS_SLOW_START_SECONDS="${2:-0}"

if ! command -v stress-ng >/dev/null; then
  apt-get update -qq && apt-get install -y -qq stress-ng >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'
fi

stress-ng --cpu "$(nproc)" --quiet &
load=$!
trap 'kill "$load" 2>/dev/null || true' EXIT

for run in $(seq 1 "$runs"); do
  started=$(date +%s)
  if .venv/bin/python -m pytest -n auto --durations=25 -p no:cacheprovider -q >"stress-run-$run.log" 2>&1; then
    outcome=passed
  else
    outcome=FAILED
  fi
  echo "run $run of $runs under load: $outcome in $(( $(date +%s) - started )) s ($(tail -n 1 "stress-run-$run.log"))"
  [ "$outcome" = passed ] || exit 1
done
