"""The floor under every placement: raw nats-py request-reply per second through the same
NATS server, at the same concurrency, with a responder in its own OS process (as a
scheduler is), and a payload the size of a PlaceRequest. A placement is at least one such
round trip plus the node's start (another), so placements/s as a fraction of this is how much
of the cost is ours rather than the bus's.

Beside it, the same round trip through fnplane's own `Bus` (msgpack-decoded PlaceRequest, a
task per request as the scheduler serves placements, the typed reply decoded): what our
messaging layer costs before any placement logic runs. Half of it is the ceiling of a path
made of two such round trips.

    python -m loadtests.nats_floor serve NATS_URL SUBJECT [raw|bus]   (prints READY)
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import nats

from kernel.bus import Bus
from kernel.endpoints import Endpoint
from kernel.messages import Empty, PlaceRequest
from kernel.procs import ManagedProcess

READY = "nats-floor responder ready"
SUBJECT = "bench.floor.echo"
REPO = Path(__file__).resolve().parent.parent
# A benchmark-only conversation (not one of fnplane's: kernel/endpoints.py does not list it).
BUS_FLOOR: Endpoint[PlaceRequest, Empty] = Endpoint(
    "bench-floor", "bench.floor.bus", PlaceRequest, Empty, ("bench",), ("bench",),
    "the Bus's own request-reply, for the floor")


async def serve(url: str, subject: str, how: str = "raw") -> None:
    if how == "bus":
        bus = await Bus.connect(url, "nats-floor")

        async def answer(_msg: PlaceRequest, _raw: nats.aio.msg.Msg) -> Empty:
            return Empty()

        await bus.serve(BUS_FLOOR, answer, concurrent=True)
    else:
        nc = await nats.connect(url)

        async def echo(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(subject, cb=echo)
        await nc.flush()
    print(READY, flush=True)
    await asyncio.Event().wait()


async def closed_loop(ask: Callable[[], Awaitable[object]], *, concurrency: int,
                      requests: int) -> float:
    """Requests per second with `concurrency` in flight, as the benchmark drives placements
    (after a short warm-up)."""

    async def worker(todo: Iterator[int]) -> None:
        for _ in todo:
            await ask()

    warm = iter(range(min(200, requests)))
    await asyncio.gather(*(worker(warm) for _ in range(8)))
    todo = iter(range(requests))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(todo) for _ in range(concurrency)))
    return requests / (time.perf_counter() - t0)


async def request_rate(
    url: str, subject: str, *, concurrency: int, requests: int, payload: bytes
) -> float:
    """Raw nats-py request-reply."""
    nc = await nats.connect(url)
    try:
        return await closed_loop(lambda: nc.request(subject, payload, timeout=10.0),
                                 concurrency=concurrency, requests=requests)
    finally:
        await nc.close()


async def bus_rate(url: str, *, concurrency: int, requests: int, payload: bytes) -> float:
    """The same through `Bus.call`, with a typed request and reply."""
    bus = await Bus.connect(url, "nats-floor-driver")
    msg = msgspec.msgpack.decode(payload, type=PlaceRequest)
    try:
        return await closed_loop(lambda: bus.call(BUS_FLOOR, msg, timeout=10.0),
                                 concurrency=concurrency, requests=requests)
    finally:
        await bus.close()


async def _responder(url: str, how: str, log_dir: Path) -> ManagedProcess:
    argv = [sys.executable, "-m", "loadtests.nats_floor", "serve", url, SUBJECT, how]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await ManagedProcess.start(argv, name=f"nats-floor-{how}", log_dir=log_dir, env=env,
                                      cwd=REPO)  # fmt: skip
    async with asyncio.timeout(30.0):
        if not await proc.wait_for_line(READY):
            await proc.stop(timeout=5.0)
            raise RuntimeError(f"nats-floor responder did not start:\n{proc.tail(20)}")
    return proc


async def measure(
    url: str, log_dir: Path, *, concurrency: int, requests: int, payload: bytes
) -> dict[str, float | int]:
    proc = await _responder(url, "raw", log_dir)
    try:
        rps = await request_rate(url, SUBJECT, concurrency=concurrency, requests=requests,
                                 payload=payload)
    finally:
        await proc.stop(timeout=5.0)
    proc = await _responder(url, "bus", log_dir)
    try:
        bus_rps = await bus_rate(url, concurrency=concurrency, requests=requests,
                                 payload=payload)
    finally:
        await proc.stop(timeout=5.0)
    return {"rps": round(rps, 1), "bus_rps": round(bus_rps, 1),
            "two_round_trip_ceiling_per_s": round(bus_rps / 2, 1), "concurrency": concurrency,
            "requests": requests, "payload_bytes": len(payload)}


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "serve":
        how = sys.argv[4] if len(sys.argv) == 5 else "raw"
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(sys.argv[2], sys.argv[3], how))
        else:
            uvloop.run(serve(sys.argv[2], sys.argv[3], how))
    else:
        sys.exit(__doc__)
