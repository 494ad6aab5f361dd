"""The README's main job: start the embedded stack, deploy the sample model at zero pods,
send it a request that finds it at zero, print the answer next to the model computed here,
the cold-start breakdown, a small burst, and the return to zero. Then stop everything."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from controlplane.servers import redacted
from controlplane.specfile import DEFAULT_COMMAND
from controlplane.stack import Stack
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import ActivatorConfig, Config, NodesConfig, ScaleConfig
from kernel.identity import login
from kernel.messages import (
    DeployRequest,
    NameRequest,
    Resources,
    ScalingSpec,
    ServiceSpec,
)
from kernel.procs import alive, descendants, port_in_use

REPO = Path(__file__).resolve().parent.parent


async def main() -> int:
    from examples.sample.model import load_model

    model = load_model()
    port = 8080 if not port_in_use("127.0.0.1", 8080) else 0
    with tempfile.TemporaryDirectory(prefix="fnplane-demo-") as state:
        config = Config(
            state_dir=Path(state),
            activator=ActivatorConfig(port=port, metrics_interval_s=0.5),
            scale=ScaleConfig(tick_s=0.25),
            nodes=NodesConfig(count=2, capacity=Resources(cpu=4, memory_mb=8192), workdir=REPO),
        )
        nats_port = 4222 if not port_in_use("127.0.0.1", 4222) else None
        # As `fnplane up` runs it: one supervised process per role.
        stack = Stack(config, nats_port=nats_port, roles="processes")
        t0 = time.time()
        await stack.start()
        print(f"[fnplane] stack up in {time.time() - t0:.2f}s: gateway {stack.url}, "
              f"nats {stack.nats_url}, redis {redacted(stack.redis_url or '')}, 2 local nodes; "
              f"processes: {', '.join(stack.role_processes)}")
        try:
            return await _run(stack, model)
        finally:
            await stack.stop()
            left = [p for p in descendants(os.getpid()) if alive(p)]
            print(f"[fnplane] stopped; processes left behind: {len(left)}")


async def _run(stack: Stack, model) -> int:
    assert stack.nats_url is not None
    bus = await Bus.connect(stack.nats_url, "demo",
                            login=login(stack.config.credentials, "admin"))
    try:
        spec = ServiceSpec(
            name="sample",
            command=list(DEFAULT_COMMAND),
            container_concurrency=4,
            # 20 ms of pretend model time per request, so the burst below needs more pods.
            env={"SAMPLE_LATENCY_MS": "20"},
            scaling=ScalingSpec(min_scale=0, max_scale=4, target_concurrency=4,
                                stable_window_s=6, scale_to_zero_grace_s=2),
        )
        st = await bus.call(ep.ADMIN_DEPLOY, DeployRequest(spec=spec), timeout=5)
        print(f"[fnplane] deployed 'sample' at zero pods: {st.url}")

        rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.1, 4.4, 1.4], [7.2, 3.0, 5.8, 1.6]]
        body = {"inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP32",
                            "data": rows}]}
        async with aiohttp.ClientSession() as http:
            t0 = time.time()
            async with http.post(st.url, json=body) as r:
                answer = await r.json()
                status = r.status
            print(f"[request] cold request -> HTTP {status} in {(time.time() - t0) * 1000:.0f} ms")
            if status != 200:
                print(f"[request] error: {answer}")
                return 1
            got = np.asarray(answer["outputs"][0]["data"]).reshape(answer["outputs"][0]["shape"])
            want = model.predict(np.asarray(rows, dtype=np.float32))
            for row, g, w in zip(rows, got, want, strict=True):
                print(f"  input {row} -> class {int(np.argmax(g))} p={np.round(g, 4).tolist()}"
                      f"  (in-process model: class {int(np.argmax(w))})")
            if not np.allclose(got, want, atol=1e-6):
                print("[request] MISMATCH with the in-process model")
                return 1
            print("[request] predictions match the model computed in-process")

            cs = None
            for _ in range(50):
                desc = await bus.call(ep.ADMIN_DESCRIBE, NameRequest(name="sample"))
                if (cs := desc.last_cold_start) is not None:
                    break
                await asyncio.sleep(0.1)
            if cs is not None:
                print(f"[cold start] pod {cs.pod} on {cs.node}:")
                for stage, ms in cs.stages_ms().items():
                    print(f"  {stage:<36} {ms:>8.1f} ms")

            statuses: dict[int, int] = {}
            pods: set[str] = set()

            async def one() -> None:
                async with http.post(st.url, json=body) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    pods.add(r.headers.get("X-Fnplane-Pod", ""))

            t0 = time.time()
            await asyncio.gather(*(one() for _ in range(200)))
            print(f"[burst] 200 concurrent requests in {time.time() - t0:.2f}s: "
                  f"statuses {statuses}, served by {len(pods)} pod(s) (max-scale 4, "
                  f"container concurrency 4)")

        print("[scale] waiting for scale to zero (6 s window + 2 s grace)...")
        t0 = time.time()
        while time.time() - t0 < 60:
            desc = await bus.call(ep.ADMIN_DESCRIBE, NameRequest(name="sample"))
            if not desc.pods:
                print(f"[scale] 'sample' is back to zero pods after {time.time() - t0:.1f}s idle")
                break
            await asyncio.sleep(0.5)
        else:
            print("[scale] still has pods after 60 s")
            return 1
        return 0 if statuses == {200: 200} else 1
    finally:
        await bus.close()


if __name__ == "__main__":
    try:
        import uvloop

        sys.exit(uvloop.run(main()))
    except ImportError:
        sys.exit(asyncio.run(main()))
