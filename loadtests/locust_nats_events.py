"""Locust: NATS event producers against the activator's NATS ingress (issue 4, load b).

Each user holds one NATS connection and, by weight, either
- invokes `svc.invoke.{model}` request-reply with an OIP v2 JSON body (locust type
  "NATS-REQ": time to the answer; a failure unless its `Fnplane-Status` header is 200), or
- publishes a fire-and-forget event on `svc.events.{model}` into the service's JetStream
  stream (type "NATS-EVENT": time to the stream's PubAck, i.e. stored, not yet served).

Against `fnplane up` (see README); `--host` is the NATS URL:

    fnplane up --port 8080 --nats-port 4222 &
    fnplane deploy sample --min-scale 0 --concurrency-limit 4 --env SAMPLE_LATENCY_MS=20
    locust -f loadtests/locust_nats_events.py --headless -u 100 -r 100 -t 30s \\
        --host nats://127.0.0.1:4222

Why a thread: locust runs on gevent and nats-py on asyncio. Each locust process runs one
asyncio loop (uvloop when available, which polls with libuv, untouched by gevent's monkey
patching) in a native OS thread; users submit coroutines to it and wait for the result on a
libev async watcher, the one gevent primitive documented as safe to signal from another
thread. Timings are fired into locust's statistics from the user's own greenlet.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import gevent
import gevent.event
import nats
from gevent import monkey
from locust import User, between, events, tag, task

T = TypeVar("T")

BODY = json.dumps(
    {
        "id": "locust-nats",
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
STATUS_HEADER = "Fnplane-Status"  # activator/nats_ingress.py


@events.init_command_line_parser.add_listener
def _flags(parser) -> None:
    parser.add_argument("--model", default="sample", help="service to invoke")
    parser.add_argument("--invoke-timeout", type=float, default=60.0, help="seconds")


class AsyncioThread:
    """One asyncio loop on a native thread, shared by every user of this locust process."""

    _lock = threading.Lock()
    _instance: AsyncioThread | None = None

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:  # a selector loop would poll through gevent's patched selectors
            self.loop = asyncio.new_event_loop()
        start = monkey.get_original("_thread", "start_new_thread")
        start(self._run, ())

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> AsyncioThread:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coro` on the loop; block only this greenlet until it finishes."""
        watcher = gevent.get_hub().loop.async_()
        done = gevent.event.Event()
        watcher.start(done.set)
        box: dict[str, asyncio.Task[T]] = {}

        def submit() -> None:
            task = self.loop.create_task(coro)
            box["task"] = task
            task.add_done_callback(lambda _t: watcher.send())

        try:
            self.loop.call_soon_threadsafe(submit)
            if not done.wait(timeout):
                if "task" in box:
                    self.loop.call_soon_threadsafe(box["task"].cancel)
                raise TimeoutError(f"no answer within {timeout:g}s")
            return box["task"].result()
        finally:
            watcher.stop()
            watcher.close()


class NatsProducer(User):
    wait_time = between(0.0, 0.05)
    host = os.environ.get("FNPLANE_NATS_URL", "nats://127.0.0.1:4222")

    def on_start(self) -> None:
        self.bridge = AsyncioThread.get()
        opts = self.environment.parsed_options
        self.model = opts.model
        self.timeout = opts.invoke_timeout
        self.nc = self.bridge.run(
            nats.connect(self.host, name="locust-nats-producer", max_reconnect_attempts=3),
            timeout=10.0,
        )
        self.js = self.nc.jetstream(timeout=5.0)

    def on_stop(self) -> None:
        nc = getattr(self, "nc", None)
        if nc is not None:
            try:
                self.bridge.run(nc.drain(), timeout=5.0)
            except Exception:
                pass

    def _record(self, kind: str, name: str, start: float, size: int, exc: Exception | None):
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=size,
            exception=exc,
            context={"model": self.model},
        )

    @tag("invoke")
    @task(3)
    def invoke(self) -> None:
        subject = f"svc.invoke.{self.model}"
        start = time.perf_counter()
        try:
            msg = self.bridge.run(
                self.nc.request(subject, BODY, timeout=self.timeout), self.timeout + 5.0
            )
        except Exception as exc:
            self._record("NATS-REQ", subject, start, 0, exc)
            return
        status = (msg.headers or {}).get(STATUS_HEADER, "")
        exc = None if status == "200" else RuntimeError(f"status {status}: {msg.data[:200]!r}")
        self._record("NATS-REQ", subject, start, len(msg.data), exc)

    @tag("event")
    @task(1)
    def event(self) -> None:
        subject = f"svc.events.{self.model}"
        start = time.perf_counter()
        try:
            self.bridge.run(self.js.publish(subject, BODY), 10.0)
        except Exception as exc:
            self._record("NATS-EVENT", subject, start, 0, exc)
            return
        self._record("NATS-EVENT", subject, start, len(BODY), None)
