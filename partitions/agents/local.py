"""The `local` node backend: each node is an agent on this machine whose pods are real OS
processes serving real HTTP. Like a kubelet it starts the pod's command with `PORT` set,
probes readiness on the spec's path (and keeps probing a ready pod on the spec's period: one
whose probe fails is `unready` until it passes again), reports every state change on NATS,
and on stop sends SIGTERM, waits for in-flight requests to finish, then SIGKILLs."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec
import nats.errors
from nats.aio.msg import Msg

from kernel import endpoints as ep
from kernel import telemetry
from kernel.bus import Bus
from kernel.component import Component
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import (
    AnnounceRequest,
    Demand,
    Empty,
    Inventory,
    InventoryRequest,
    NodeInfo,
    PodAllocation,
    PodEvent,
    PodsAnnounced,
    PodState,
    PodTimeline,
    PrefetchModel,
    StartPod,
    StopPod,
)
from kernel.metrics import revision_labels
from kernel.procs import free_port
from kernel.shards import ShardFence, shard_of
from kernel.spawn import Child, spawn
from partitions.agents.contract import (
    NODE_HEARTBEAT_S,
    NodeHeartbeater,
    PodAnnouncer,
    count_refusal,
    follow_map,
    follow_shards,
    register,
    stop_refusal,
)
from partitions.agents.podusers import CURRENT, LABEL, PodUserError, PodUsers
from partitions.agents.readiness import ReadinessProbe
from partitions.fencing import EpochFence
from partitions.modelcache.policy import ModelUriError
from partitions.modelcache.store import ModelCache, ModelFetchError

log = logging.getLogger(__name__)

# What a pod inherits of the control plane's environment: locale, time zone, home and temp
# dirs. Everything else (PATH is set apart) stays out.
POD_INHERITS = frozenset({"HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR"})
KEEP_POD_LOGS = 20

# Readiness: probed at once, then after 5 ms, doubling to at most 100 ms: a pod that starts
# fast is seen within ms, and a slow one (a big model loading) is not polled on a fast tick.
PROBE_FIRST_S = 0.005
PROBE_MAX_S = 0.1
LISTEN_CHECK_S = 0.005
METRICS_INTERVAL_S = 1.0
STOP_GRACE_S = 10.0
POD_NICE = 10  # NodesConfig.pod_nice's default (see there)


@dataclass
class LocalPod:
    start: StartPod
    port: int
    proc: Child
    spawned_at: float
    output: deque[str] = field(default_factory=lambda: deque(maxlen=50))
    state: PodState = "starting"
    ready_at: float = 0.0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    run_as: str = ""
    fetched_at: float = 0.0  # when its weights were in the node's cache (0: none to fetch)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return "".join(self.output)[-2000:]


# Ports handed to pods of this process's nodes and not yet given back. free_port() asks the
# kernel for one that is free now; a pod that has not bound it yet leaves it free, so two
# starts at once could get the same one — and the second pod's readiness probe would be
# answered by the first pod, routing one service's requests to another's model.
_PORTS: set[int] = set()


def _reserve_port() -> int:
    for _ in range(100):
        port = free_port()
        if port not in _PORTS:
            _PORTS.add(port)
            return port
    raise RemoteError(ErrorCode.UNAVAILABLE, "no free port for a pod")


class LocalNode(Component):
    """One node agent. Several run in one `fnplane up`; each has its own NATS connection."""

    def __init__(self, bus: Bus, info: NodeInfo, *, workdir: Path, log_dir: Path,
                 keep_logs: int = KEEP_POD_LOGS, pod_users: PodUsers | None = None,
                 heartbeat_s: float = NODE_HEARTBEAT_S, pod_nice: int = POD_NICE,
                 cache: ModelCache | None = None) -> None:
        super().__init__(bus)
        # The node's model cache (None: services with a storage URI cannot start here).
        self.cache = cache
        # Pods whose weights are being fetched: accepted, not yet spawned.
        self._fetching: dict[str, StartPod] = {}
        self.pod_nice = pod_nice
        self.info = info
        self.heartbeat_s = heartbeat_s
        self.workdir = workdir
        # Who pods run as; shared by the nodes of one process. None: as fnplane itself.
        self.pod_users = pod_users or PodUsers(CURRENT, workdir=workdir)
        self.log_dir = log_dir
        # Logs of this node's ended pods, oldest first: the newest `keep_logs` stay for
        # `fnplane describe` and debugging, older ones are removed.
        self.keep_logs = keep_logs
        self._ended: collections.deque[str] = collections.deque()
        self.pods: dict[str, LocalPod] = {}
        self._http: aiohttp.ClientSession | None = None
        self._stopping = False
        self.fence = EpochFence()
        refusals = self.metrics.counter("fnplane.node.refusals")
        for op in ("start", "stop"):  # from 0, so a rate sees the first one
            refusals.add(0, {"reason": "stale_epoch", "op": op})
        self.shards = ShardFence()
        self.announcer = PodAnnouncer(bus, what=f"node {info.name}", fence=self.fence)
        self._reported: set[str] = set()
        # Pod → the GPU devices it holds, from the moment its start is accepted (before the
        # process exists) until it ended: what a second pod may not be given.
        self._gpus: dict[str, tuple[int, ...]] = {}

    @property
    def name(self) -> str:
        return self.info.name

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Said once at start (a warning when pods run as root) and on the node's label.
        summary = await self.pod_users.prepare("python", pod_path())
        self.info = msgspec.structs.replace(self.info, labels={**self.info.labels, LABEL: summary})
        if self.cache is not None:
            # What a previous agent cached is still here: said in the registration.
            self.cache.load()
            held = self.cache.contents()
            self.info = msgspec.structs.replace(
                self.info, models=sorted({*self.info.models, *held}), model_bytes=held)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        bus = self.bus
        await bus.serve(ep.NODE_START, self._on_start, concurrent=True, node=self.name)
        await bus.serve(ep.NODE_STOP, self._on_stop, concurrent=True, node=self.name)
        await bus.serve(ep.NODE_PREFETCH, self._on_prefetch, node=self.name)
        await bus.serve(ep.NODE_INVENTORY, self._on_inventory)
        await bus.serve(ep.NODE_ANNOUNCE, self._on_announce)
        await register(bus, [self.info])
        beats = NodeHeartbeater(bus, nodes=lambda: [self.name], rejoin=self._rejoin,
                                interval_s=self.heartbeat_s, caches=self._caches)
        self.tasks.spawn(beats.run(), name="heartbeat")
        self.tasks.spawn(self._scrape(), name="metrics")
        await follow_map(bus, self.fence)
        await follow_shards(bus, self.shards)

    async def stop(self) -> None:
        """Stop every pod (in parallel, each with its grace period), then disconnect."""
        if self._stopping:
            return
        self._stopping = True
        await asyncio.gather(
            *(self._terminate(p, "node shutting down") for p in list(self.pods.values())),
            return_exceptions=True,
        )
        await super().stop()
        if self._http is not None:
            await self._http.close()

    async def _on_prefetch(self, msg: PrefetchModel, _raw: Msg) -> Empty:
        """Warm the cache now; the download goes on after the answer (its end shows in the
        next cache report)."""
        if self.cache is None:
            raise RemoteError(ErrorCode.INVALID, f"node {self.name} has no model cache")
        self.tasks.spawn(self._prefetch(msg), name=f"prefetch-{msg.service}")
        return Empty()

    async def _prefetch(self, msg: PrefetchModel) -> None:
        assert self.cache is not None
        try:
            await self.cache.fetch(msg.storage_uri, sha256=msg.sha256)
        except (ModelUriError, ModelFetchError) as exc:
            log.warning("node %s: prefetch for %s failed: %s", self.name, msg.service, exc)

    def _caches(self) -> dict[str, dict[str, int]]:
        """What this node's cache holds now, said with every heartbeat."""
        return {} if self.cache is None else {self.name: self.cache.contents()}

    async def _rejoin(self, _nodes: list[str]) -> None:
        """The coordinator took this node for lost (we were silent) or forgot it: register
        again, and say again what runs here, since `route` and `scale` dropped our pods."""
        await register(self.bus, [self.info])
        await self.announcer.again_live()

    # ---- commands -------------------------------------------------------------------------

    async def _on_inventory(self, msg: InventoryRequest, _raw: Msg) -> Inventory | None:
        if self.name not in msg.nodes:
            return None  # asked of other nodes: their agents answer
        pods = [
            PodAllocation(pod=p.start.pod, service=p.start.spec.name,
                          resources=p.start.spec.resources,
                          gpu_devices=list(p.start.gpu_devices))
            for p in self.pods.values()
        ]
        pods += [PodAllocation(pod=m.pod, service=m.spec.name, resources=m.spec.resources,
                               gpu_devices=list(m.gpu_devices))
                 for m in self._fetching.values()]
        return Inventory(pods={self.name: pods})

    async def _on_start(self, msg: StartPod, _raw: Msg) -> Empty:
        if self._stopping:
            raise RemoteError(ErrorCode.UNAVAILABLE, f"node {self.name} is shutting down")
        if msg.pod in self.pods or msg.pod in self._fetching:
            return Empty()
        if (refused := self.fence.refusal(msg)) is not None:
            count_refusal(self.metrics, refused, "start")
            raise refused
        if msg.spec.storage_uri and self.cache is None:
            raise RemoteError(ErrorCode.INVALID, f"node {self.name} has no model cache for "
                                                 f"{msg.spec.storage_uri}")
        self._claim_gpus(msg)
        port = _reserve_port()
        if msg.spec.storage_uri:
            # Accepted now, spawned once the weights are here: the download must not hold
            # `schedule`'s call, and ten starts of one model share one download.
            self._fetching[msg.pod] = msg
            self.tasks.spawn(self._fetch_and_start(msg, port), name=f"{msg.pod}-fetch")
            return Empty()
        try:
            return await self._start(msg, port)
        except BaseException:
            if msg.pod not in self.pods:  # no pod took it
                _PORTS.discard(port)
                self._gpus.pop(msg.pod, None)
            raise

    async def _fetch_and_start(self, msg: StartPod, port: int) -> None:
        """Fetch the weights into the node's cache, then start the pod with them in
        MODEL_DIR; a fetch that fails is a failed pod whose reason names the URI."""
        assert self.cache is not None
        spec = msg.spec
        reason = ""
        try:
            with telemetry.tracer.start_as_current_span("node weights fetch") as span:
                span.set_attribute("fnplane.storage_uri", spec.storage_uri)
                model = await self.cache.fetch(spec.storage_uri, sha256=spec.storage_sha256)
                span.set_attribute("fnplane.cache_hit", model.hit)
            self.cache.acquire(msg.pod, model.key)
            if self._fetching.pop(msg.pod, None) is None:
                return  # stopped while its weights were fetched
            await self._start(msg, port, model_dir=model.path, fetched_at=time.time())
        except (ModelUriError, ModelFetchError) as exc:
            reason = str(exc)
        except RemoteError as exc:
            reason = exc.message
        finally:
            self._fetching.pop(msg.pod, None)
            if msg.pod not in self.pods:
                _PORTS.discard(port)
                self._gpus.pop(msg.pod, None)
                if self.cache is not None:
                    self.cache.release(msg.pod)
        if reason:
            log.warning("node %s: pod %s failed: %s", self.name, msg.pod, reason)
            await self._emit_unstarted(msg, "failed", reason=reason)

    async def _emit_unstarted(self, msg: StartPod, state: PodState, *, reason: str) -> None:
        """The event of a pod that never got a process (its weights never came)."""
        spec = msg.spec
        await self.announcer.send(PodEvent(
            pod=msg.pod, service=spec.name, node=self.name, state=state,
            container_concurrency=spec.container_concurrency, resources=spec.resources,
            timeline=PodTimeline(requested_at=msg.requested_at, placed_at=msg.placed_at),
            reason=reason, ts=time.time(), model=spec.model_id))

    def _claim_gpus(self, msg: StartPod) -> None:
        """Hold the GPU devices `schedule` assigned the pod, refusing a start that would
        share one with a live pod or names devices this node does not have: `schedule`
        keeps them disjoint, and this is where a mistake would become two models on one
        GPU (both out of memory, or one silently slow)."""
        want, devices = msg.spec.resources.gpu, tuple(msg.gpu_devices)
        if want <= 0:
            return
        ours = set(self.info.gpu_devices) or set(range(self.info.capacity.gpu))
        busy = {d for pod, ds in self._gpus.items() if pod != msg.pod for d in ds}
        if len(set(devices)) != want or not set(devices) <= ours or set(devices) & busy:
            raise RemoteError(ErrorCode.CONFLICT,
                              f"node {self.name}: pod {msg.pod} wants {want} GPU(s), was "
                              f"given devices {list(devices)} (node has {sorted(ours)}, "
                              f"in use {sorted(busy)})")
        self._gpus[msg.pod] = devices

    def _gpu_env(self, msg: StartPod) -> dict[str, str]:
        """CUDA_VISIBLE_DEVICES for a pod of a node with GPUs: the devices it was given, so
        CUDA numbers them 0.. inside the pod; none for a pod that asked for none, so it does
        not take a GPU it was not given. On a node without GPUs, nothing is set."""
        if self.info.capacity.gpu <= 0:
            return {}
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in self._gpus.get(msg.pod, ()))}

    async def _start(self, msg: StartPod, port: int, *, model_dir: Path | None = None,
                     fetched_at: float = 0.0) -> Empty:
        spec = msg.spec
        weights = {} if model_dir is None else {"MODEL_DIR": str(model_dir),
                                                "STORAGE_URI": spec.storage_uri}
        env = {
            # A clean environment: nothing of the control plane's (its credentials, a cloud
            # key in the operator's shell) reaches a pod; only the few variables a process
            # needs to run at all, the spec's env, and what the pod contract sets.
            **{k: v for k, v in os.environ.items() if k in POD_INHERITS},
            "PATH": pod_path(),
            **spec.env,
            "PORT": str(port),
            "MODEL_NAME": spec.env.get("MODEL_NAME", spec.name),
            "MODEL_VERSION": spec.env.get("MODEL_VERSION", spec.model_version),
            # Knative's K_SERVICE and K_REVISION: the service clients call, the revision running.
            "FNPLANE_SERVICE": spec.revision_of or spec.name,
            **({"FNPLANE_REVISION": spec.name} if spec.revision_of else {}),
            "FNPLANE_POD": msg.pod,
            "FNPLANE_NODE": self.name,
            **self._gpu_env(msg),
            **weights,
        }
        if not spec.command or shutil.which(spec.command[0], path=env["PATH"]) is None:
            raise RemoteError(ErrorCode.INVALID,
                              f"cannot start {spec.command[:1]!r}: not found on PATH")
        try:
            run_as = await self.pod_users.run_as(spec.name, list(spec.command), env["PATH"])
        except PodUserError as exc:
            raise RemoteError(ErrorCode.INVALID, str(exc)) from None
        if run_as.ids is not None and "HOME" not in spec.env:
            env["HOME"] = run_as.home  # fnplane's home is not the pod user's
        try:
            # Not the loop's subprocess_exec: under uvloop it forks this whole process with
            # the loop stopped, and pods started at once would queue behind each other.
            proc = await spawn(list(spec.command), cwd=self.workdir, env=env,
                               run_as=run_as.ids, nice=self.pod_nice)
        except OSError as exc:
            raise RemoteError(ErrorCode.INVALID,
                              f"cannot start {spec.command[0]!r}: {exc}") from None
        pod = LocalPod(msg, port, proc, time.time(), run_as=run_as.describe(),
                       fetched_at=fetched_at)
        self.pods[msg.pod] = pod
        self.metrics.counter("fnplane.node.pods.started").add(1, revision_labels(msg.spec.name))
        pod.tasks = [
            self.tasks.spawn(self._pump_output(pod), name=f"{msg.pod}-output"),
            self.tasks.spawn(self._watch(pod), name=f"{msg.pod}-watch"),
        ]
        await self._emit(pod, "starting")
        return Empty()

    async def _on_announce(self, msg: AnnounceRequest, _raw: Msg) -> PodsAnnounced:
        return self.announcer.announced(msg, [self.name])

    async def _on_stop(self, msg: StopPod, _raw: Msg) -> Empty:
        if (refused := stop_refusal(self.shards, msg)) is not None:
            count_refusal(self.metrics, refused, "stop")
            raise refused
        pod = self.pods.get(msg.pod)
        if pod is not None:
            await self._terminate(pod, msg.reason)
        elif (fetching := self._fetching.pop(msg.pod, None)) is not None:
            await self._emit_unstarted(fetching, "stopped", reason=msg.reason)
        return Empty()

    # ---- pod metrics ---------------------------------------------------------------------

    async def _scrape(self) -> None:
        """Every second, the requests in flight each ready pod reports on `/stats` (pods
        without it are skipped), summed per service and sent to `scale` as pod metrics:
        the view of load that holds even when no activator is in the path."""
        assert self._http is not None
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S)
            per_service: dict[str, int] = {}
            for pod in list(self.pods.values()):
                if pod.state != "ready":
                    continue
                try:
                    async with self._http.get(pod.url + "/stats") as resp:
                        if resp.status != 200:
                            continue
                        stats = await resp.json()
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    continue
                name = pod.start.spec.name
                per_service[name] = per_service.get(name, 0) + int(stats.get("in_flight", 0))
            now = time.time()
            for name in set(per_service) | self._reported:
                n = per_service.get(name, 0)
                if n:
                    self._reported.add(name)
                else:
                    self._reported.discard(name)
                demand = Demand(service=name, reporter=f"node:{self.name}", buffered=0,
                                in_flight=n, requests=0, ts=now, source="pods")
                try:
                    await self.bus.send(ep.DEMAND, demand, shard=shard_of(demand.service))
                except (nats.errors.Error, OSError):
                    log.debug("node %s: pod metrics lost", self.name, exc_info=True)

    # ---- pod lifecycle -------------------------------------------------------------------

    async def _pump_output(self, pod: LocalPod) -> None:
        assert pod.proc.stdout is not None
        # Unbuffered: a running pod's log is readable as it goes (`tail -f`, tests).
        logfile = (self.log_dir / f"{pod.start.pod}.log").open("ab", buffering=0)
        try:
            while line := await pod.proc.stdout.readline():
                logfile.write(line)
                pod.output.append(line.decode(errors="replace"))
        finally:
            logfile.close()

    async def _watch(self, pod: LocalPod) -> None:
        """Probe readiness until the deadline; then wait for the process to exit."""
        assert self._http is not None
        spec = pod.start.spec
        deadline = pod.spawned_at + spec.startup_timeout_s
        url = pod.url + spec.readiness_path
        delay = PROBE_FIRST_S
        while pod.state == "starting":
            if pod.proc.returncode is not None:
                break
            if time.time() > deadline:
                await self._fail(pod, f"not ready within {spec.startup_timeout_s:g}s")
                return
            # An HTTP request only once something listens: a refused connect costs the
            # loop a few µs, a refused aiohttp request a good part of a millisecond, and
            # a hundred pods starting at once are probed many times each.
            if _listening(pod.port):
                try:
                    async with self._http.get(url) as resp:
                        if resp.status == 200:
                            pod.state, pod.ready_at = "ready", time.time()
                            await self._emit(pod, "ready")
                            break
                except (aiohttp.ClientError, TimeoutError):
                    pass
            await asyncio.sleep(delay)
            delay = min(2 * delay, PROBE_MAX_S)
        if pod.state == "ready":
            pod.tasks.append(self.tasks.spawn(self._keep_probing(pod),
                                              name=f"{pod.start.pod}-readiness"))
        code = await pod.proc.wait()
        await asyncio.sleep(0.05)  # let the output pump take the last lines
        if pod.state in ("starting", "ready", "unready"):
            await self._fail(pod, f"pod exited with code {code}")

    async def _keep_probing(self, pod: LocalPod) -> None:
        """Once ready, the spec's readiness probe on its period, as a kubelet runs it: a pod
        that fails it `readiness_failure_threshold` times in a row is `unready` (alive, but
        `route` withdraws it: a model reloading, a wedged GPU, a server shedding load), and
        `ready` again at its next success."""
        assert self._http is not None
        spec = pod.start.spec
        url = pod.url + spec.readiness_path
        probe = ReadinessProbe(spec.readiness_failure_threshold)
        while pod.state in ("ready", "unready"):
            await asyncio.sleep(spec.readiness_period_s)
            try:
                async with self._http.get(url) as resp:
                    ok = resp.status == 200  # as the start-up probe above
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if pod.state not in ("ready", "unready"):
                return  # stopping or failed meanwhile: that event says it
            change = probe.observe(ok)
            if change is not None:
                pod.state = change
                log.warning("node %s: pod %s is %s", self.name, pod.start.pod, change)
                await self._emit(pod, change, reason="" if ok else
                                 f"readiness probe failed {probe.failures} times in a row")

    async def _fail(self, pod: LocalPod, reason: str) -> None:
        if pod.state in ("failed", "stopped"):
            return
        pod.state = "failed"
        await _kill(pod.proc, grace=0.5)
        self.pods.pop(pod.start.pod, None)
        _PORTS.discard(pod.port)
        self._gpus.pop(pod.start.pod, None)
        self._ended_pod(pod.start.pod)
        await self._emit(pod, "failed", reason=reason, log_tail=pod.tail())

    async def _terminate(self, pod: LocalPod, reason: str) -> None:
        if pod.state in ("terminating", "stopped", "failed"):
            return
        pod.state = "terminating"
        await self._emit(pod, "terminating", reason=reason)
        await _kill(pod.proc, grace=STOP_GRACE_S)
        pod.state = "stopped"
        self.pods.pop(pod.start.pod, None)
        _PORTS.discard(pod.port)
        self._gpus.pop(pod.start.pod, None)
        self._ended_pod(pod.start.pod)
        await self._emit(pod, "stopped", reason=reason)
        for task in pod.tasks:
            task.cancel()

    def _ended_pod(self, name: str) -> None:
        if self.cache is not None:
            self.cache.release(name)  # its weights may be evicted now
        self._ended.append(name)
        while len(self._ended) > self.keep_logs:
            old = self._ended.popleft()
            (self.log_dir / f"{old}.log").unlink(missing_ok=True)

    async def _emit(
        self, pod: LocalPod, state: PodState, *, reason: str = "", log_tail: str = ""
    ) -> None:
        spec = pod.start.spec
        ev = PodEvent(
            pod=pod.start.pod,
            service=spec.name,
            node=self.name,
            state=state,
            url=pod.url,
            container_concurrency=spec.container_concurrency,
            resources=spec.resources,
            timeline=PodTimeline(
                requested_at=pod.start.requested_at,
                placed_at=pod.start.placed_at,
                fetched_at=pod.fetched_at,
                spawned_at=pod.spawned_at,
                ready_at=pod.ready_at,
            ),
            reason=reason,
            log_tail=log_tail,
            ts=time.time(),
            model=spec.model_id,
            run_as=pod.run_as,
        )
        await self.announcer.send(ev)


def pod_path() -> str:
    """A pod's PATH: the control plane's interpreter first, so a spec's `python -m ...`
    finds the same installed packages."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


async def _kill(proc: Child, *, grace: float) -> None:
    """Stop the pod's whole process group (it runs in a session of its own): SIGTERM, then
    SIGKILL after `grace`; and whatever it started is killed even when the pod itself has
    already exited, so nothing of a stopped or deleted pod survives it."""
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)


def _listening(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:port. On loopback a connect is
    refused or accepted within microseconds, so it is done right here rather than through
    the loop; the timeout bounds the one case that could wait (a full accept queue, which a
    pod no one else has reached yet does not have)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(LISTEN_CHECK_S)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already

