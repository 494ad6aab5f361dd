"""An instance's side of the service shard map: which shards it owns (with their epochs),
kept on the coordinator's map; per-shard subscriptions (demand, status, reclaim) that follow
ownership, so NATS delivers a shard's traffic to its owner only; and a callback on every gain
or loss, for the instance to rebuild or drop state. `scale` and `route` use it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kernel import endpoints as ep
from kernel.bus import Bus, Handler
from kernel.errors import RemoteError
from kernel.messages import Empty, ShardMap
from kernel.shards import ShardFence, shard_of

log = logging.getLogger(__name__)

# shards gained (id → epoch; an epoch bump of a kept shard counts as a gain), shards lost
OnChange = Callable[[dict[int, int], set[int]], Awaitable[None]]


class ShardOwnership:
    def __init__(self, bus: Bus, kind: str, *, on_change: OnChange,
                 per_shard: list[tuple[ep.Endpoint[Any, Any], Handler]] | None = None) -> None:
        self.bus = bus
        self.kind = kind
        self.on_change = on_change
        self.per_shard = per_shard or []
        self.fence = ShardFence()
        self.owned: dict[int, int] = {}  # shard id → epoch
        self.map: ShardMap | None = None
        self._subs: dict[int, list[Subscription]] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self.bus.serve(ep.SHARD_MAP, self._on_map)
        for attempt in range(50):
            try:
                smap: ShardMap = await self.bus.call(ep.SHARD_MAP_GET, Empty(), timeout=1.0)
            except RemoteError:
                await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
                continue
            await self.apply(smap)
            return

    async def _on_map(self, msg: ShardMap, _raw: Msg) -> None:
        await self.apply(msg)

    def epoch(self, service: str) -> int | None:
        """Our epoch of `service`'s shard, or None when another instance owns it."""
        return self.owned.get(shard_of(service, self.fence.count))

    def owns(self, service: str) -> bool:
        return self.epoch(service) is not None

    def owners(self) -> set[str]:
        """The instances that own shards of our function now."""
        if self.map is None:
            return set()
        return {s.owner for s in self.map.shards.get(self.kind, []) if s.owner}

    async def apply(self, smap: ShardMap) -> None:
        async with self._lock:
            if not self.fence.apply(smap):
                return
            self.map = smap
            now = smap.owned_by(self.kind, self.bus.name)
            gained = {i: e for i, e in now.items() if self.owned.get(i) != e}
            lost = set(self.owned) - set(now)
            self.owned = now
            for i in lost:
                for sub in self._subs.pop(i, []):
                    await self.bus.unserve(sub)
            for i in gained:
                if i not in self._subs:
                    self._subs[i] = [await self.bus.serve(e, h, shard=i)
                                     for e, h in self.per_shard]
            if gained or lost:
                log.info("%s: %s shards v%d: %d owned (+%d, -%d)", self.bus.name, self.kind,
                         smap.version, len(now), len(gained), len(lost))
                await self.on_change(gained, lost)
