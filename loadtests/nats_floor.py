"""The floor under every placement: raw nats-py request-reply per second through the same
NATS server, at the same concurrency, with a responder in its own OS process (as a
scheduler is), and a payload the size of a PlaceRequest. A placement is at least one such
round trip plus the node's start (another), so placements/s as a fraction of this is how much
of the cost is ours rather than the bus's.

    python -m loadtests.nats_floor serve NATS_URL SUBJECT   (the responder; prints READY)
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats

from kernel.procs import ManagedProcess

READY = "nats-floor responder ready"
SUBJECT = "bench.floor.echo"
REPO = Path(__file__).resolve().parent.parent


async def serve(url: str, subject: str) -> None:
    nc = await nats.connect(url)

    async def echo(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, cb=echo)
    await nc.flush()
    print(READY, flush=True)
    await asyncio.Event().wait()


async def request_rate(
    url: str, subject: str, *, concurrency: int, requests: int, payload: bytes
) -> float:
    """Closed loop, `concurrency` in flight, as the benchmark drives placements."""
    nc = await nats.connect(url)

    async def worker(todo: Iterator[int]) -> None:
        for _ in todo:
            await nc.request(subject, payload, timeout=10.0)

    try:
        warm = iter(range(min(200, requests)))
        await asyncio.gather(*(worker(warm) for _ in range(8)))
        todo = iter(range(requests))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(todo) for _ in range(concurrency)))
        return requests / (time.perf_counter() - t0)
    finally:
        await nc.close()


async def measure(
    url: str, log_dir: Path, *, concurrency: int, requests: int, payload: bytes
) -> dict[str, float | int]:
    argv = [sys.executable, "-m", "loadtests.nats_floor", "serve", url, SUBJECT]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await ManagedProcess.start(argv, name="nats-floor", log_dir=log_dir, env=env, cwd=REPO)
    try:
        async with asyncio.timeout(30.0):
            if not await proc.wait_for_line(READY):
                raise RuntimeError(f"nats-floor responder did not start:\n{proc.tail(20)}")
        rps = await request_rate(url, SUBJECT, concurrency=concurrency, requests=requests,
                                 payload=payload)
    finally:
        await proc.stop(timeout=5.0)
    return {"rps": round(rps, 1), "concurrency": concurrency, "requests": requests,
            "payload_bytes": len(payload)}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(sys.argv[2], sys.argv[3]))
        else:
            uvloop.run(serve(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
