"""The remote model storage of `loadtests.coldstart`: a local HTTP server (aiohttp, on the
benchmark's loop) serving one `.npz` model file — the sample's weights padded to the size
asked — at `/<version>/weights.npz`, throttled to a bandwidth shared by every download, as a
storage link of that speed would be. Each version has its own ETag, so each is a distinct
cache key: a fresh version is an uncached model. HEAD and byte ranges are answered, since
fsspec's HTTP filesystem uses both."""

from __future__ import annotations

import asyncio
import io
import re
import time
from pathlib import Path

import numpy as np
from aiohttp import web

CHUNK = 256 * 1024
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def padded_model(weights: Path, size_bytes: int) -> bytes:
    """The sample's weights plus a `pad` array, uncompressed, about `size_bytes` long: a
    server loading the model reads every byte (examples/sample/server.py `weights_in`)."""
    with np.load(weights, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    small = io.BytesIO()
    np.savez(small, **arrays)
    pad = max(0, size_bytes - len(small.getvalue()) - 512)
    rng = np.random.default_rng(0)  # incompressible, so nothing on the way can shrink it
    out = io.BytesIO()
    np.savez(out, pad=rng.integers(0, 256, size=pad, dtype=np.uint8), **arrays)
    return out.getvalue()


class ModelServer:
    """Serves `body` at any `/<version>/weights.npz`, at most `mbps` MB/s in total."""

    def __init__(self, body: bytes, *, mbps: float) -> None:
        self.body = body
        self.rate = mbps * 1_000_000.0
        self.gets = 0
        self.bytes_sent = 0
        self.url = ""
        self._next_free = 0.0  # the shared link: when it can send the next chunk
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{version}/weights.npz", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def uri(self, version: str) -> str:
        return f"{self.url}/{version}/weights.npz"

    async def _throttle(self, n: int) -> None:
        now = time.monotonic()
        start = max(now, self._next_free)
        self._next_free = start + n / self.rate
        if self._next_free > now:
            await asyncio.sleep(self._next_free - now)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        size = len(self.body)
        headers = {"ETag": f'"{request.match_info["version"]}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start, end, status = 0, size, 200
        m = _RANGE.match(request.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            if start >= size or start >= end:
                raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range":
                                                                  f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        self.gets += 1
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        view = memoryview(self.body)
        for i in range(start, end, CHUNK):
            chunk = view[i:min(end, i + CHUNK)]
            await self._throttle(len(chunk))
            await resp.write(chunk)
            self.bytes_sent += len(chunk)
        await resp.write_eof()
        return resp
