"""API keys, the gateway's front-door identity (issue 19; DESIGN.md "API key"): what a key
looks like, how it is kept (hashed) and the pure verdict on a key presented for a service.
Its messages and record (`ApiKey`, `StoredKey`, `KeyCreate`...) are in kernel/messages.py
with every other. The registry makes and revokes keys (controlplane/registry.py), Redis keeps
them (kernel/store.py), every gateway ingress checks them (activator/keygate.py).

A key reads `fnp_<id>_<secret>`: the id names the record (so a check is one lookup, and
metrics and logs name the id, never the key), the secret is 256 random bits, kept only as
its SHA-256. A fast hash is enough for a secret that random: a slow password hash (bcrypt,
argon2) guards guessable passwords against a stolen table, and would cost every request
milliseconds of CPU for nothing here."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from kernel.messages import ApiKey, StoredKey

PREFIX = "fnp"
_KEY_RE = re.compile(r"^fnp_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
# A service's name is a DNS label (ServiceSpec.validate says the same).
_SERVICE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def is_service_name(name: str) -> bool:
    return _SERVICE_RE.match(name) is not None


def burst_of(rps: float, burst: int) -> int:
    """The bucket size a key gets: as asked, else one second's worth (at least 1)."""
    return burst if burst > 0 else max(1, int(rps + 0.999))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(service: str, *, rps: float, burst: int, now: float) -> tuple[StoredKey, str]:
    """A fresh key for `service`: its record (hashed) and the whole key, to show once."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)  # 43 characters
    record = ApiKey(id=key_id, service=service, rps=rps,
                    burst=burst_of(rps, burst) if rps > 0 else burst, created_at=now)
    return StoredKey(key=record, secret_sha256=hash_secret(secret)), f"{PREFIX}_{key_id}_{secret}"


def parse(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    m = _KEY_RE.match(token)
    return (m.group(1), m.group(2)) if m else None


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


@dataclass(frozen=True)
class Verdict:
    """`status` 0: let in. Otherwise the answer's status (401, 403) and why; `key_id` is ""
    when the presented token names no key (never the token itself)."""

    status: int
    reason: str  # ok | missing | malformed | unknown | revoked | wrong_service
    message: str
    key_id: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 0


def verdict(token: str | None, stored: StoredKey | None, service: str) -> Verdict:
    """The decision on a presented token, given the record its id names (None: no such
    record). A wrong secret reads as an unknown key: nothing tells a caller it guessed an id."""
    if token is None:
        return Verdict(401, "missing", "an API key is required: send 'Authorization: Bearer "
                                       "<key>' (fnplane key create --service NAME)")
    parsed = parse(token)
    if parsed is None:
        return Verdict(401, "malformed", "invalid API key")
    key_id, secret = parsed
    if stored is None or not hmac.compare_digest(stored.secret_sha256, hash_secret(secret)):
        return Verdict(401, "unknown", "invalid API key")
    if stored.key.revoked_at:
        return Verdict(401, "revoked", f"API key {key_id} was revoked", key_id)
    if stored.key.service != service:
        return Verdict(403, "wrong_service",
                       f"API key {key_id} is not for model {service}", key_id)
    return Verdict(0, "ok", "", key_id)
