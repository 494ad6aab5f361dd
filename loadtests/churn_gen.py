"""Node status updates at a fixed rate, from their own OS process (as node agents are), for the
churn scenario: each a `ready` PodEvent on the real pod-events subject saying a node now caches
a model's weights, which the node's scheduler must decode and apply to its view (the model index
changes). Each is published under its node's partition, as a node agent publishes it (the map
is asked for once: it does not change during a run): a central scheduler hears them all, a
partitioned instance its own nodes' share. The pod lifecycle half of the churn (start, ready,
terminating, stopped) comes from the sim's own pods, which stop after their lifetime.

    python -m loadtests.churn_gen NATS_URL RATE SECONDS NODES SERVICES
Prints `sent N cpu_s X` when done: X is this process's own CPU, which shares the machine's cores
with the schedulers (the model of the run counts it).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.errors import RemoteError
from kernel.messages import Empty, PartitionMap, PodEvent
from partitions.fencing import EpochFence

TICK_S = 0.01


async def run(url: str, rate: float, seconds: float, nodes: int, services: int) -> int:
    bus = await Bus.connect(url, "churn-gen")
    rng = random.Random(11)
    fence = EpochFence()
    try:
        pmap: PartitionMap = await bus.call(ep.PARTITION_MAP_GET, Empty(), timeout=2.0)
        fence.apply(pmap)
    except RemoteError:
        pass  # no coordinator answers: every node is in no partition
    sent = 0
    t0 = time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - t0) < seconds:
            due = int(rate * elapsed) - sent
            for _ in range(due):
                svc = rng.randrange(services)
                node = f"sim-{rng.randrange(nodes):05d}"
                await bus.send(
                    ep.POD_EVENTS,
                    PodEvent(pod=f"status-{sent}", service=f"svc-{svc}", node=node,
                             state="ready", model=f"model-{svc}", ts=time.time()),
                    service=f"svc-{svc}", partition=fence.event_partition(node),
                )
                sent += 1
            await asyncio.sleep(TICK_S)
        await bus.nc.flush()
    finally:
        await bus.close()
    return sent


def main() -> int:
    url, rate, seconds, nodes, services = sys.argv[1:6]
    n = asyncio.run(run(url, float(rate), float(seconds), int(nodes), int(services)))
    print(f"sent {n} cpu_s {time.process_time():.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
