"""The load generator of `loadtests.burst`, in its own process: a burst of OIP v2 infer requests
with bounded concurrency, one JSON document of per-request records on stdout at the end.

It runs apart from the embedded stack on purpose: a client sharing the stack's event loop (and
GIL) stalls it for as long as it takes to open and parse hundreds of connections at once, and
the benchmark would measure its own load generator instead of the activator.

    python -m loadtests.burst_client --url http://127.0.0.1:8080/v2/models/sample/infer \\
        --requests 1000 --concurrency 200

Output: {"started": wall clock of the first send, "records": [[sent (wall clock), latency ms,
HTTP status (0: no answer), pod (X-Fnplane-Pod), error name], ...]}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp

BODY = json.dumps(
    {
        "id": "burst",
        "inputs": [
            {
                "name": "input-0",
                "shape": [2, 4],
                "datatype": "FP32",
                "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3],
            }
        ],
    }
).encode()
JSON_HEADERS = {"Content-Type": "application/json"}

Record = tuple[float, float, int, str, str]


async def burst(url: str, requests: int, concurrency: int, timeout_s: float) -> list[Record]:
    gate = asyncio.Semaphore(concurrency)
    records: list[Record] = []

    async def one(http: aiohttp.ClientSession) -> None:
        async with gate:
            sent = time.time()
            start = time.perf_counter()
            status, pod, error = 0, "", ""
            try:
                async with http.post(url, data=BODY, headers=JSON_HEADERS) as resp:
                    await resp.read()
                    status, pod = resp.status, resp.headers.get("X-Fnplane-Pod", "")
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = type(exc).__name__
            except asyncio.CancelledError:
                error = "cancelled"
                raise
            finally:
                ms = (time.perf_counter() - start) * 1000.0
                records.append((sent, ms, status, pod, error))

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(one(http) for _ in range(requests)))
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.burst_client")
    p.add_argument("--url", required=True)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--timeout", type=float, default=90.0, help="per request, seconds")
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    records = run(burst(args.url, args.requests, args.concurrency, args.timeout))
    started = min((r[0] for r in records), default=time.time())
    json.dump({"started": started, "records": records}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
