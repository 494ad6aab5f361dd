"""The state dir's own schema stamp (`fnplane-state.json`), checked before `fnplane up`
starts a server on it: a state dir of a newer release is refused whole with what to do,
never half-read; one of the first release (which stamped nothing) is adopted and stamped.
Redis and JetStream carry their own stamps (kernel/store.py, activator/nats_events.py).
The dir is private to fnplane's user (0700)."""

from __future__ import annotations

import json
from pathlib import Path

from kernel.store import STATE_SCHEMA, StateSchemaError, schema_verdict

STAMP = "fnplane-state.json"


def check_state_dir(state: Path) -> int:
    """Stamp or refuse `state` (created if missing); returns its schema version.

    The dir is made (or tightened to) 0700: it holds the credentials, NATS's config and
    Redis's data, and pods run as another user must not read any of it. Pods need nothing
    in it: a node agent writes their logs there itself."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.chmod(0o700)
    stamp = state / STAMP
    found: int | None = None
    if stamp.exists():
        try:
            found = int(json.loads(stamp.read_text())["schema"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StateSchemaError(
                f"{stamp} is unreadable ({exc}): restore it, or start on a fresh --state-dir"
            ) from None
    version = schema_verdict(found, where=f"state dir {state}")
    if found is None:
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema": version}) + "\n")
        tmp.replace(stamp)  # atomic: a crash leaves the old state or the whole stamp
    return version


__all__ = ["STATE_SCHEMA", "StateSchemaError", "check_state_dir"]
