#!/usr/bin/env bash
# The main job: installs what it needs (first run only), starts the embedded stack, deploys
# the sample model at zero pods, serves requests from zero and prints the cold-start breakdown.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m controlplane.demo "$@"
