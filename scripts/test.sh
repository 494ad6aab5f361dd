#!/usr/bin/env bash
# The whole test suite, against real nats-server and Redis started by the fixtures.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
"$ROOT/.venv/bin/ruff" check .
"$ROOT/.venv/bin/lint-imports" --no-cache
# The slowest tests are listed at the end: the suite must stay well under CI's budget.
exec "$ROOT/.venv/bin/pytest" -q --durations=15 "$@"
