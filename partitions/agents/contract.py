"""What every node backend (`local`, `sim`, `kubernetes`) does the same way on NATS: announce
its nodes to the coordinator, and follow the partition map so its nodes can refuse a start
from a stale owner (`partitions.fencing`)."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.errors import RemoteError
from kernel.messages import Empty, NodeInfo, NodeRegistration, PartitionMap, encode
from partitions.fencing import EpochFence

log = logging.getLogger(__name__)


async def register(bus: Bus, infos: list[NodeInfo], *, attempts: int = 100) -> None:
    """Register nodes, as few messages as the server's max payload allows (a `sim` backend
    has thousands); each retried with a growing pause until the coordinator answers."""
    if not infos:
        return
    limit = max(bus.nc.max_payload - 4096, 4096)
    size = len(encode(NodeRegistration(infos=infos)))
    per_msg = max(1, len(infos) * limit // size) if size > limit else len(infos)
    for i in range(0, len(infos), per_msg):
        msg = NodeRegistration(infos=infos[i : i + per_msg])
        for attempt in range(attempts):
            try:
                await bus.call(ep.NODE_REGISTER, msg, timeout=2.0)
                break
            except RemoteError:
                await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
        else:
            log.error("the coordinator never answered the registration of %s",
                      ", ".join(n.name for n in msg.infos[:5]))


async def follow_map(bus: Bus, fence: EpochFence) -> None:
    """Keep `fence` on the current partition map: every change, and the map as it is now."""

    async def on_map(msg: PartitionMap, _raw: Msg) -> None:
        fence.apply(msg)

    await bus.serve(ep.PARTITION_MAP, on_map)
    try:
        pmap: PartitionMap = await bus.call(ep.PARTITION_MAP_GET, Empty(), timeout=1.0)
    except RemoteError:
        return  # the map arrives with the next change
    fence.apply(pmap)
