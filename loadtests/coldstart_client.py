"""The client of `loadtests.coldstart_parallel`, in its own process: one OIP v2 infer request to
each URL given, all sent at once (Knative's scale-from-zero test shape: N services woken
together, one request each), one JSON document of per-request records on stdout at the end.

It runs apart from the embedded stack for the reason `loadtests.burst_client` does: a client
sharing the stack's event loop and GIL would be measured along with the control plane.

    python -m loadtests.coldstart_client --timeout 120 URL [URL ...]

Output: {"records": [[url, sent (wall clock), latency ms, HTTP status (0: no answer),
pod (X-Fnplane-Pod), error name], ...]} in the order of the URLs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp

from loadtests.burst_client import BODY, JSON_HEADERS

Record = tuple[str, float, float, int, str, str]


async def wake(urls: list[str], timeout_s: float) -> list[Record]:
    """One request per URL, all in flight together; each has its own connection, so none
    waits for another's (a shared pool would queue them behind its limit)."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one(url: str) -> Record:
            sent = time.time()
            start = time.perf_counter()
            status, pod, error = 0, "", ""
            try:
                async with http.post(url, data=BODY, headers=JSON_HEADERS) as resp:
                    await resp.read()
                    status, pod = resp.status, resp.headers.get("X-Fnplane-Pod", "")
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = type(exc).__name__
            return url, sent, (time.perf_counter() - start) * 1000.0, status, pod, error

        return list(await asyncio.gather(*(one(u) for u in urls)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.coldstart_client")
    p.add_argument("urls", nargs="+")
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    records = run(wake(args.urls, args.timeout))
    json.dump({"records": records}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
