"""The `schedule` control function's NATS adapter. It owns one partition (assigned by the
coordinator, with an epoch), places pods in it, and when its partition has no room asks the
owner of the most promising other partition (per its probe cache) to reserve; bounded tries,
then `Unschedulable`. A reserve's reply piggybacks the replier's summary; a low-rate broadcast
keeps caches warm. An instance whose partition is full while a peer has room leaves the
placement queue group until it has room again (`partitions.membership`), so placements go
where they can be placed rather than through a probe. The owner is the only writer of its
nodes' accounting, so concurrent reserves from many instances cannot over-commit a node."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.component import Component
from kernel.config import ScheduleConfig
from kernel.errors import ErrorCode, NoResponders, RemoteError
from kernel.heartbeat import Heartbeater
from kernel.messages import (
    Empty,
    Inventory,
    InventoryRequest,
    PartitionMap,
    PartitionSummary,
    Placement,
    PlaceRequest,
    PodEvent,
    Refused,
    ReserveRequest,
    StartPod,
    Unschedulable,
)
from kernel.metrics import revision_labels
from kernel.shards import ShardFence
from kernel.versions import plausible
from partitions.membership import Membership
from partitions.probecache import ProbeCache
from partitions.tolerations import pod_tolerations
from partitions.view import PartitionView, inventoried

log = logging.getLogger(__name__)

SUMMARY_INTERVAL_S = 1.0
ADOPT_TIMEOUT_S = 2.0
NODE_START_TIMEOUT_S = 5.0
RESERVE_SLACK_S = 0.5
# The coordinator declares an instance dead after 1 s of silence: four missed beats.
HEARTBEAT_INTERVAL_S = 0.25


class ScheduleInstance(Component):
    kind = "schedule"

    def __init__(self, bus: Bus, config: ScheduleConfig) -> None:
        super().__init__(bus)
        self.config = config
        self.view = PartitionView(locality=config.locality)
        self.shard_fence = ShardFence()
        self.cache = ProbeCache(ttl_s=config.probe_cache_ttl_s)
        self.membership = Membership()  # in the placement queue group, or stepped aside
        self._assigned = asyncio.Event()
        self._map_version = 0
        self._owned: dict[int, int] = {}  # every owned partition → its epoch, from the map
        self._reserve_sub: Subscription | None = None
        self._place_sub: Subscription | None = None
        self._reserve_partition = -1
        self._events_sub: Subscription | None = None
        self._events_partition: int | None = None
        self._assign_lock = asyncio.Lock()
        # load, for the coordinator's scaling of this control function
        self._handled = 0
        self._in_flight = 0
        self._latencies: list[float] = []
        self.probes_sent = 0
        self._probe_outcome = {o: {"outcome": o} for o in ("placed", "refused", "failed")}
        self._lookup = {True: {"result": "hit"}, False: {"result": "miss"}}
        m = self.metrics  # instruments and attribute sets made once, not per placement
        self._m_placements = m.hot_counter("fnplane.schedule.placements", "outcome")
        self._m_duration = m.hot_histogram("fnplane.schedule.placement.duration")
        self._m_unschedulable = m.counter("fnplane.schedule.unschedulable")
        self._m_probes = m.counter("fnplane.schedule.probes")
        self._m_lookups = m.counter("fnplane.schedule.probe_cache.lookups")
        self._m_epoch = m.gauge("fnplane.schedule.partition.epoch")
        # Known label values start at 0 (Prometheus' advice): a rate over a series that
        # appears with its first event misses that event.
        for outcome in ("placed", "unschedulable"):
            self._m_placements.add(outcome, 0)
        for counter, sets in ((self._m_probes, self._probe_outcome.values()),
                              (self._m_lookups, self._lookup.values())):
            for attrs in sets:
                counter.add(0, attrs)

    async def start(self) -> None:
        await self.bus.follow(ep.SHARD_MAP, ep.SHARD_MAP_GET, self.shard_fence.apply)
        await self.bus.serve(ep.PARTITION_MAP, self._on_map)
        await self.bus.serve(ep.PARTITION_SUMMARY, self._on_summary)
        # PLACE is subscribed only while we own a partition (see _listen), so the queue
        # group never hands a placement to an instance that cannot place it.
        self.tasks.spawn(Heartbeater(self.bus, "schedule", interval_s=HEARTBEAT_INTERVAL_S,
                                     load=self._load).run(), name="beat")
        self.tasks.spawn(self._follow(), name="follow")
        self.tasks.spawn(self._broadcast(), name="summary")

    # ---- partition assignment -------------------------------------------------------------

    async def _on_map(self, msg: PartitionMap, _raw: Msg) -> None:
        await self._apply_map(msg)

    async def _apply_map(self, pmap: PartitionMap) -> None:
        async with self._assign_lock:
            if pmap.version <= self._map_version:
                return
            if not plausible(self._map_version, pmap.version):
                log.error("%s: partition map v%d refused: implausible after v%d", self.id,
                          pmap.version, self._map_version)
                return
            self._map_version = pmap.version
            self._owned = {p.id: p.epoch for p in pmap.partitions if p.owner}
            mine = [p for p in pmap.partitions if p.owner == self.id]
            if not mine:
                if self.view.partition >= 0:
                    log.info("%s: lost partition %d", self.id, self.view.partition)
                self._assigned.clear()
                self.view.assign(-1, 0, [])
                self.membership.reset()
                await self._listen(None)
                await self._hear_pods(None)
                return
            part = mine[0]
            infos = [pmap.nodes[n] for n in part.nodes if n in pmap.nodes]
            if (part.id, part.epoch) == (self.view.partition, self.view.epoch):
                self.view.assign(part.id, part.epoch, infos)  # node details may have changed
                return
            self._assigned.clear()
            self.membership.reset()
            known = set(self.view.nodes) if part.id == self.view.partition else set()
            self.view.assign(part.id, part.epoch, infos)
            # Listen before asking the nodes what they run: a pod that ends after its node
            # answered is then heard, not missed.
            await self._hear_pods(part.id)
            new_nodes = [n.name for n in infos if n.name not in known]
            if new_nodes:
                await self._adopt(new_nodes)
            await self._listen(part.id)
            self.cache.forget(part.id)
            self._assigned.set()
            self._m_epoch.set(part.epoch, {"partition": str(part.id)})
            log.info("%s: owns partition %d (epoch %d, %d nodes)", self.id, part.id,
                     part.epoch, len(infos))

    async def _adopt(self, nodes: list[str], *, timeout: float = ADOPT_TIMEOUT_S) -> None:
        """Rebuild the accounting of nodes we just got from what they actually run. A node
        that has not answered is held (never chosen) until it does: taking it as empty
        could over-commit it."""
        wanted = set(nodes)
        answers: list[Inventory] = await self.bus.gather(
            ep.NODE_INVENTORY, InventoryRequest(nodes=nodes), timeout=timeout,
            done=lambda got: wanted <= inventoried(got),
        )
        for answer in answers:
            self.view.record_inventory(answer)
        covered = inventoried(answers)
        missing = wanted - covered
        for node in covered & self.view.held:
            self.view.unhold(node)
        if missing:
            log.warning("%s: %d node(s) have not said what they run; held until they do",
                        self.id, len(missing))
            self.view.hold(missing)

    async def _listen(self, partition: int | None) -> None:
        """Serve placements and reserves exactly while we own `partition`. Subscriptions
        that stay valid are kept: dropping one would drop the requests queued on it, and
        their senders would wait out their timeouts. Those we give up are drained."""
        if self._reserve_sub is not None and partition != self._reserve_partition:
            await _drain(self._reserve_sub)
            self._reserve_sub = None
        if partition is None:
            if self._place_sub is not None:
                await _drain(self._place_sub)
                self._place_sub = None
            return
        if self._reserve_sub is None:
            self._reserve_sub = await self.bus.serve(
                ep.RESERVE, self._on_reserve, concurrent=True, partition=partition
            )
            self._reserve_partition = partition
        if self._place_sub is None and self.membership.serving:
            self._place_sub = await self.bus.serve(ep.PLACE, self._on_place, concurrent=True)

    async def _step_aside(self) -> None:
        """Leave the placement queue group (see `partitions.membership`); placements already
        handed to us are still answered (a drain, not an unsubscribe)."""
        async with self._assign_lock:
            if self._place_sub is not None and not self.membership.serving:
                sub, self._place_sub = self._place_sub, None
                log.info("%s: partition %d full; placements go to peers with room", self.id,
                         self.view.partition)
                await _drain(sub)
        await self._tell_peers()

    async def _tell_peers(self) -> None:
        """Our summary now, not at the next broadcast: whether we serve placements changed."""
        try:
            await self.bus.send(ep.PARTITION_SUMMARY, self._summary())
        except (nats.errors.Error, OSError):
            log.debug("%s: summary lost", self.id, exc_info=True)

    def _summary(self) -> PartitionSummary:
        return self.view.summary(self.id, serving=self.membership.serving)

    async def _rejoin_if_due(self) -> None:
        need = self.membership.aside_for
        if need is None:
            return
        peers = bool(self.cache.candidates(need, exclude=self.view.partition, serving=True))
        if self.membership.rejoin(self._summary().largest_free, peers):
            async with self._assign_lock:
                if self._place_sub is None and self._assigned.is_set():
                    log.info("%s: taking placements again", self.id)
                    self._place_sub = await self.bus.serve(ep.PLACE, self._on_place,
                                                           concurrent=True)
            await self._tell_peers()

    # ---- events ---------------------------------------------------------------------------

    async def _hear_pods(self, partition: int | None) -> None:
        """Hear the pod events of our own partition's nodes and no others: node agents
        publish each under its node's partition, so an instance pays for its share of the
        cluster's churn, not for all of it (with every instance decoding every event, CPU
        per placement grew with the number of instances)."""
        if partition == self._events_partition:
            return
        if self._events_sub is not None:
            await self.bus.unserve(self._events_sub)
            self._events_sub = None
        self._events_partition = partition
        if partition is not None:
            self._events_sub = await self.bus.serve(ep.POD_EVENTS, self._on_pod_event,
                                                    partition=partition)

    async def _on_pod_event(self, msg: PodEvent, _raw: Msg) -> None:
        self.view.apply_pod_event(msg)
        if not self.membership.serving and msg.state in ("stopped", "failed"):
            await self._rejoin_if_due()

    async def _on_summary(self, msg: PartitionSummary, _raw: Msg) -> None:
        if msg.owner != self.id:
            self.cache.update(msg)
            if not msg.serving and not self.membership.serving:
                # The peer we stepped aside for may have stepped aside too: one of us must
                # take placements, and the rule (no serving peer with room → rejoin) says who.
                await self._rejoin_if_due()

    # ---- placing --------------------------------------------------------------------------

    async def _on_place(self, msg: PlaceRequest, _raw: Msg) -> Placement | Unschedulable:
        # A `scale` instance that lost the service's shard adds no pod to it.
        if (why := self.shard_fence.check("scale", msg.service, msg.epoch)) is not None:
            raise RemoteError(ErrorCode.STALE_EPOCH, why)
        t0 = time.monotonic()
        self._in_flight += 1
        outcome = "unschedulable"
        try:
            answer = await self._place(msg)
            if isinstance(answer, Placement):
                outcome = "placed"
            else:
                self._m_unschedulable.add(1, revision_labels(msg.service))
            return answer
        finally:
            self._in_flight -= 1
            self._handled += 1
            took = time.monotonic() - t0
            self._latencies.append(took)
            self._m_placements.add(outcome)
            self._m_duration.record(took)

    async def _place(self, req: PlaceRequest) -> Placement | Unschedulable:
        if not self._assigned.is_set():  # wait_for costs a task: not on every placement
            try:
                await asyncio.wait_for(self._assigned.wait(), timeout=2.0)
            except TimeoutError:
                return Unschedulable(pod=req.pod, service=req.service,
                                     reason=f"{self.id} owns no partition yet")
        local = await self._commit_and_start(req)
        if isinstance(local, Refused) and local.stale:
            # The node knows a newer map than we do (a rebalance is under way): catch up
            # and try once more before bothering other partitions.
            await self._refresh_map()
            if self._assigned.is_set():
                local = await self._commit_and_start(req)
        if isinstance(local, Refused) and self.view.held:
            # Some of our nodes have not said what they run yet (their agent is starting):
            # ask them now rather than report no room while they may have plenty.
            async with self._assign_lock:
                await self._adopt(sorted(self.view.held))
            local = await self._commit_and_start(req)
        if isinstance(local, Placement):
            return local
        candidates = self.cache.candidates(req.resources, exclude=self.view.partition)
        self._m_lookups.add(1, self._lookup[bool(candidates)])
        peers = [c for c in candidates if c.serving]  # one to step aside for
        if not local.stale and self.membership.leave_after_refusal(req.resources, bool(peers)):
            self.tasks.spawn(self._step_aside(), name="step-aside")
        probes = 0
        tried: set[int] = {self.view.partition}
        while probes < self.config.max_probes:
            # Where a fresh summary says the pod fits first; then partitions we know nothing
            # of (never a known-full one).
            targets = [(c.partition, c.epoch) for c in
                       self.cache.candidates(req.resources, exclude=self.view.partition)]
            targets += self.cache.unknown(self._owned, exclude=self.view.partition)
            targets = [t for t in targets if t[0] not in tried]
            if not targets:
                break
            target, epoch = targets[0]
            tried.add(target)
            probes += 1
            self.probes_sent += 1
            deadline = time.time() + self.config.reserve_timeout_s
            try:
                reply: Placement | Refused = await self.bus.call(
                    ep.RESERVE,
                    ReserveRequest(place=req, asker=self.id, epoch=epoch, deadline=deadline),
                    # A little longer than the deadline, so an owner that committed in time
                    # is heard rather than taken for a refusal.
                    timeout=self.config.reserve_timeout_s + RESERVE_SLACK_S,
                    partition=target,
                )
            except RemoteError as exc:
                self.cache.forget(target)
                self._m_probes.add(1, self._probe_outcome["failed"])
                log.debug("%s: reserve on p%d failed: %s", self.id, target, exc)
                continue
            if isinstance(reply, Placement):
                self._m_probes.add(1, self._probe_outcome["placed"])
                if reply.summary is not None:
                    self.cache.update(reply.summary)
                return msgspec.structs.replace(reply, probes=probes)
            self._m_probes.add(1, self._probe_outcome["refused"])
            if reply.summary is not None:
                self.cache.update(reply.summary)
        reason = local.reason if isinstance(local, Refused) else "no room"
        return Unschedulable(
            pod=req.pod, service=req.service,
            reason=f"{reason}; {probes} other partition(s) probed without room", probes=probes,
        )

    async def _on_reserve(self, msg: ReserveRequest, _raw: Msg) -> Placement | Refused:
        """Another instance asks us, the owner, to place a pod in our partition."""
        if not self._assigned.is_set():
            return Refused(pod=msg.place.pod, partition=self.view.partition,
                           reason=f"{self.id} is not ready")
        if msg.deadline and time.time() > msg.deadline:
            return Refused(pod=msg.place.pod, partition=self.view.partition,
                           reason="the asker has given up")
        return await self._commit_and_start(msg.place, deadline=msg.deadline, reserve=True)

    async def _commit_and_start(
        self, req: PlaceRequest, *, deadline: float = 0.0, reserve: bool = False
    ) -> Placement | Refused:
        """Commit in our view (atomic: no await between choosing and committing), then hand
        the pod to its node; a node's refusal (a newer epoch) undoes the commit."""
        pid, epoch = self.view.partition, self.view.epoch
        tolerations = pod_tolerations(req.spec)
        node = self.view.place(req.pod, req.resources, req.model, tolerations=tolerations)
        if node is None:
            free = self._summary()
            tainted = self.view.shut_out(tolerations)
            taints = (f"; {len(tainted)} node(s) tainted and not tolerated "
                      f"({', '.join(sorted(set(tainted.values()))[:3])})" if tainted else "")
            return Refused(
                pod=req.pod, partition=pid,
                reason=f"partition {pid}: no node has {req.resources.cpu:g} cpu and "
                f"{req.resources.memory_mb} MiB free (largest free: "
                f"{free.largest_free.cpu:g} cpu/{free.largest_free.memory_mb} MiB){taints}",
                summary=free,
            )
        decided = time.time()
        timeout = NODE_START_TIMEOUT_S
        if deadline:
            timeout = max(0.05, min(timeout, deadline + RESERVE_SLACK_S / 2 - decided))
        try:
            await self.bus.call(
                ep.NODE_START,
                StartPod(pod=req.pod, spec=req.spec, node=node.name,
                         requested_at=req.requested_at, placed_at=decided, partition=pid,
                         epoch=epoch, gpu_devices=list(node.devices.get(req.pod, ()))),
                timeout=timeout,
                node=node.name,
            )
        except NoResponders:
            # No agent serves the node (it stopped, or lost NATS): hold it — never chosen,
            # asked for its inventory until it answers again — and choose another.
            self.view.release(req.pod)
            log.warning("%s: node %s does not answer; held until it does", self.id, node.name)
            self.view.hold({node.name})
            return await self._commit_and_start(req, deadline=deadline, reserve=reserve)
        except RemoteError as exc:
            self.view.release(req.pod)
            # Only a stale epoch says our map is behind; any other refusal is the node's.
            return Refused(pod=req.pod, partition=pid,
                           reason=f"node {node.name} refused pod: {exc.message}",
                           summary=self._summary(),
                           stale=exc.code is ErrorCode.STALE_EPOCH)
        # Our summary rides on a reserve's reply, for the asker's probe cache; the placer
        # of a local placement has no use for it.
        return Placement(pod=req.pod, service=req.service, node=node.name, partition=pid,
                         epoch=epoch, decided_at=decided, probes=0,
                         summary=self._summary() if reserve else None)

    async def _refresh_map(self) -> None:
        try:
            pmap: PartitionMap = await self.bus.call(ep.PARTITION_MAP_GET, Empty(), timeout=0.5)
        except RemoteError:
            return
        await self._apply_map(pmap)

    # ---- background -----------------------------------------------------------------------

    def _load(self, elapsed_s: float) -> dict[str, float | int]:
        """This instance's load and partition, for the coordinator (it scales `schedule` on
        the load, and reassigns a partition whose owner falls silent)."""
        lat = sorted(self._latencies)
        p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else 0.0
        load = {"requests_per_s": self._handled / elapsed_s, "queue_depth": self._in_flight,
                "latency_ms_p99": p99, "partition": self.view.partition,
                "epoch": self.view.epoch}
        self._handled, self._latencies = 0, []
        return load

    async def _follow(self) -> None:
        """Until assigned, ask for the map (a late joiner must not wait for the next change);
        once assigned, keep asking held nodes what they run until they answer."""
        while True:
            try:
                if not self._assigned.is_set():
                    reply = await self.bus.call(ep.PARTITION_MAP_GET, Empty(), timeout=0.5)
                    await self._apply_map(reply)
                elif self.view.held:
                    async with self._assign_lock:
                        await self._adopt(sorted(self.view.held), timeout=0.2)
            except (RemoteError, nats.errors.Error, OSError):
                log.debug("%s: following the map failed", self.id, exc_info=True)
            await asyncio.sleep(0.2 if not self._assigned.is_set() else HEARTBEAT_INTERVAL_S)

    async def _broadcast(self) -> None:
        """The low-rate exchange that keeps other instances' probe caches fresh (and, with
        theirs, tells us when to take placements again after stepping aside)."""
        while True:
            await asyncio.sleep(SUMMARY_INTERVAL_S)
            try:
                await self._rejoin_if_due()
                if self._assigned.is_set():
                    await self.bus.send(ep.PARTITION_SUMMARY, self._summary())
            except (nats.errors.Error, OSError):
                log.debug("%s: summary or rejoin lost", self.id, exc_info=True)


async def _drain(sub: Subscription) -> None:
    try:
        await sub.drain()
    except nats.errors.Error:
        log.debug("subscription drain failed", exc_info=True)
