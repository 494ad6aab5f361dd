"""A pod that streams: a tiny token generator behind the OpenAI-compatible paths vLLM and TGI
serve (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `GET /v1/models`), and
an Open Inference Protocol infer that streams when asked. No language model: token i of a
completion is `tok{i} `, written every `TOKEN_DELAY_MS`, so the gateway's streaming (first
token before the last, a slot held until the end, a client that leaves) can be seen and
measured without a GPU. It follows the pod contract: `PORT`, `/v2/health/ready`, SIGTERM.

Run: `PORT=8080 MODEL_NAME=tokens python -m examples.tokens.server`. Environment: `PORT`
(required), `HOST` (127.0.0.1), `MODEL_NAME` ("tokens"), `TOKEN_DELAY_MS` (10), `TOKENS` (16,
a completion's length when the request sets no `max_tokens`).

Each streamed event carries `sent_at` (the pod's clock, seconds) besides OpenAI's fields, and
a request may set `first_delay_ms` (wait before answering at all) and `token_delay_ms` — the
knobs tests use for the timeouts. `GET /stats` counts streams: active, finished, and cut
(their client left before the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Stats:
    active: int = 0
    finished: int = 0
    cut: int = 0


@dataclass
class TokenServer:
    model: str
    token_delay_s: float
    tokens: int
    stats: Stats = field(default_factory=Stats)

    def build_app(self) -> web.Application:
        app = web.Application()
        app.add_routes([
            web.get("/v2/health/ready", self.ok), web.get("/v2/health/live", self.ok),
            web.get("/health", self.ok), web.get("/stats", self.get_stats),
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completion),
            web.post("/v1/embeddings", self.embeddings),
            web.post("/v2/models/{name}/infer", self.infer),
        ])
        return app

    async def ok(self, _request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def get_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(vars(self.stats))

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "fnplane"}]})

    # ---- OpenAI --------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, plan = await self._plan(request)
        if isinstance(body, web.Response):
            return body
        rid = f"chatcmpl-{os.getpid()}-{time.monotonic_ns()}"

        def chunk(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {"role": "assistant", "content": ""} if i < 0 else {"content": text}
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": self.model, "sent_at": time.time(),
                    "choices": [{"index": 0, "delta": delta if finish is None else {},
                                 "finish_reason": finish}]}

        if body.get("stream"):
            events = [lambda: chunk(-1, None, None)]
            events += [(lambda i=i: chunk(i, f"tok{i} ", None)) for i in range(plan.n)]
            events.append(lambda: chunk(plan.n, None, "stop"))
            return await self._sse(request, events, plan)
        text = await self._generate(plan)
        return web.json_response({
            "id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": self.model, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": text}}], "usage": _usage(plan.n)})

    async def completion(self, request: web.Request) -> web.StreamResponse:
        body, plan = await self._plan(request)
        if isinstance(body, web.Response):
            return body
        rid = f"cmpl-{os.getpid()}-{time.monotonic_ns()}"

        def chunk(i: int) -> dict[str, Any]:
            last = i == plan.n - 1
            return {"id": rid, "object": "text_completion", "created": int(time.time()),
                    "model": self.model, "sent_at": time.time(), "choices": [{
                        "index": 0, "text": f"tok{i} ", "logprobs": None,
                        "finish_reason": "stop" if last else None}]}

        if body.get("stream"):
            return await self._sse(request, [(lambda i=i: chunk(i)) for i in range(plan.n)],
                                   plan)
        text = await self._generate(plan)
        return web.json_response({
            "id": rid, "object": "text_completion", "created": int(time.time()),
            "model": self.model, "choices": [{"index": 0, "text": text, "logprobs": None,
                                              "finish_reason": "stop"}],
            "usage": _usage(plan.n)})

    async def embeddings(self, request: web.Request) -> web.Response:
        body, _plan = await self._plan(request)
        if isinstance(body, web.Response):
            return body
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        data = [{"object": "embedding", "index": i, "embedding": _vector(str(t))}
                for i, t in enumerate(texts)]
        return web.json_response({"object": "list", "data": data, "model": self.model,
                                  "usage": {"prompt_tokens": len(texts),
                                            "total_tokens": len(texts)}})

    # ---- Open Inference Protocol, streamed when asked -------------------------------------

    async def infer(self, request: web.Request) -> web.StreamResponse:
        body, plan = await self._plan(request)
        if isinstance(body, web.Response):
            return body

        def event(i: int) -> dict[str, Any]:
            return {"model_name": self.model, "sent_at": time.time(), "outputs": [{
                "name": "token", "shape": [1], "datatype": "BYTES", "data": [f"tok{i} "]}]}

        if (body.get("parameters") or {}).get("stream"):
            return await self._sse(request, [(lambda i=i: event(i)) for i in range(plan.n)],
                                   plan, done=False)
        text = await self._generate(plan)
        return web.json_response({"model_name": self.model, "outputs": [{
            "name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]})

    # ---- the generator -------------------------------------------------------------------

    async def _plan(self, request: web.Request) -> tuple[Any, Plan]:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid JSON body"), Plan(0, 0)
        if not isinstance(body, dict):
            return _error(400, "expected a JSON object"), Plan(0, 0)
        params = {**body, **(body.get("parameters") or {})}
        n = int(params.get("max_tokens") or params.get("max_completion_tokens") or self.tokens)
        delay = params.get("token_delay_ms")
        plan = Plan(n, self.token_delay_s if delay is None else float(delay) / 1000)
        first = float(params.get("first_delay_ms") or 0) / 1000
        if first:
            await asyncio.sleep(first)
        return body, plan

    async def _generate(self, plan: Plan) -> str:
        out = []
        for i in range(plan.n):
            await asyncio.sleep(plan.delay_s)
            out.append(f"tok{i} ")
        return "".join(out)

    async def _sse(self, request: web.Request, events: list[Any], plan: Plan, *,
                   done: bool = True) -> web.StreamResponse:
        """Server-sent events, one per token, as vLLM writes them (`data: {...}`, then
        `data: [DONE]`); a client that leaves ends the generation (counted `cut`)."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        self.stats.active += 1
        try:
            await resp.prepare(request)
            async for data in _paced(events, plan.delay_s):
                await resp.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            if done:
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.stats.finished += 1
        except (ConnectionError, asyncio.CancelledError):
            self.stats.cut += 1
            raise
        finally:
            self.stats.active -= 1
        return resp


@dataclass(frozen=True)
class Plan:
    n: int
    delay_s: float


async def _paced(events: list[Any], delay_s: float) -> AsyncIterator[Any]:
    for i, make in enumerate(events):
        if i:
            await asyncio.sleep(delay_s)
        yield make()


def _usage(n: int) -> dict[str, int]:
    return {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}


def _vector(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255.0 for b in digest[:dims]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                         "param": None, "code": None}}, status=status)


async def serve() -> int:
    port = os.environ.get("PORT")
    if not port:
        print("tokens: PORT is required", file=sys.stderr, flush=True)
        return 2
    server = TokenServer(os.environ.get("MODEL_NAME", "tokens"),
                         float(os.environ.get("TOKEN_DELAY_MS", "10")) / 1000,
                         int(os.environ.get("TOKENS", "16")))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(server.build_app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    await web.TCPSite(runner, os.environ.get("HOST", "127.0.0.1"), int(port)).start()
    print(f"tokens: serving {server.model!r} on port {port}", flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):
        await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(serve()))
