"""Locust: trace-shaped load over several services (issue 4, load c).

Serverless traces (e.g. Azure Functions') are bursty: arrivals come in on/off episodes,
popularity is skewed, and which service is hot changes from one episode to the next. Here:
- `TraceShape` alternates ON periods (`--peak-users` users, spawned at once) and OFF periods
  (`--idle-users`, default 0: every service may scale to zero between episodes);
- in ON period k, service k mod n is the hot one and takes `--hot-share` of the requests;
  the rest are spread over the others by Zipf weights (1, 1/2, 1/3, ...), so every service
  sees its own on/off pattern and its own cold starts.

Against `fnplane up` (see README), with one service per name in `--services`:

    fnplane up --port 8080 &
    for s in sample-a sample-b sample-c; do
        fnplane deploy $s --min-scale 0 --concurrency-limit 4 --scale-target 4 \\
            --scale-to-zero-grace 10s --env SAMPLE_LATENCY_MS=20
    done
    locust -f loadtests/locust_trace.py --headless --host http://127.0.0.1:8080 \\
        --services sample-a,sample-b,sample-c --on-seconds 15 --off-seconds 20 --periods 4

The local backend names each pod's model after its service (`MODEL_NAME`), so the sample
server answers under every name. With a shape class locust ignores `-u/-r`; `-t` still caps
the run.
"""

from __future__ import annotations

import json
import random
import time

from locust import HttpUser, LoadTestShape, between, events, tag, task

ROWS = [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]
# When the test started in this process (each worker of a distributed run has its own clock,
# close enough for periods of seconds).
_started = time.monotonic()


@events.init_command_line_parser.add_listener
def _flags(parser) -> None:
    parser.add_argument(
        "--services", default="sample-a,sample-b,sample-c", help="comma-separated services"
    )
    parser.add_argument("--on-seconds", type=float, default=15.0)
    parser.add_argument("--off-seconds", type=float, default=20.0)
    parser.add_argument("--periods", type=int, default=4, help="ON/OFF periods in the run")
    parser.add_argument("--peak-users", type=int, default=100)
    parser.add_argument("--idle-users", type=int, default=0)
    parser.add_argument(
        "--hot-share", type=float, default=0.7, help="share of requests to the period's hot service"
    )


@events.test_start.add_listener
def _on_test_start(**_kwargs) -> None:
    global _started
    _started = time.monotonic()


def weights(services: list[str], period: int, hot_share: float) -> list[float]:
    """Request shares in ON period `period`: one hot service, Zipf over the rest."""
    n = len(services)
    if n == 1:
        return [1.0]
    hot = period % n
    others = [i for i in range(n) if i != hot]
    zipf = [1.0 / (rank + 1) for rank in range(len(others))]
    total = sum(zipf)
    share = [0.0] * n
    share[hot] = hot_share
    for rank, i in enumerate(others):
        share[i] = (1.0 - hot_share) * zipf[rank] / total
    return share


class TraceUser(HttpUser):
    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.services = [s.strip() for s in opts.services.split(",") if s.strip()]
        self.period_s = opts.on_seconds + opts.off_seconds
        self.hot_share = opts.hot_share
        self.rng = random.Random()

    @tag("infer", "trace")
    @task
    def infer(self) -> None:
        period = int((time.monotonic() - _started) // self.period_s)
        service = self.rng.choices(self.services, weights(self.services, period, self.hot_share))[0]
        body = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32", "data": ROWS}]}
        path = f"/v2/models/{service}/infer"
        with self.client.post(path, json=body, name=path, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {_reason(resp.text)}")


def _reason(text: str | None) -> str:
    try:
        return str(json.loads(text or "")["error"])[:200]
    except (ValueError, KeyError, TypeError):
        return (text or "")[:200]


class TraceShape(LoadTestShape):
    """ON (`--peak-users`, spawned at once) / OFF (`--idle-users`) for `--periods` periods."""

    def tick(self) -> tuple[int, float] | None:
        opts = self.runner.environment.parsed_options
        period = opts.on_seconds + opts.off_seconds
        now = self.get_run_time()
        if now >= period * opts.periods:
            return None
        users = opts.peak_users if now % period < opts.on_seconds else opts.idle_users
        return users, float(max(1, opts.peak_users))
