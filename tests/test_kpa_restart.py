"""A restarted `scale` with a warm service and no load, on the real stack: Knative's
autoscaler starts in panic when it finds more than one ready pod (pkg/autoscaler/scaling/
autoscaler.go `newAutoscaler`), so the lost metric history does not stop half the service;
after the stable window it scales down at Knative's rates. Real nats-server, Redis, node
agents and processes as pods (a bare HTTP server: the test is about counts, not models).
The restarted instance is a real `ScaleInstance` that also writes down each plan it carries
out, since decisions follow each other within milliseconds once pods stop."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from controlplane import build
from functions.scale.core import Plan, ServiceScaler
from functions.scale.instance import ScaleInstance
from kernel.messages import Resources, ScalingSpec
from partitions.agents.local import LocalNode
from tests.stackutil import deploy, running_stack, sample_spec, wait_until

# Ready on "/" (a directory listing) as soon as it listens; SIGTERM ends it at once.
BARE_POD = [sys.executable, "-c",
            "import http.server as h, os; h.ThreadingHTTPServer(('127.0.0.1', "
            "int(os.environ['PORT'])), h.SimpleHTTPRequestHandler).serve_forever()"]
WINDOW_S = 6.0


class RecordingScale(ScaleInstance):
    """`scale` as it is, keeping (when, desired) of every plan for the service `warm`."""

    plans: list[tuple[float, int]]

    def _execute(self, scaler: ServiceScaler, plan: Plan, now: float) -> None:
        if plan.service == "warm-00001":  # scale sees the service's revision
            self.plans.append((time.monotonic(), plan.desired))
        super()._execute(scaler, plan, now)


async def test_a_restarted_scale_keeps_warm_pods_a_stable_window_then_scales_down_as_knative(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    warm = sample_spec("warm", command=BARE_POD, readiness_path="/",
                       resources=Resources(cpu=0.25, memory_mb=32),
                       scaling=ScalingSpec(min_scale=10, stable_window_s=WINDOW_S,
                                           scale_to_zero_grace_s=30.0))
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        nodes = [c for c in stack.components if isinstance(c, LocalNode)]

        def ready() -> int:
            return sum(1 for n in nodes for p in n.pods.values()
                       if p.start.spec.name == "warm-00001" and p.state == "ready")

        async def count() -> int:
            return ready()

        await deploy(nats_url, warm)
        await wait_until(count, lambda n: n == 10, timeout=30, what="10 warm pods")

        # `scale` dies silently (a crash: only missed heartbeats tell), and while it is down
        # min-scale goes to 0, so nothing but the autoscaler keeps the pods.
        old = next(c for c in stack.components if isinstance(c, ScaleInstance))
        stack.components.remove(old)
        await old.crash()
        await deploy(nats_url, sample_spec("warm", command=BARE_POD, readiness_path="/",
                                           resources=warm.resources, scaling=ScalingSpec(
                                               min_scale=0, stable_window_s=WINDOW_S,
                                               scale_to_zero_grace_s=30.0)))
        cfg = stack.config
        new = RecordingScale(await build.connect(cfg, build.new_id("scale"), "scale"),
                             cfg.scale, metrics_interval_s=cfg.activator.metrics_interval_s)
        new.plans = []
        restarted = time.monotonic()
        stack.components.append(new)  # stopped with the stack
        await new.start()

        samples: list[tuple[float, int]] = []  # (since the restart, ready pods)
        while (since := time.monotonic() - restarted) < 25:
            samples.append((since, ready()))
            if samples[-1][1] <= 1:
                break
            await asyncio.sleep(0.05)

    held = [r for s, r in samples if s <= WINDOW_S]
    assert held and min(held) == 10, f"pods stopped within {WINDOW_S}s of the restart: {held}"
    decided = [d for _, d in new.plans]
    steps = [d for i, d in enumerate(decided) if i == 0 or d != decided[i - 1]]
    # Knative: panic holds the 10 for the window, then each tick halves the ready pods
    # (max scale-down rate 2: floor(10/2), floor(5/2), floor(2/2)); the scale-to-zero grace
    # keeps the last one.
    assert steps == [10, 5, 2, 1], samples
    first_down = next(t for t, d in new.plans if d < 10) - restarted
    assert first_down > WINDOW_S, f"scaled down {first_down:.1f}s after the restart"
    assert samples[-1][1] == 1, "scaled down to the one pod the grace keeps"
