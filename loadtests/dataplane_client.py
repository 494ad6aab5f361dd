"""The open-loop load generator of `loadtests.dataplane`, in its own process: requests at a
constant arrival rate, interleaved over several targets (paths), one JSON document on stdout.

Open loop, as Knative's dataplane-probe: arrival j is *scheduled* at `start + j / rate` whether
or not earlier requests have been answered, and its latency is measured from that scheduled
time, not from when this process got round to sending it. A generator that falls behind (a
busy CPU, a slow event loop) therefore shows up as latency instead of silently sending less
(coordinated omission); how far behind it fell is reported on its own, as the lag.

Several processes can share one schedule: process `index` of `of` takes arrivals j with
j % of == index, so together they keep the combined rate while each stays below what one
event loop can send. Arrival j goes to target j % len(targets), so every path sees the same
moments of load.

    python -m loadtests.dataplane_client --target pod=http://127.0.0.1:9001/v2/models/s/infer \\
        --target proxy=http://127.0.0.1:8080/v2/models/s/infer --rate 250 --duration 10

With `--start-at 0` it prints "ready" on a line of its own once set up and reads the wall
clock of the first send from stdin. Output: {"window": [wall clock start, end], "cpu_s": CPU
seconds in the window, "lag_ms": ..., "paths": {name: {"latency_ms": [...], "service_ms":
[...], "status": {...}, "path_header": {...}, "errors": {...}}}}. Arrivals in the warm-up
(first `--warmup` seconds) are sent (they open the connection pools) but not recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from loadtests.burst_client import BODY, JSON_HEADERS


@dataclass
class PathRecords:
    latency_ms: list[float] = field(default_factory=list)  # from the scheduled send time
    service_ms: list[float] = field(default_factory=list)  # from the actual send
    status: Counter[str] = field(default_factory=Counter)
    path_header: Counter[str] = field(default_factory=Counter)  # X-Fnplane-Path, "-": none
    errors: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, object]:
        return {
            "latency_ms": [round(x, 3) for x in self.latency_ms],
            "service_ms": [round(x, 3) for x in self.service_ms],
            "status": dict(self.status),
            "path_header": dict(self.path_header),
            "errors": dict(self.errors),
        }


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run(
    targets: list[tuple[str, str]],
    *,
    rate: float,
    duration_s: float,
    warmup_s: float,
    start_at: float,
    index: int,
    of: int,
    timeout_s: float,
    connections: int,
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    if start_at <= 0:
        # Told when to begin once ready: on a busy machine importing aiohttp takes seconds,
        # and a start time fixed before that would find some processes still starting.
        print("ready", flush=True)
        start_at = float(sys.stdin.readline())
    # Scheduling runs on the loop's monotonic clock; the wall clock only says when to begin,
    # so every process of one run starts the same schedule at the same moment.
    t0 = loop.time() + max(0.0, start_at - time.time())
    total_rate = rate * len(targets)
    n_warm = round(warmup_s * total_rate)
    n_total = n_warm + round(duration_s * total_rate)
    records = {name: PathRecords() for name, _ in targets}
    lag_ms: list[float] = []
    cpu_at_window: list[float] = []
    in_flight: set[asyncio.Task[None]] = set()
    # One pool per target: connections are kept alive and reused, and a target whose
    # answers lag cannot take the sockets of another. Bounded: an overloaded target would
    # otherwise be sent a new connection per arrival until the descriptors run out; past
    # the bound a request waits for a connection, and that wait counts in its latency
    # (measured from the schedule), as a real client's would.
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, keepalive_timeout=30.0),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )
        for _ in targets
    ]

    async def one(j: int, due: float) -> None:
        slot = j % len(targets)
        name, url = targets[slot]
        sent = loop.time()
        status, header, error = 0, "", ""
        try:
            async with sessions[slot].post(url, data=BODY, headers=JSON_HEADERS) as resp:
                await resp.read()
                status = resp.status
                header = resp.headers.get("X-Fnplane-Path", "-")
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = type(exc).__name__
        done = loop.time()
        if j < n_warm:
            return
        rec = records[name]
        rec.latency_ms.append((done - due) * 1000.0)
        rec.service_ms.append((done - sent) * 1000.0)
        lag_ms.append((sent - due) * 1000.0)
        if error:
            rec.errors[error] += 1
        else:
            rec.status[str(status)] += 1
            rec.path_header[header] += 1

    def launch(j: int, due: float) -> None:
        if j == n_warm:
            cpu_at_window.append(cpu_seconds())
        task = loop.create_task(one(j, due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    try:
        j = index
        while j < n_total:
            due = t0 + j / total_rate
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # Everything due by now goes at once: behind schedule, catch up, never skip.
            now = loop.time()
            while j < n_total and (due := t0 + j / total_rate) <= now:
                launch(j, due)
                j += of
        if in_flight:
            await asyncio.wait(set(in_flight))
    finally:
        for s in sessions:
            await s.close()
    window_start = start_at + warmup_s
    return {
        "window": [window_start, time.time()],
        "cpu_s": cpu_seconds() - (cpu_at_window[0] if cpu_at_window else 0.0),
        "lag_ms": [round(x, 3) for x in lag_ms],
        "paths": {name: rec.to_json() for name, rec in records.items()},
    }


def target(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith("http"):
        raise argparse.ArgumentTypeError(f"expected NAME=URL, got {text!r}")
    return name, url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.dataplane_client")
    p.add_argument("--target", type=target, action="append", required=True,
                   help="NAME=URL, repeated: arrivals rotate over them")
    p.add_argument("--rate", type=float, required=True, help="requests per second per target")
    p.add_argument("--duration", type=float, required=True, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds first")
    p.add_argument("--start-at", type=float, default=0.0,
                   help="wall clock of the first send (0: print 'ready', then read it on stdin)")
    p.add_argument("--index", type=int, default=0, help="this process's share of the schedule")
    p.add_argument("--of", type=int, default=1, help="processes sharing the schedule")
    p.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    p.add_argument("--connections", type=int, default=256,
                   help="open connections per target at most")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or not 0 <= args.index < args.of:
        p.error("--rate and --duration must be > 0, 0 <= --index < --of")
    if args.connections < 1:
        p.error("--connections must be >= 1")
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    out = runner(run(args.target, rate=args.rate, duration_s=args.duration,
                     warmup_s=args.warmup, start_at=args.start_at,
                     index=args.index, of=args.of, timeout_s=args.timeout,
                     connections=args.connections))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
