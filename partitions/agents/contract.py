"""What every node backend (`local`, `sim`, `kubernetes`) does the same way on NATS: announce
its nodes to the coordinator, follow the partition map so its nodes can refuse a start from a
stale owner (`partitions.fencing`), and announce its pods' events (again after an outage)."""

from __future__ import annotations

import asyncio
import collections
import logging

import nats.errors
from nats.aio.msg import Msg

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.errors import RemoteError
from kernel.messages import Empty, NodeInfo, NodeRegistration, PartitionMap, PodEvent, encode
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


# Terminal events sent this long before a connection loss was noticed may have vanished
# with it (nats-py writes into a dead socket until it sees the loss).
AT_RISK_S = 2.0
_TERMINAL = ("stopped", "failed")


class PodAnnouncer:
    """Sends a node's pod events and says them again after a NATS outage, so `route` and
    `scale` do not keep a pod that ended meanwhile, or miss one that became ready: the
    latest event of every live pod, and the terminal events of the outage (and of the
    moments before it) once more. Consumers treat a repeated event as no change."""

    def __init__(self, bus: Bus, *, what: str) -> None:
        self.bus = bus
        self.what = what
        self._live: dict[str, PodEvent] = {}
        self._ended: collections.deque[PodEvent] = collections.deque(maxlen=1000)
        bus.on_reconnect(self._again)

    async def send(self, ev: PodEvent) -> None:
        if ev.state in _TERMINAL:
            self._live.pop(ev.pod, None)
            self._ended.append(ev)
        else:
            self._live[ev.pod] = ev
        try:
            await self.bus.send(ep.POD_EVENTS, ev, service=ev.service)
        except (nats.errors.Error, OSError):
            log.warning("%s: pod event lost; said again after the reconnect", self.what,
                        exc_info=True)

    async def _again(self, since: float) -> None:
        ended = [ev for ev in self._ended if ev.ts >= since - AT_RISK_S]
        live = list(self._live.values())
        log.info("%s: NATS is back; announcing %d live and %d ended pods again", self.what,
                 len(live), len(ended))
        for ev in [*ended, *live]:
            try:
                await self.bus.send(ep.POD_EVENTS, ev, service=ev.service)
            except (nats.errors.Error, OSError):
                log.warning("%s: pod event lost again", self.what, exc_info=True)
                return
