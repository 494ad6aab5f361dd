"""The `kubernetes` node backend: the same NATS contract as `local` (NodeRegistration,
StartPod, StopPod, inventory, PodEvent, pod metrics), with Kubernetes as the machines. Nodes
come from Node objects, kept current by list+watch; a StartPod becomes a Pod with
`schedulerName: fnplane` bound to the node `schedule` chose through the Binding subresource,
as a custom scheduler binds; readiness and failures come from the Pod's status by watch
(a ready Pod whose Ready condition turns False, or whose Node is not Ready, is `unready`
until both are Ready again); StopPod deletes the Pod.

Pods outlive the control plane on purpose. On start the backend lists the Pods labelled
`app.kubernetes.io/managed-by=fnplane` and reports them (ready ones as ready, at their IP)
before it registers any node, so `scale` counts them and `schedule` accounts them instead
of starting duplicates; pods of a service the registry no longer knows are deleted.
Stopping the backend leaves pods running.

Nodes are shared: a cluster-wide watch of non-terminal pods (capacity.py) tells what the
others' pods hold on each node, and each node is registered with what is left of its
allocatable for fnplane (re-registered when that changes), so `schedule` never places a pod
the kubelet will reject for room.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import nats.errors
from nats.aio.msg import Msg

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.component import Component
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import (
    AnnounceRequest,
    Demand,
    Empty,
    Inventory,
    InventoryRequest,
    NameRequest,
    NodeInfo,
    PodEvent,
    PodsAnnounced,
    PodState,
    Resources,
    StartPod,
    StopPod,
)
from kernel.procs import free_port
from kernel.shards import ShardFence, shard_of
from partitions.agents.contract import (
    NodeHeartbeater,
    PodAnnouncer,
    count_refusal,
    follow_map,
    follow_shards,
    register,
    stop_refusal,
)
from partitions.agents.kubernetes import capacity as kc
from partitions.agents.kubernetes import objects as ko
from partitions.agents.kubernetes.pods import KubePod, PodTracker
from partitions.fencing import EpochFence
from partitions.kubeapi import (
    Changed,
    KubeApi,
    ListWatch,
    Synced,
    load_client,
    threadsafe_put,
)
from partitions.tolerations import describe, pod_tolerations, untolerated

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.5
DEFAULT_IMAGE = "fnplane:0.1.0"
REGISTER_COALESCE_S = 0.1  # changes of room on nodes within this go out in one registration
METRICS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class KubernetesConfig:
    kubeconfig: str | None = None  # None: in-cluster service account, else ~/.kube/config
    context: str | None = None
    namespace: str = ""  # where pods live; "" = the context's (or service account's)
    # The image of pods whose service names none; a spec's `command` picks the server inside
    # it. "" = the image of this agent's own container (`self_pod`), which is the fnplane
    # image that kustomize `images:` (or `kubectl set image`) rewrites; a literal in an env
    # variable would be left behind by both. Else DEFAULT_IMAGE.
    image: str = ""
    image_pull_policy: str = ""  # "" = as this agent's own container, else IfNotPresent
    self_pod: str = ""  # this agent's Pod name (downward API), in `namespace`
    self_container: str = "node"
    # Who pods run as unless their service says (ServiceSpec.run_as_user/group): the fnplane
    # image's user. Always numeric, so runAsNonRoot never meets an image whose USER is root
    # or a name (CreateContainerConfigError); root needs an explicit 0 in the service spec.
    run_as_user: int = 10001
    run_as_group: int = 10001
    # Each pod has its own IP, so one port fits all. 0 = a free local port per pod, for
    # emulated clusters whose pods all share one host (the tests' kubelet emulator).
    pod_port: int = 8080
    stop_grace_s: int = 10
    watch_timeout_s: float = 300.0
    request_timeout_s: float = 10.0
    # How long `start` waits for the first list of nodes and pods before giving up.
    sync_timeout_s: float = 30.0
    user_agent: str = "fnplane-node/0.1"
    # A node whose kubelet rejected a pod for lack of a resource offers none of it for this
    # long (or until a pod there ends): it counts something we cannot see.
    rejection_hold_s: float = 30.0
    # Pulling the image may take this long (from the bind; the kubelet retries a rate-limited
    # or failing registry meanwhile); the service's startup timeout runs once it runs.
    pull_timeout_s: float = 900.0
    # What a StartPod may spend creating and binding, API retries included: less than
    # `schedule` waits for its answer, so a pod never starts that `schedule` gave up on.
    start_timeout_s: float = 4.0

    def __post_init__(self) -> None:
        if not 0 <= self.pod_port < 65536:
            raise ValueError(f"pod port {self.pod_port} out of range")
        if self.watch_timeout_s < 1 or self.request_timeout_s <= 0:
            raise ValueError("watch timeout must be >= 1s and request timeout > 0")
        if self.pull_timeout_s <= 0 or self.start_timeout_s <= 0:
            raise ValueError("pull and start timeouts must be > 0")


@dataclass
class KubeNode:
    k8s_name: str
    info: NodeInfo
    unschedulable: str  # why it takes no new pods, "" when it does


class KubernetesBackend(Component):
    """All nodes of one cluster behind one NATS connection, one subscription set per node."""

    kind = "node"

    def __init__(self, bus: Bus, config: KubernetesConfig) -> None:
        super().__init__(bus)
        self.config = config
        self.nodes: dict[str, KubeNode] = {}
        self.api: KubeApi | None = None
        self.tracker: PodTracker | None = None
        self.watches: list[ListWatch] = []
        self.fence = EpochFence()
        self.announcer = PodAnnouncer(bus, what="kubernetes", fence=self.fence)
        self.shards = ShardFence()
        self._queue: asyncio.Queue[Synced | Changed] = asyncio.Queue()
        self._synced = {"nodes": asyncio.Event(), "pods": asyncio.Event(),
                        "others": asyncio.Event()}
        self.occupancy = kc.Occupancy("", hold_s=config.rejection_hold_s)
        self._allocatable: dict[str, tuple[NodeInfo, int]] = {}  # as the Node says
        self._dirty: set[str] = set()  # nodes whose room changed, to register again
        self._subscribed: set[str] = set()
        self._registering = False
        # Nodes registered and still in the cluster: what the heartbeat vouches for. A node
        # deleted from the cluster drops out of it and leaves its partition after the
        # coordinator's timeout, its pods reported lost.
        self._registered: set[str] = set()
        self._http: aiohttp.ClientSession | None = None
        self._reported: set[str] = set()
        self._stopping = False
        self._flushing = False

    @property
    def pods(self) -> dict[str, KubePod]:
        return self.tracker.pods if self.tracker else {}

    @property
    def adopted(self) -> int:
        return self.tracker.adopted if self.tracker else 0

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        try:
            bus = self.bus
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
            client, ns = await asyncio.to_thread(load_client, cfg.kubeconfig, cfg.context,
                                                 user_agent=cfg.user_agent)
            self.api = api = KubeApi(client, cfg.namespace or ns,
                                     request_timeout_s=cfg.request_timeout_s)
            image, pull = await self._pod_image(api)
            self.occupancy.namespace = api.namespace
            self.tracker = PodTracker(api, self._emit, image=image, image_pull_policy=pull,
                                      stop_grace_s=cfg.stop_grace_s,
                                      run_as=(cfg.run_as_user, cfg.run_as_group),
                                      pull_timeout_s=cfg.pull_timeout_s,
                                      start_timeout_s=cfg.start_timeout_s)
            deliver = threadsafe_put(asyncio.get_running_loop(), self._queue)
            timeouts = {"watch_timeout_s": cfg.watch_timeout_s,
                        "request_timeout_s": cfg.request_timeout_s}
            self.watches = [
                ListWatch("nodes", api.core.list_node, deliver, **timeouts),
                ListWatch("pods", functools.partial(api.core.list_namespaced_pod, api.namespace),
                          deliver, label_selector=ko.POD_SELECTOR, **timeouts),
                # Every namespace's pods hold room on the nodes (RBAC: a ClusterRole).
                ListWatch("others", api.core.list_pod_for_all_namespaces, deliver,
                          field_selector=kc.NON_TERMINAL, **timeouts),
            ]
            self._spawn(self._consume(), "consume")
            for w in self.watches:
                w.start()
            await self._wait_synced()
            # Adopted pods are tracked by now: answer inventories before `schedule` hears of
            # any node, so its accounting starts from what really runs.
            await bus.serve(ep.NODE_INVENTORY, self._on_inventory)
            self._registering = True
            self._dirty.clear()  # the first registration says it all
            await self._register(list(self.nodes.values()))
            await follow_map(bus, self.fence)
            await follow_shards(bus, self.shards)
            await bus.serve(ep.NODE_ANNOUNCE, self._on_announce)
            beats = NodeHeartbeater(bus, nodes=lambda: set(self._registered),
                                    rejoin=self._rejoin)
            self._spawn(beats.run(), "heartbeat")
            self._spawn(self._sweep(), "sweep")
            self._spawn(self._scrape(), "metrics")
            self._spawn(self._delete_orphans(), "orphans")
        except BaseException:
            await self.stop()
            raise
        log.info("kubernetes: %d nodes, %d pods adopted, namespace %s", len(self.nodes),
                 self.adopted, api.namespace)

    async def _pod_image(self, api: KubeApi) -> tuple[str, str]:
        """The image (and pull policy) of pods that name none: configured, else this agent's
        own container's, read from its Pod; a Pod without that container is a deployment
        error to stop on, not a reason to run pods of a guessed image."""
        cfg = self.config
        image, pull = cfg.image, cfg.image_pull_policy
        if not image and cfg.self_pod:
            own = await api.read_pod(cfg.self_pod)
            containers = ((own or {}).get("spec") or {}).get("containers") or []
            mine = next((c for c in containers if c.get("name") == cfg.self_container), None)
            if mine is None or not mine.get("image"):
                raise RuntimeError(f"kubernetes: no container {cfg.self_container!r} in pod "
                                   f"{api.namespace}/{cfg.self_pod} to take the pod image from")
            image, pull = mine["image"], pull or str(mine.get("imagePullPolicy") or "")
        return image or DEFAULT_IMAGE, pull or "IfNotPresent"

    async def _wait_synced(self) -> None:
        try:
            async with asyncio.timeout(self.config.sync_timeout_s):
                for ev in self._synced.values():
                    await ev.wait()
        except TimeoutError:
            errors = "; ".join(f"{w.kind}: {w.last_error}" for w in self.watches if w.last_error)
            host = self.api.host if self.api else "?"
            raise RuntimeError(
                f"kubernetes API at {host} did not list nodes and pods (its own, and all "
                f"namespaces' for the room they hold) within "
                f"{self.config.sync_timeout_s:g}s ({errors or 'no answer'})"
            ) from None

    async def stop(self) -> None:
        """Idempotent. Pods keep running: the next start adopts them."""
        if self._stopping:
            return
        self._stopping = True
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in self.watches))
        await super().stop()
        if self._http is not None:
            await self._http.close()
        if self.api is not None:
            self.api.close()

    def _spawn(self, coro: Any, name: str) -> None:
        self.tasks.spawn(coro, name=name)

    # ---- what the watches see --------------------------------------------------------------

    async def _consume(self) -> None:
        assert self.tracker is not None
        while True:
            item = await self._queue.get()
            try:
                if item.kind == "others":
                    self._on_others(item)
                elif item.kind == "nodes":
                    await self._on_nodes(item)
                    await self._pods_follow_nodes(item)
                elif isinstance(item, Synced):
                    await self.tracker.on_list(item.items)
                else:
                    await self.tracker.on_pod(item.type, item.obj)
            except Exception:
                log.exception("kubernetes: handling %s failed", item.kind)
            if isinstance(item, Synced):
                self._synced[item.kind].set()

    async def _on_nodes(self, item: Synced | Changed) -> None:
        if isinstance(item, Changed):
            if item.type == "DELETED":
                self._gone(ko.fnplane_node_name(item.obj["metadata"]["name"]))
            else:
                self._on_node(item.obj)
            return
        seen = {ko.fnplane_node_name(n["metadata"]["name"]) for n in item.items}
        for name in set(self.nodes) - seen:
            self._gone(name)
        for obj in item.items:
            self._on_node(obj)

    async def _pods_follow_nodes(self, item: Synced | Changed) -> None:
        """The pods on a node that is not Ready, or was deleted, get no traffic: `unready`
        until it is Ready again (PodTracker.node_readiness)."""
        assert self.tracker is not None
        deleted = "node deleted from the cluster"
        if isinstance(item, Changed):
            down = deleted if item.type == "DELETED" else ko.node_down(item.obj)
            await self.tracker.node_readiness(
                ko.fnplane_node_name(item.obj["metadata"]["name"]), down)
            return
        listed = {ko.fnplane_node_name(n["metadata"]["name"]): ko.node_down(n)
                  for n in item.items}
        for name in sorted(set(listed) | {p.node for p in self.pods.values()}):
            await self.tracker.node_readiness(name, listed.get(name, deleted))

    def _gone(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is not None:
            node.unschedulable = "deleted from the cluster"
            self._registered.discard(name)

    def _on_node(self, obj: dict[str, Any]) -> None:
        info, why = ko.node_info(obj), ko.unschedulable_reason(obj)
        self._allocatable[info.name] = (info, kc.pods_allowed(obj))
        info = self._room(info.name, obj["metadata"]["name"])
        old = self.nodes.get(info.name)
        self.nodes[info.name] = node = KubeNode(obj["metadata"]["name"], info, why)
        if old is not None and old.unschedulable != why:
            log.info("kubernetes: node %s %s", info.name, why or "takes pods again")
        changed = old is None or old.info != info or (old.unschedulable and not why)
        if self._registering and changed:
            self._spawn(self._register([node]), f"register-{info.name}")

    # ---- room left by the others' pods (capacity.py) -----------------------------------------

    def _on_others(self, item: Synced | Changed) -> None:
        if isinstance(item, Synced):
            changed = self.occupancy.on_list(item.items)
        else:
            changed = self.occupancy.on_pod(item.type, item.obj)
        self._recount({ko.fnplane_node_name(n) for n in changed})

    def _room(self, name: str, k8s_name: str) -> NodeInfo:
        """The node as registered: its allocatable less what others hold (capacity.py)."""
        alloc, pods = self._allocatable[name]
        ours = [p for p in self.pods.values() if p.node == name and p.alive]
        held = Resources()
        for p in ours:
            held = held + p.resources
        cap = self.occupancy.capacity(k8s_name, alloc.capacity, pods, held, len(ours))
        return msgspec.structs.replace(alloc, capacity=cap)

    def _recount(self, names: set[str]) -> None:
        """Recompute the room of these nodes; register those that changed again, together
        (a DaemonSet rolling out touches every node at once)."""
        for name in names:
            node = self.nodes.get(name)
            if node is None or name not in self._allocatable:
                continue
            info = self._room(name, node.k8s_name)
            if info != node.info:
                node.info = info
                self._dirty.add(name)
        if self._dirty and self._registering and not self._flushing:
            self._flushing = True
            self._spawn(self._flush(), "register-room")

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(REGISTER_COALESCE_S)
        finally:
            self._flushing = False
        dirty, self._dirty = self._dirty, set()
        nodes = [self.nodes[n] for n in sorted(dirty) if n in self.nodes]
        log.info("kubernetes: room changed on %s", ", ".join(n.info.name for n in nodes))
        await self._register(nodes)

    def _pod_changed(self, pod: KubePod, state: PodState, reason: str) -> None:
        """Our pods count against a node's pod slots; one that ended frees room (unless the
        kubelet rejected it: see `_rejected`)."""
        if pod.node not in self.nodes:
            return
        if state in ("stopped", "failed") and not kc.rejection(reason):
            self.occupancy.freed(self.nodes[pod.node].k8s_name)
        self._recount({pod.node})

    async def _rejected(self, pod: KubePod, reason: str) -> None:
        """The kubelet rejected a pod of ours for lack of a resource: it counts something we
        do not see, so the node offers none of that resource for a while — registered
        before the pod is reported, so the replacement `scale` asks for is placed by a
        `schedule` that already knows (capacity.py)."""
        node = self.nodes.get(pod.node)
        short = kc.rejection(reason)
        if node is None or not short:
            return
        log.warning("kubernetes: the kubelet of %s rejected %s (OutOf%s): it offers no %s "
                    "for %gs", node.k8s_name, pod.name, short, short, self.occupancy.hold_s)
        self.occupancy.rejected(node.k8s_name, short, time.time())
        info = self._room(pod.node, node.k8s_name)
        if info != node.info and self._registering:
            node.info = info
            self._dirty.discard(pod.node)
            try:
                await asyncio.wait_for(self._register([node]), timeout=2.0)
            except TimeoutError:
                log.warning("kubernetes: registering %s again took too long", pod.node)

    async def _register(self, nodes: list[KubeNode]) -> None:
        """Subscribe the nodes' subjects, then register the schedulable ones (again, when
        they changed) in one message; retried until the coordinator answers."""
        for node in nodes:
            name = node.info.name
            if name not in self._subscribed:
                self._subscribed.add(name)
                await self.bus.serve(ep.NODE_START, self._on_start, concurrent=True, node=name)
                await self.bus.serve(ep.NODE_STOP, self._on_stop, concurrent=True, node=name)
        # A cordoned node stays registered and refuses StartPod with the reason; one
        # deleted from the cluster is no longer vouched for by the heartbeat.
        schedulable = [n.info for n in nodes if not n.unschedulable]
        await register(self.bus, schedulable)
        self._registered.update(i.name for i in schedulable)

    async def _rejoin(self, names: list[str]) -> None:
        """Nodes the coordinator took for lost or forgot: register them again and say
        again what runs on them (`route` and `scale` dropped those pods)."""
        infos = [self.nodes[n].info for n in names if n in self._registered]
        await register(self.bus, infos)
        await self.announcer.again_live({i.name for i in infos})

    # ---- background work --------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Deadlines, retried deletes, expired rejections. Guarded: an API timeout or a
        NATS hiccup in one round is logged, and the next round runs anyway."""
        assert self.tracker is not None
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                now = time.time()
                await self.tracker.sweep(now)
                expired = self.occupancy.expire(now)
                self._recount({ko.fnplane_node_name(n) for n in expired})
            except Exception:
                log.exception("kubernetes: sweep round failed; the next one runs anyway")

    async def _delete_orphans(self) -> None:
        """Adopted pods of a service deleted while the control plane was down have no owner
        left to stop them: ask the registry once, delete those it does not know."""
        assert self.tracker is not None
        for service in sorted({p.service for p in self.pods.values()}):
            try:
                await self.bus.call(ep.ADMIN_SPEC, NameRequest(name=service), timeout=2.0)
            except RemoteError as exc:
                if exc.code is not ErrorCode.NOT_FOUND:
                    continue
                for pod in [p for p in self.pods.values() if p.service == service]:
                    await self.tracker.stop(pod.name, "service no longer exists")

    async def _scrape(self) -> None:
        """Every second, the requests in flight each ready pod reports on `/stats` (pods
        without it are skipped), summed per service and sent to `scale` as pod metrics,
        as the `local` backend does."""
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S)
            ready = [p for p in self.pods.values() if p.state == "ready"]
            counts = await asyncio.gather(*(self._in_flight(p) for p in ready))
            per_service: dict[str, int] = {}
            for pod, n in zip(ready, counts, strict=True):
                if n is not None:
                    per_service[pod.service] = per_service.get(pod.service, 0) + n
            now = time.time()
            for name in set(per_service) | self._reported:
                n = per_service.get(name, 0)
                (self._reported.add if n else self._reported.discard)(name)
                demand = Demand(service=name, reporter="node:kubernetes", buffered=0,
                                in_flight=n, requests=0, ts=now, source="pods")
                try:
                    await self.bus.send(ep.DEMAND, demand, shard=shard_of(demand.service))
                except (nats.errors.Error, OSError):
                    log.debug("kubernetes: pod metrics lost", exc_info=True)

    async def _in_flight(self, pod: KubePod) -> int | None:
        assert self._http is not None
        try:
            async with self._http.get(pod.url + "/stats") as resp:
                if resp.status != 200:
                    return None
                return int((await resp.json()).get("in_flight", 0))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    # ---- commands ---------------------------------------------------------------------------

    async def _on_inventory(self, msg: InventoryRequest, _raw: Msg) -> Inventory | None:
        """A new partition owner asks what runs on its nodes: one answer for all of ours."""
        assert self.tracker is not None
        wanted = set(msg.nodes) & set(self.nodes)
        return Inventory(pods=self.tracker.allocations(wanted)) if wanted else None

    async def _on_start(self, msg: StartPod, _raw: Msg) -> Empty:
        assert self.tracker is not None
        node = self.nodes.get(msg.node)
        if node is None or self._stopping:
            raise RemoteError(ErrorCode.UNAVAILABLE, f"node {msg.node} is not in the cluster")
        if node.unschedulable:
            raise RemoteError(ErrorCode.UNAVAILABLE,
                              f"node {msg.node} takes no pods: {node.unschedulable}")
        if (taint := untolerated(node.info.taints, pod_tolerations(msg.spec))) is not None:
            raise RemoteError(ErrorCode.UNAVAILABLE, f"node {msg.node} takes no pods of "
                              f"{msg.spec.name}: tainted {describe(taint)}, not tolerated")
        if (refused := self.fence.refusal(msg)) is not None:
            count_refusal(self.metrics, refused, "start")
            raise refused
        await self.tracker.start(msg, node.k8s_name, self.config.pod_port or free_port())
        return Empty()

    async def _on_announce(self, msg: AnnounceRequest, _raw: Msg) -> PodsAnnounced:
        return self.announcer.announced(msg, sorted(self._registered))

    async def _on_stop(self, msg: StopPod, _raw: Msg) -> Empty:
        if (refused := stop_refusal(self.shards, msg)) is not None:
            count_refusal(self.metrics, refused, "stop")
            raise refused
        assert self.tracker is not None
        await self.tracker.stop(msg.pod, msg.reason)
        return Empty()

    async def _emit(self, pod: KubePod, state: PodState, *, reason: str = "",
                    log_tail: str = "") -> None:
        ev = PodEvent(
            pod=pod.name,
            service=pod.service,
            node=pod.node,
            state=state,
            url=pod.url,
            container_concurrency=pod.container_concurrency,
            resources=pod.resources,
            timeline=pod.timeline,
            reason=reason,
            log_tail=log_tail,
            ts=time.time(),
        )
        if state == "stopped":
            await self._rejected(pod, reason)
        try:
            await self.announcer.send(ev)
        finally:
            self._pod_changed(pod, state, reason)
