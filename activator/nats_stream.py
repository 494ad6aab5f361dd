"""A streamed answer over NATS request-reply (`svc.invoke.{service}`, kernel/endpoints.py):
a requester that sends `Fnplane-Stream: 1` gets the pod's answer as it is written, as a
sequence of messages on its reply subject, in order (one publisher, one connection):

- `head`: `Fnplane-Stream: head`, the status headers (`Fnplane-Status`, `Content-Type`,
  `Fnplane-Pod`, ...), empty body;
- `chunk`: `Fnplane-Stream: chunk`, `Fnplane-Seq: 1, 2, ...`, the bytes the pod wrote;
- `end`: `Fnplane-Stream: end`, `Fnplane-Seq` of the last chunk, empty body; a stream cut
  short (a timeout, the pod broke off) ends with `Fnplane-Status` (504, 502) and an error body.

An answer that is not streamed (or a requester that did not ask) is the one message it has
always been. Core NATS may drop messages for a slow consumer: `Fnplane-Seq` shows a gap."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client

STREAM_HEADER = "Fnplane-Stream"
SEQ_HEADER = "Fnplane-Seq"
HEAD, CHUNK, END = "head", "chunk", "end"


def wants_stream(headers: Mapping[str, str] | None) -> bool:
    return any(k.lower() == STREAM_HEADER.lower() and v.strip() not in ("", "0")
               for k, v in (headers or {}).items())


@dataclass(frozen=True)
class Frame:
    kind: str  # head | chunk | end, or "whole" for a one-message answer
    headers: dict[str, str]
    data: bytes


async def request_stream(nc: Client, subject: str, body: bytes, *, timeout: float,
                         headers: Mapping[str, str] | None = None) -> AsyncIterator[Frame]:
    """A requester's side: the frames of one answer, the last one `end` (or `whole`).
    `timeout` bounds each wait for the next message, not the whole stream."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        sent = {STREAM_HEADER: "1", **(headers or {})}
        await nc.publish(subject, body, reply=inbox, headers=sent)
        while True:
            msg = await sub.next_msg(timeout=timeout)
            if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
                raise ConnectionError(f"no responders on {subject}")
            got = dict(msg.headers or {})
            kind = got.get(STREAM_HEADER, "whole")
            yield Frame(kind, got, msg.data)
            if kind in (END, "whole"):
                return
    finally:
        with contextlib.suppress(nats.errors.Error):  # closing: nothing left to undo
            await sub.unsubscribe()
