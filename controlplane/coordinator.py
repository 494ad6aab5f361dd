"""The coordinator: keeps the node inventory and the list of live control-function instances
(from heartbeats), scales `schedule` instances with their load through an instance runtime,
owns the partition map (one partition per live `schedule` instance, with epochs, persisted in
Redis) and republishes it whenever an instance joins, leaves, exits or goes silent, or a node
joins or leaves. A node whose agent stops vouching for it (`NodesAlive`) leaves the map after
`node_heartbeat_timeout_s`, and its pods are reported lost to `route` and `scale`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
import nats.errors
from nats.aio.msg import Msg
from redis.exceptions import RedisError

from controlplane.elastic import InstancePolicy, InstanceScaler, Runtime
from controlplane.mapmetrics import MapMetrics
from controlplane.sharding import assign
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.component import Component
from kernel.config import CoordinatorConfig
from kernel.messages import (
    ClusterStatus,
    Empty,
    Heartbeat,
    InstanceInfo,
    NodeInfo,
    NodeRegistration,
    NodesAlive,
    NodesLost,
    PartitionMap,
    PartitionSummary,
    Shard,
    ShardMap,
    UnknownNodes,
)
from kernel.metricsport import advertised_url
from kernel.shards import SHARDED, SHARDS
from kernel.store import StaleWrite, Store
from partitions.liveness import NodeLiveness
from partitions.partitioner import rebalance

log = logging.getLogger(__name__)

# A coordinator tick this much later than planned means our own loop stalled.
STALL_S = 0.25
OTHER_KINDS_TIMEOUT_S = 5.0


class Coordinator(Component):
    """`store` is shared with the registry and closed by whoever opened it."""

    def __init__(
        self,
        bus: Bus,
        store: Store,
        config: CoordinatorConfig,
        *,
        clock: Callable[[], float] = time.time,
        runtime: Runtime | None = None,
    ) -> None:
        super().__init__(bus)
        self.store = store
        self.config = config
        self.clock = clock
        self.nodes: dict[str, NodeInfo] = {}
        self.instances: dict[str, Heartbeat] = {}
        self.pmap = PartitionMap(version=0, partitions=[])
        self.summaries: dict[int, PartitionSummary] = {}
        self._unconfirmed: set[str] = set()
        self._restored_at = 0.0
        # Registered nodes, by when their agent last vouched for them.
        self.liveness = NodeLiveness(config.node_heartbeat_timeout_s)
        # Nodes that left the map whose loss `route` and `scale` have not been told yet.
        self._lost: set[str] = set()
        self._changed = asyncio.Event()
        # The map changed but its broadcast failed (NATS was down): send it again.
        self._unsent = False
        self.runtime = runtime
        self.smap = ShardMap(version=0, count=SHARDS)
        self._shards_unsent = False
        self.map_metrics = MapMetrics(self.metrics)
        self.scalers = {
            "schedule": InstanceScaler(
                InstancePolicy(config.schedule_min, config.schedule_max,
                               target_rps=config.schedule_target_rps)
            )
        }
        if runtime is not None:
            runtime.on_exit = self._on_exit
            # `scale` and `route` are sharded by service: each scales between its bounds on
            # its own load (demand reports and pod events handled per second for `scale`,
            # endpoint updates for `route`), as their instances report it in heartbeats.
            bounds = {"scale": (config.scale_min, config.scale_max, config.scale_target_rps),
                      "route": (config.route_min, config.route_max, config.route_target_rps)}
            for kind in runtime.kinds():
                if kind not in self.scalers:
                    lo, hi, rps = bounds.get(kind, (1, 1, 500.0))
                    self.scalers[kind] = InstanceScaler(InstancePolicy(lo, max(lo, hi),
                                                                       target_rps=rps))

    async def start(self) -> None:
        stored = await self.store.get_partition_map()
        if stored is not None:
            # Keep node sets and epochs; owners from a previous run are gone, so every
            # partition is reassigned (with a new epoch) as instances announce themselves.
            self.pmap = stored
            self.nodes = dict(stored.nodes)
            # Known from the map, not yet from their agents: gone unless they register.
            self._unconfirmed = set(self.nodes)
            self._restored_at = self.clock()
        if (smap := await self.store.get_shard_map()) is not None:
            # Owners are gone with the previous run; epochs go on, so fences stay right.
            self.smap = smap
        await self.bus.serve(ep.HEARTBEAT, self._on_heartbeat)
        await self.bus.serve(ep.NODE_REGISTER, self._on_register)
        await self.bus.serve(ep.NODE_HEARTBEAT, self._on_nodes_alive)
        await self.bus.serve(ep.PARTITION_MAP_GET, self._on_get)
        await self.bus.serve(ep.SHARD_MAP_GET, self._on_get_shards)
        await self.bus.serve(ep.ADMIN_STATUS, self._on_status)
        await self.bus.serve(ep.PARTITION_SUMMARY, self._on_summary)
        self.bus.on_reconnect(self._reconnected)
        if self.runtime is not None:
            for kind, scaler in self.scalers.items():
                # At least the minimum, but never fewer than already run (instances that
                # outlived a previous coordinator, as Deployment pods do): a restart of the
                # control plane must not scale its instances down.
                p = scaler.policy
                running = len(self.runtime.instances(kind))
                await self.runtime.scale(kind, min(max(running, p.min_instances),
                                                   p.max_instances))
        self.tasks.spawn(self._run(), name="loop")

    async def stop(self) -> None:
        await self.tasks.close()
        if self.runtime is not None:
            await self.runtime.stop()
        await super().stop()

    async def _reconnected(self, _since: float) -> None:
        """The last map may have vanished with the connection: say it again."""
        self._unsent = True
        self._shards_unsent = True
        self._changed.set()

    def _on_exit(self, kind: str, instance: str) -> None:
        """The runtime saw an instance exit: reassign its partition now, not after the
        heartbeat timeout."""
        if self.instances.pop(instance, None) is not None:
            log.warning("coordinator: %s %s exited", kind, instance)
        self._changed.set()

    # ---- inputs ---------------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Heartbeat, _raw: Msg) -> None:
        if (self.runtime is not None and msg.kind in self.scalers
                and msg.instance not in self.runtime.instances(msg.kind)):
            # A last beat from an instance the runtime already saw exit (or one it does not
            # run): counting it would hand a partition to the dead until its timeout.
            return
        new = msg.instance not in self.instances
        # Our clock, not the sender's: liveness is judged on when we heard it.
        self.instances[msg.instance] = msgspec.structs.replace(msg, ts=self.clock())
        if new and (msg.kind == "schedule" or msg.kind in SHARDED):
            self._changed.set()

    async def _on_register(self, msg: NodeRegistration, _raw: Msg) -> Empty:
        # A local node we knew alive registering again: its agent restarted, and local pods
        # die with their agent (their processes are its children). Said at once, so route
        # stops sending to them and scale replaces them; the new agent announces its own.
        restarted = sorted(i.name for i in msg.infos if i.backend == "local"
                           and i.name in self.nodes and i.name not in self._unconfirmed)
        if restarted:
            log.warning("coordinator: the agent of %s restarted; their pods are lost",
                        ", ".join(restarted))
            await self.bus.send(ep.NODE_LOST, NodesLost(
                nodes=restarted, reason="its agent restarted (local pods die with it)"))
        self.liveness.alive((i.name for i in msg.infos), self.clock())
        for info in msg.infos:
            self._unconfirmed.discard(info.name)
            self._lost.discard(info.name)  # back before its loss was told: nothing was lost
            if self.nodes.get(info.name) != info:
                self.nodes[info.name] = info
                self._changed.set()
        return Empty()

    def _note_caches(self, msg: NodesAlive) -> None:
        """A node's model cache changed (a fetch, an eviction): its NodeInfo says so, and
        the next map carries it to the `schedule` owner, whose locality score reads it."""
        for name, held in msg.caches.items():
            info = self.nodes.get(name)
            if info is None or info.model_bytes == held:
                continue
            # Models the node was registered with (labels) stay; cached ones follow the cache.
            labelled = set(info.models) - set(info.model_bytes)
            self.nodes[name] = msgspec.structs.replace(
                info, models=sorted(labelled | set(held)), model_bytes=dict(held))
            self._changed.set()

    async def _on_nodes_alive(self, msg: NodesAlive, _raw: Msg) -> UnknownNodes:
        """Nodes we know are alive; the others (expired while their agent was silent, or
        from before our restart and not registered since) are named in the answer, so
        their agent registers them again."""
        known = [n for n in msg.nodes if n in self.nodes and n not in self._unconfirmed]
        self.liveness.alive(known, self.clock())
        self._note_caches(msg)
        if len(known) == len(msg.nodes):
            return UnknownNodes()
        have = set(known)
        return UnknownNodes(nodes=[n for n in msg.nodes if n not in have])

    async def _on_summary(self, msg: PartitionSummary, _raw: Msg) -> None:
        self.summaries[msg.partition] = msg

    async def _on_get(self, _msg: Empty, _raw: Msg) -> PartitionMap:
        return self.pmap

    async def _on_get_shards(self, _msg: Empty, _raw: Msg) -> ShardMap:
        return self.smap

    async def _on_status(self, _msg: Empty, _raw: Msg) -> ClusterStatus:
        infos = [
            InstanceInfo(kind=h.kind, instance=h.instance, last_seen=h.ts, partition=h.partition,
                         shards=sorted(self.smap.owned_by(h.kind, h.instance)),
                         metrics_url=h.metrics_url)
            for h in sorted(self.instances.values(), key=lambda h: (h.kind, h.instance))
        ]
        live = {p.id: p.epoch for p in self.pmap.partitions}
        summaries = [s for pid, s in sorted(self.summaries.items()) if live.get(pid) == s.epoch]
        return ClusterStatus(partitions=self.pmap, instances=infos, summaries=summaries,
                             dependencies={"redis": await self._redis_health()},
                             shards=self.smap, metrics_url=advertised_url())

    async def _redis_health(self) -> str:
        try:
            async with asyncio.timeout(1.0):
                await self.store.r.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            return f"down ({type(exc).__name__}: {exc})"[:200]
        return "up"

    # ---- the loop -------------------------------------------------------------------------

    def live(self, kind: str) -> list[str]:
        return sorted(h.instance for h in self.instances.values() if h.kind == kind)

    async def _run(self) -> None:
        tick = self.config.heartbeat_interval_s / 2
        last = self.clock()
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=tick)
            except TimeoutError:
                pass
            self._changed.clear()
            now = self.clock()
            if now - last > tick + STALL_S or not self.bus.nc.is_connected:
                # We were not running (a stalled loop, a paused process) or not hearing
                # (NATS down or restarting): the silence we would now see is ours, not the
                # instances'. Forgive it.
                for inst, beat in self.instances.items():
                    self.instances[inst] = msgspec.structs.replace(beat, ts=now)
                self.liveness.forgive(now)
            last = now
            if not self.bus.nc.is_connected:
                continue
            try:
                await self._expire()
                self._expire_nodes()
                self._forget_unregistered()
                await self._scale_instances()
                self.map_metrics.instances(self.instances.values())
                await self.repartition()
                await self.reshard()
                await self._report_lost()
            except (nats.errors.Error, OSError, RedisError):
                # A dependency went away under us; the supervisor brings it back and the
                # next tick does this again.
                log.warning("coordinator: tick failed; retrying", exc_info=True)
                await asyncio.sleep(tick)

    async def _expire(self) -> None:
        """Instances silent past the timeout are gone: crashed, hung, or cut off from NATS.
        One of ours that is still running but silent is killed, so it gets replaced."""
        now = self.clock()
        for inst, beat in list(self.instances.items()):
            # Partition and shard owners must be replaced fast; other kinds (activators)
            # own nothing, so they get a longer leash.
            timeout = (self.config.heartbeat_timeout_s
                       if beat.kind == "schedule" or beat.kind in SHARDED
                       else OTHER_KINDS_TIMEOUT_S)
            if now - beat.ts > timeout:
                log.warning("coordinator: %s %s missed its heartbeats", beat.kind, inst)
                del self.instances[inst]
                if self.runtime is not None and inst in self.runtime.instances(beat.kind):
                    await self.runtime.kill(beat.kind, inst)

    def _expire_nodes(self) -> None:
        """Nodes no agent has vouched for within the timeout leave the map: the agent died,
        hung, or was cut off from NATS (its pods may still run, but nobody can reach them
        through us, and nobody would hear of their end)."""
        for name in self.liveness.expire(self.clock()):
            if self.nodes.pop(name, None) is not None:
                log.warning("coordinator: node %s fell silent; it leaves the map", name)
                self._lost.add(name)
                self._changed.set()

    async def _report_lost(self) -> None:
        """Tell `route` and `scale` which nodes' pods are gone, once the map without those
        nodes is out (so replacements are not placed on them). Said again next tick if
        NATS refuses it now."""
        lost = sorted(n for n in self._lost if n not in self.pmap.nodes)
        if not lost:
            return
        await self.bus.send(ep.NODE_LOST, NodesLost(nodes=lost, reason="no agent vouches for it"))
        self._lost.difference_update(lost)

    def _forget_unregistered(self) -> None:
        """Nodes of the stored map whose agents have not registered since our start, past
        the timeout, leave the map (their partitions rebalance without them)."""
        if not self._unconfirmed:
            return
        if self.clock() - self._restored_at < self.config.node_register_timeout_s:
            return
        for name in sorted(self._unconfirmed):
            log.warning("coordinator: node %s did not register again; it leaves the map", name)
            self.nodes.pop(name, None)
            # Routes stored by the previous run may still point at its pods.
            self._lost.add(name)
        self._unconfirmed.clear()

    async def _scale_instances(self) -> None:
        if self.runtime is None:
            return
        now = self.clock()
        for kind, scaler in self.scalers.items():
            current = len(self.runtime.instances(kind))
            beats = [b for b in self.instances.values() if b.kind == kind]
            want = scaler.desired(now, beats, current)
            if want != current:
                log.info("coordinator: scaling %s %d -> %d (utilization %.2f)", kind, current,
                         want, scaler.utilization(beats, current))
                await self.runtime.scale(kind, want)

    async def repartition(self) -> None:
        owners = self.live("schedule")
        parts = rebalance(self.nodes, owners, self.pmap.partitions)
        if parts == self.pmap.partitions and self.pmap.nodes == self.nodes:
            if self._unsent:
                await self.bus.send(ep.PARTITION_MAP, self.pmap)
                self._unsent = False
            return
        pmap = PartitionMap(version=self.pmap.version + 1, partitions=parts, nodes=dict(self.nodes))
        try:
            await self.store.put_partition_map(pmap)
        except StaleWrite:
            # Another coordinator wrote a newer map; adopt its version and retry next tick.
            stored = await self.store.get_partition_map()
            if stored is not None:
                self.pmap = PartitionMap(
                    version=stored.version, partitions=self.pmap.partitions, nodes=self.pmap.nodes
                )
            self._changed.set()
            return
        self.map_metrics.partition_map(self.pmap, pmap)
        self.pmap = pmap
        self._unsent = True
        log.info(
            "coordinator: partition map v%d: %s",
            pmap.version,
            ", ".join(f"p{p.id}@{p.owner or '-'}#e{p.epoch}({len(p.nodes)})" for p in parts),
        )
        await self.bus.send(ep.PARTITION_MAP, pmap)
        self._unsent = False

    async def reshard(self) -> None:
        """Hand service shards to the live `scale` and `route` instances (a dead or silent
        owner's shards move at once, with new epochs); persist, then publish on a change."""
        shards = {kind: assign(self.smap.count, self.live(kind), self.smap.shards.get(kind, []))
                  for kind in SHARDED}
        if shards == self.smap.shards:
            if self._shards_unsent:
                await self.bus.send(ep.SHARD_MAP, self.smap)
                self._shards_unsent = False
            return
        smap = ShardMap(version=self.smap.version + 1, count=self.smap.count, shards=shards)
        await self.store.put_shard_map(smap)
        self.map_metrics.shard_map(self.smap, smap)
        self.smap = smap
        self._shards_unsent = True
        log.info("coordinator: shard map v%d: %s", smap.version, "; ".join(
            f"{kind} " + ", ".join(f"{o or '-'}:{n}" for o, n in _counts(s).items())
            for kind, s in shards.items()))
        await self.bus.send(ep.SHARD_MAP, smap)
        self._shards_unsent = False


def _counts(shards: list[Shard]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in shards:
        out[s.owner] = out.get(s.owner, 0) + 1
    return out
