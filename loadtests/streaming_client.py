"""The load generator of `loadtests.streaming`, in its own process (as `burst_client`, so
the stack's event loop measures the gateway, not its load generator): streamed chat
completions, `--streams` of them with `--concurrency` in flight, each read event by event.

    python -m loadtests.streaming_client --url http://127.0.0.1:8080/openai/v1/chat/completions \\
        --model tokens --streams 200 --concurrency 200 --tokens 100

`--sequential` sends one at a time instead (the added time to first token); `--url` may be
given twice, and the streams then alternate between the two URLs (gateway, pod).

Output: {"records": [[url index, sent (wall clock), time to first token ms (null: none),
total ms, tokens, status (0: no answer), complete (the pod's [DONE] arrived), error], ...]}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp

Record = tuple[int, float, float | None, float, int, int, bool, str]


async def one(http: aiohttp.ClientSession, which: int, url: str, body: bytes) -> Record:
    sent = time.time()
    start = time.perf_counter()
    first: float | None = None
    tokens, status, done, error = 0, 0, False, ""
    try:
        async with http.post(url, data=body, headers={"Content-Type": "application/json"}
                             ) as resp:
            status = resp.status
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                delta = json.loads(data)["choices"][0].get("delta") or {}
                if delta.get("content"):
                    tokens += 1
                    if first is None:
                        first = (time.perf_counter() - start) * 1000
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        error = type(exc).__name__
    return (which, sent, first, (time.perf_counter() - start) * 1000, tokens, status, done,
            error)


async def run(urls: list[str], model: str, streams: int, concurrency: int, tokens: int,
              sequential: bool, timeout_s: float) -> list[Record]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "go"}],
                       "stream": True, "max_tokens": tokens}).encode()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        if sequential:
            return [await one(http, i % len(urls), urls[i % len(urls)], body)
                    for i in range(streams)]
        gate = asyncio.Semaphore(concurrency)

        async def gated(i: int) -> Record:
            async with gate:
                return await one(http, i % len(urls), urls[i % len(urls)], body)

        return list(await asyncio.gather(*(gated(i) for i in range(streams))))


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.streaming_client")
    p.add_argument("--url", action="append", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args()
    records = asyncio.run(run(a.url, a.model, a.streams, a.concurrency, a.tokens,
                              a.sequential, a.timeout))
    json.dump({"records": records}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
