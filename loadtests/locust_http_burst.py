"""Locust: an HTTP burst on the activator's Open Inference Protocol v2 path (issue 4, load a).

Users hit `POST /v2/models/{model}/infer` with a valid OIP v2 body. `BurstShape` drives them:
a quiet lead-in at zero users (the service scales to zero or stays there), then every burst
user at once (spawn rate = users, as a real burst), held for `--burst-seconds`, then back to
zero; repeated `--bursts` times. Against `fnplane up` (see README):

    fnplane up --port 8080 &                       # or any --port / --nats-port
    fnplane deploy sample --min-scale 0 --max-scale 10 --concurrency-limit 4 \\
        --scale-target 4 --env SAMPLE_LATENCY_MS=20
    locust -f loadtests/locust_http_burst.py --headless --host http://127.0.0.1:8080 \\
        --burst-users 200 --burst-seconds 20 --csv loadtests/out/http_burst

With a shape class locust ignores `-u/-r`; `-t` still caps the run. Each answer's pod (header
`X-Fnplane-Pod`) is not a locust statistic; 503s (buffer full, no pod in time) count as
failures, with the activator's `{"error": ...}` message as the reason.
"""

from __future__ import annotations

import json

from locust import HttpUser, LoadTestShape, between, events, tag, task

BODY = {
    "id": "locust",
    "inputs": [
        {
            "name": "input-0",
            "shape": [2, 4],
            "datatype": "FP32",
            "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3],
        }
    ],
}


@events.init_command_line_parser.add_listener
def _flags(parser) -> None:
    parser.add_argument("--model", default="sample", help="service to call")
    parser.add_argument("--burst-users", type=int, default=200, help="users during a burst")
    parser.add_argument("--burst-seconds", type=float, default=20.0, help="length of a burst")
    parser.add_argument("--lead-seconds", type=float, default=2.0, help="quiet before a burst")
    parser.add_argument("--bursts", type=int, default=1, help="how many bursts")


class InferUser(HttpUser):
    # Closed loop with a short think time: a user sends its next request once answered.
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.model = self.environment.parsed_options.model
        self.path = f"/v2/models/{self.model}/infer"

    @tag("infer", "oip-v2")
    @task
    def infer(self) -> None:
        with self.client.post(
            self.path, json=BODY, name=f"/v2/models/{self.model}/infer", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {_reason(resp.text)}")
                return
            try:
                outputs = resp.json()["outputs"]
            except (ValueError, KeyError, TypeError):
                resp.failure("200 without OIP v2 outputs")
                return
            if outputs[0]["shape"][0] != BODY["inputs"][0]["shape"][0]:
                resp.failure(f"one output row per input row expected, got {outputs[0]['shape']}")


def _reason(text: str | None) -> str:
    try:
        return str(json.loads(text or "")["error"])[:200]
    except (ValueError, KeyError, TypeError):
        return (text or "")[:200]


class BurstShape(LoadTestShape):
    """Quiet lead-in, then all burst users at once for the burst's length; repeated."""

    def tick(self) -> tuple[int, float] | None:
        opts = self.runner.environment.parsed_options
        period = opts.lead_seconds + opts.burst_seconds
        now = self.get_run_time()
        if now >= period * opts.bursts:
            return None
        in_burst = now % period >= opts.lead_seconds
        users = opts.burst_users if in_burst else 0
        return users, float(max(1, opts.burst_users))
