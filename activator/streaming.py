"""A streamed answer on its way from a pod to a client (DESIGN.md, cold request step 7):
the pod's `PodStream` plus what must happen when it ends, however it ends — the pod slot
given back, the invocation's duration recorded, a timeout counted. The request holds its
slot until then, so container concurrency counts streams, not just their first bytes.
The ingresses iterate it and always `aclose()` it; `read_all` is for callers that answer
in one piece (a NATS requester that did not ask for a stream, an event's reply)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from activator.proxy import PodStream, PodTimeout

# How a stream ended, for the callbacks: "end" (the pod finished), "timeout",
# "client_gone", "error" (the pod broke off, or the ingress failed).
Ended = str


class AnswerStream:
    def __init__(self, pod: PodStream, *, on_end: Callable[[Ended], None],
                 on_timeout: Callable[[PodTimeout], None]) -> None:
        self._pod = pod
        self._on_end = on_end
        self._on_timeout = on_timeout
        self.ended: Ended | None = None
        self.bytes = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._pod:
                self.bytes += len(chunk)
                yield chunk
        except PodTimeout as exc:
            self._on_timeout(exc)
            self.close("timeout")
            raise
        except Exception:
            self.close("error")
            raise
        self.close("end")

    def close(self, how: Ended = "client_gone") -> None:
        """Idempotent. Before the end, it cuts the pod request (the pod sees its client go);
        either way the slot is given back, once."""
        if self.ended is not None:
            return
        self.ended = how
        self._pod.close()
        self._on_end(how)

    async def aclose(self, how: Ended = "client_gone") -> None:
        self.close(how)

    async def read_all(self) -> bytes:
        try:
            return b"".join([chunk async for chunk in self])
        finally:
            self.close("error")  # a no-op when it ended
