"""A key's rate limit as a token bucket (issue 19): `rps` tokens a second up to `burst`, one
per request; a request that finds less than a token waits (429 with Retry-After) instead.

`take` is the decision, pure, with time a parameter. Gateway workers and activator replicas
must share one bucket per key — the kernel hands a client's connection to one worker
(SO_REUSEPORT hashes connections), and a gRPC channel is one connection, so a 1/N share per
worker would hold a single client to rps/N — so the bucket lives in Redis and `SCRIPT` is
`take` transcribed to Lua, run atomically there (tests/test_apikeys.py runs both on the same
sequences and holds them equal). Change them together."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    tokens: float
    at: float  # when `tokens` was last brought up to date


def take(bucket: Bucket | None, *, rps: float, burst: int, now: float) -> tuple[Bucket, float]:
    """The bucket after one request at `now`, and how long that request must wait for a
    token (0: it takes one now). A missing bucket is a full one. Time never runs back: a
    caller whose clock is behind the last one's refills nothing."""
    tokens, at = (float(burst), now) if bucket is None else (bucket.tokens, bucket.at)
    if now > at:
        tokens, at = min(float(burst), tokens + (now - at) * rps), now
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, at), 0.0
    return Bucket(tokens, at), (1.0 - tokens) / rps


def retry_after_s(wait_s: float) -> int:
    """Retry-After is whole seconds: rounded up, at least 1."""
    return max(1, math.ceil(wait_s))


def idle_expiry_ms(rps: float, burst: int) -> int:
    """After this long unused a bucket is full again, the same as no bucket: Redis may drop it."""
    return math.ceil(burst / rps * 1000) + 1000


# KEYS[1]: the key's bucket; ARGV: rps, burst, now (seconds). Returns the wait as a string
# (Redis would truncate a Lua number to an integer).
SCRIPT = """
local rps = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(s[1]), tonumber(s[2])
if tokens == nil or at == nil then tokens, at = burst, now end
if now > at then tokens, at = math.min(burst, tokens + (now - at) * rps), now end
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rps end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.9f', tokens),
           'at', string.format('%.6f', at))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rps * 1000) + 1000)
return string.format('%.9f', wait)
"""
