"""The fault matrix of issue 10: for each ordinary fault, a burst through the gateway while it
happens, and what became of every request. Prints ONE JSON object:

    {"faults": [{"fault", "sent", "ok", "errors_by_status", "hung", "lost", "refused", "cut",
                 "recovered", "recover_s", "ready_false_s", "note"}, ...],
     "goal_met": bool, "options": {...}}

    python -m loadtests.faults --json                 # 3,000 requests at 50 concurrent each
    python -m loadtests.faults --quick --json         # 300 requests, for the smoke test
    python -m loadtests.faults --only nats-server --json

Each fault gets a stack of its own (its own supervised nats-server and Redis, as `fnplane up`
starts them, two local nodes, real pods of the sample model) and a service at zero: in this
process for the faults of servers, pods and nodes (to reach inside), as `fnplane up` with one
process per role for the faults of role processes and the SIGTERM. The load
comes from `loadtests.burst_client` in a process of its own, so the client never shares the
stack's event loop. Definitions, so the figures can be checked:
- `sent`: requests the client sent; `ok`: answered 200; `errors_by_status`: the other
  answers by HTTP status, and requests with no answer by the client's error name;
- `hung`: no answer within 90 s (the client's timeout); `lost`: no answer for another reason
  (a connection dropped mid-request); `refused`: the connection was refused before the
  request was sent (only when the fault stops the process that listens: a clean error);
  `cut`: the connection dropped mid-request because the fault killed the process holding
  it (a gateway worker: a clean connection error, as with any server that dies);
- `recovered`: a cold request to a second service at zero, sent `recovery_after_s` after the
  fault, answered 200 (null where the fault stops the stack itself);
- `recover_s`: from the fault to the first 200 of a request sent after it;
- `ready_false_s`: how long `/v2/health/ready` said "not ready" while the fault lasted,
  polled every 100 ms (readiness must tell the truth while the data path is degraded).
Goal: 0 lost and 0 hung for every fault, every request 200 except the ones refused while
`fnplane up` shuts down.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from controlplane.stack import Stack
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import (
    ActivatorConfig,
    Config,
    CoordinatorConfig,
    NodesConfig,
    ScaleConfig,
)
from kernel.identity import login
from kernel.messages import (
    DeployRequest,
    Empty,
    NameRequest,
    Resources,
    ScalingSpec,
    ServiceSpec,
    ShardMap,
)
from kernel.procs import descendants, free_port
from kernel.revisions import revision_name
from kernel.shards import shard_of
from partitions.agents.local import LocalNode

log = logging.getLogger("loadtests.faults")
REPO = Path(__file__).resolve().parent.parent
SAMPLE = [sys.executable, "-m", "examples.sample.server"]
BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                    "data": [[5.1, 3.5, 1.4, 0.2]]}]}
HUNG_S = 90.0
# What a client sees when the process holding its connection dies mid-request.
CUT_ERRORS = ("ServerDisconnectedError", "ClientOSError", "ClientPayloadError")


@dataclass(frozen=True)
class Options:
    requests: int = 3000
    concurrency: int = 50
    latency_ms: int = 100  # the sample model's time per request: the burst must outlast the fault
    fault_after_s: float = 1.5  # into the burst
    recovery_after_s: float = 10.0
    only: tuple[str, ...] = ()
    scale_min: int = 1  # `scale` instances (sharded by service): 2 puts idle pods elsewhere


@dataclass
class Outcome:
    fault: str
    sent: int = 0
    ok: int = 0
    errors_by_status: dict[str, int] = field(default_factory=dict)
    hung: int = 0
    lost: int = 0
    refused: int = 0
    cut: int = 0
    recovered: bool | None = None
    recover_s: float | None = None
    ready_false_s: float = 0.0
    note: str = ""


def progress(msg: str) -> None:
    print(f"[faults] {msg}", file=sys.stderr, flush=True)


def spec(name: str, latency_ms: int, **over: Any) -> ServiceSpec:
    base = ServiceSpec(
        name=name, command=list(SAMPLE), resources=Resources(cpu=0.5, memory_mb=128),
        container_concurrency=10, env={"SAMPLE_LATENCY_MS": str(latency_ms)},
        scaling=ScalingSpec(min_scale=0, target_concurrency=10, stable_window_s=6,
                            scale_to_zero_grace_s=5),
    )
    return msgspec.structs.replace(base, **over)


def config(state: Path, *, runtime: str = "tasks", scale_min: int = 1) -> Config:
    return Config(
        state_dir=state,
        activator=ActivatorConfig(port=0, metrics_interval_s=0.5, request_timeout_s=60.0),
        scale=ScaleConfig(tick_s=0.2),
        nodes=NodesConfig(count=2, capacity=Resources(cpu=4, memory_mb=4096), workdir=REPO),
        coordinator=CoordinatorConfig(runtime=runtime, scale_min=scale_min,
                                      scale_max=max(4, scale_min)),
    )


# ---- the client and what it saw ------------------------------------------------------------


async def start_client(url: str, opts: Options) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtests.burst_client", "--url", url,
        "--requests", str(opts.requests), "--concurrency", str(opts.concurrency),
        "--timeout", str(HUNG_S), cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )


async def client_records(proc: asyncio.subprocess.Process) -> list[list[Any]]:
    out, _ = await proc.communicate()
    return list(json.loads(out)["records"])


def tally(out: Outcome, records: list[list[Any]], t_fault: float | None, *,
          connections_cut: bool = False) -> None:
    """Records are [sent (wall clock), latency ms, status (0: none), pod, error name]. With
    `connections_cut`, a connection dropped mid-request is the fault's doing (the process
    holding it died): `cut`, not lost."""
    errors: collections.Counter[str] = collections.Counter()
    first_ok_after: float | None = None
    for sent, ms, status, _pod, error in records:
        out.sent += 1
        if status == 200:
            out.ok += 1
            if t_fault is not None and sent >= t_fault:
                done = sent + ms / 1000 - t_fault
                first_ok_after = done if first_ok_after is None else min(first_ok_after, done)
        elif status:
            errors[str(status)] += 1
        else:
            errors[error or "no answer"] += 1
            if error in ("TimeoutError", "ServerTimeoutError") or ms >= HUNG_S * 1000:
                out.hung += 1
            elif error == "ClientConnectorError":
                out.refused += 1
            elif connections_cut and error in CUT_ERRORS:
                out.cut += 1
            else:
                out.lost += 1
    out.errors_by_status = dict(errors)
    if first_ok_after is not None:
        out.recover_s = round(first_ok_after, 3)


class ReadinessWatch:
    """Polls readiness while the fault lasts; counts the time it said not ready."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.false_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
            while True:
                t0 = time.monotonic()
                try:
                    async with http.get(f"{self.url}/v2/health/ready") as r:
                        ready = r.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ready = False
                await asyncio.sleep(0.1)
                if not ready:
                    self.false_s += time.monotonic() - t0

    async def stop(self) -> float:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return round(self.false_s, 2)


async def post_once(url: str, timeout: float = 60.0) -> int:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.post(url, json=BODY) as r:
                await r.read()
                return r.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


# ---- the faults -------------------------------------------------------------------------------

Inject = Callable[[Stack, str], Awaitable[str]]


async def _ready_pod_pid(stack: Stack, service: str, within_s: float = 30.0) -> int:
    """A serving pod's pid; on a slow machine the cold start may outlast the fault's
    planned moment, so wait for one."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for node in _nodes(stack):
            for pod in node.pods.values():
                spec = pod.start.spec
                if (spec.revision_of or spec.name) == service and pod.state == "ready":
                    return int(pod.proc.pid)
        await asyncio.sleep(0.05)
    raise RuntimeError(f"no ready pod of {service} to kill within {within_s:g}s")


def _nodes(stack: Stack) -> list[LocalNode]:
    return [c for c in stack.components if isinstance(c, LocalNode)]


async def kill_pod(stack: Stack, service: str) -> str:
    pid = await _ready_pod_pid(stack, service)
    os.kill(pid, signal.SIGKILL)
    return f"SIGKILL to pod process {pid}"


def kill_server(which: str) -> Inject:
    async def inject(stack: Stack, _service: str) -> str:
        server = stack.nats if which == "nats-server" else stack.redis
        assert server is not None
        os.kill(server.process.pid, signal.SIGKILL)
        return f"SIGKILL to {which} (pid {server.process.pid}); `fnplane up` restarts it"
    return inject


async def kill_schedule(stack: Stack, _service: str) -> str:
    runtime = stack.runtime
    assert runtime is not None
    instances = runtime.instances("schedule")
    victim = instances[0]
    await runtime.kill("schedule", victim)
    return f"SIGKILL to schedule instance process {victim} (of {len(instances)})"


async def remove_node(stack: Stack, service: str) -> str:
    nodes = _nodes(stack)
    busiest = max(nodes, key=lambda n: sum(p.start.spec.name == service
                                           for p in n.pods.values()))
    n = len(busiest.pods)
    stack.components.remove(busiest)
    await busiest.stop()
    return f"node agent {busiest.name} stopped with its {n} pods"


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Inject | None
    at_cold_start: bool = False
    runtime: str = "tasks"
    setup: Callable[[Stack, Bus, Options], Awaitable[None]] | None = None


async def _other_owner(bus: Bus, service: str, candidates: list[str]) -> str:
    """The first candidate name whose `scale` shard another instance owns than `service`'s
    (so its idle pods are reclaimed by asking that owner); the first one if all share it."""
    smap: ShardMap = await bus.call(ep.SHARD_MAP_GET, Empty(), timeout=5)
    owner = {s.id: s.owner for s in smap.shards.get("scale", [])}

    def scaled(name: str) -> int:  # `scale` shards a service's first revision, NAME-00001
        return shard_of(revision_name(name, 1), smap.count)

    for name in candidates:
        if owner.get(scaled(name)) != owner.get(scaled(service)):
            return name
    return candidates[0]


async def fill_with_idle_pods(stack: Stack, bus: Bus, opts: Options) -> None:
    """The whole cluster (2 nodes x 4 cpu) held by 8 idle 1-cpu pods of another service;
    with 2 `scale` instances or more, one of a service in another instance's shard."""
    name = "idle"
    if opts.scale_min > 1:
        name = await _other_owner(bus, "sample", ["idle", *(f"idle-{i}" for i in range(20))])
    idle = spec(name, 1000, resources=Resources(cpu=1.0, memory_mb=128),
                container_concurrency=1,
                scaling=ScalingSpec(min_scale=0, max_scale=8, target_concurrency=1,
                                    stable_window_s=60, scale_to_zero_grace_s=600))
    await bus.call(ep.ADMIN_DEPLOY, DeployRequest(spec=idle), timeout=5)
    url = f"{stack.url}/v2/models/{name}/infer"
    await asyncio.gather(*(post_once(url) for _ in range(8)))
    for _ in range(200):
        st = await bus.call(ep.ADMIN_DESCRIBE, NameRequest(name=name), timeout=5)
        if st.ready_pods >= 8:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the idle service did not fill the cluster ({st.ready_pods} pods)")


FAULTS = [
    Fault("pod", kill_pod),
    Fault("nats-server-at-cold-start", kill_server("nats-server"), at_cold_start=True),
    Fault("nats-server", kill_server("nats-server")),
    Fault("redis-server", kill_server("redis-server")),
    Fault("schedule-instance", kill_schedule, runtime="processes"),
    Fault("node-agent-removed", remove_node),
    Fault("cluster-full-of-idle-pods", None, setup=fill_with_idle_pods),
]
NOT_APPLICABLE = {
    "scale-instance, route-instance": "not rows here: tests/test_shards.py SIGKILLs the owners "
    "of a service's scale and route shards mid-burst under `fnplane up --scale-min 2 "
    "--route-min 2` (0 lost); with one instance each, the coordinator-process row takes all "
    "three kinds down at once",
}


async def run_fault(fault: Fault, opts: Options) -> Outcome:
    out = Outcome(fault.name)
    with tempfile.TemporaryDirectory(prefix="fnplane-faults-") as state:
        stack = Stack(config(Path(state), runtime=fault.runtime, scale_min=opts.scale_min),
                      nats_port=None)
        await stack.start()
        assert stack.nats_url and stack.config.credentials
        bus = await Bus.connect(stack.nats_url, "faults-admin",
                                login=login(stack.config.credentials, "admin"))
        try:
            for name in ("sample", "second"):
                await bus.call(ep.ADMIN_DEPLOY,
                               DeployRequest(spec=spec(name, opts.latency_ms)), timeout=5)
            if fault.setup is not None:
                await fault.setup(stack, bus, opts)
            await _burst(stack, fault, opts, out)
        finally:
            await bus.close()
            await stack.stop()
    return out


async def _burst(stack: Stack, fault: Fault, opts: Options, out: Outcome) -> None:
    watch = ReadinessWatch(stack.url)
    watch.start()
    client = await start_client(f"{stack.url}/v2/models/sample/infer", opts)
    t_fault: float | None = None
    if fault.inject is not None:
        await asyncio.sleep(0.05 if fault.at_cold_start else opts.fault_after_s)
        t_fault = time.time()
        out.note = await fault.inject(stack, "sample")
        progress(f"{fault.name}: {out.note}")
    else:
        t_fault = time.time()
        out.note = "the burst starts on a cluster with no free room"
    await asyncio.sleep(max(0.0, t_fault + opts.recovery_after_s - time.time()))
    probe_sent = time.time()
    status = await post_once(f"{stack.url}/v2/models/second/infer")
    probe_done = time.time()
    out.recovered = status == 200
    records = await client_records(client)
    out.ready_false_s = await watch.stop()
    tally(out, records, t_fault)
    if out.recovered and (out.recover_s is None or probe_done - t_fault < out.recover_s):
        out.recover_s = round(max(probe_done, probe_sent) - t_fault, 3)


# ---- SIGTERM to `fnplane up` ------------------------------------------------------------------


def role_pids(parent: int) -> dict[str, int]:
    """The role processes under `fnplane up` (`controlplane/role.py`), by role: coordinator,
    nodes, activator-0, activator-1, ..."""
    found: dict[str, int] = {}
    for pid in descendants(parent):
        try:
            args = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if a]
        except OSError:
            continue
        if "controlplane.role" in args:
            rest = args[args.index("controlplane.role") + 1:]
            found[rest[0] + (f"-{rest[2]}" if rest[0] == "activator" else "")] = pid
    return found


@dataclass(frozen=True)
class UpFault:
    """A fault of `fnplane up` as the user runs it (one process per role)."""

    name: str
    role: str  # the role process SIGKILLed; "" for the SIGTERM of `fnplane up` itself
    workers: int = 1
    # The killed process held client connections: requests on them end with a clean
    # connection error (counted as `cut`, not lost), as with any server that dies.
    holds_connections: bool = False


UP_FAULTS = [
    UpFault("gateway-worker-process", "activator-0", workers=2, holds_connections=True),
    UpFault("node-agents-process", "nodes"),
    UpFault("coordinator-process", "coordinator"),
    # Connections still in the listener's accept queue when it closes are reset by the
    # kernel: the process that held them is gone, as with a killed worker.
    UpFault("sigterm-fnplane-up", "", holds_connections=True),
]


async def run_up_fault(fault: UpFault, opts: Options) -> Outcome:
    """Start `fnplane up`, burst through it, and mid-burst SIGKILL one role process (`fnplane
    up` restarts it) or SIGTERM `fnplane up` itself (graceful drain: in-flight requests
    answered, new connections refused, exit 0; nothing recovers by itself)."""
    out = Outcome(fault.name)
    with tempfile.TemporaryDirectory(prefix="fnplane-faults-") as state:
        port, nats_port = free_port(), free_port()
        env = {**os.environ, "FNPLANE_STATE_DIR": state}
        logfile = Path(state) / "up.log"
        with logfile.open("wb") as logf:
            up = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "controlplane.cli", "up", "--port", str(port),
                "--nats-port", str(nats_port), "--state-dir", state, "--workdir", str(REPO),
                "--gateway-workers", str(fault.workers),
                cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            await _wait_ready(url, up, logfile)
            creds = Path(state) / "credentials.json"
            bus = await Bus.connect(f"nats://127.0.0.1:{nats_port}", "faults-admin",
                                    login=login(creds, "admin"))
            try:
                for name in ("sample", "second"):
                    await bus.call(ep.ADMIN_DEPLOY,
                                   DeployRequest(spec=spec(name, opts.latency_ms)), timeout=5)
            finally:
                await bus.close()
            watch = ReadinessWatch(url)
            watch.start()
            client = await start_client(f"{url}/v2/models/sample/infer", opts)
            await asyncio.sleep(opts.fault_after_s)
            t_fault = time.time()
            if fault.role:
                pid = role_pids(up.pid)[fault.role]
                os.kill(pid, signal.SIGKILL)
                out.note = (f"SIGKILL to the {fault.role} process (pid {pid}); "
                            "fnplane up restarts it")
                await asyncio.sleep(max(0.0, t_fault + opts.recovery_after_s - time.time()))
                status = await post_once(f"{url}/v2/models/second/infer")
                out.recovered = status == 200
                probe_done = time.time()
            else:
                up.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(up.wait(), 60)
                out.note = f"SIGTERM to `fnplane up`: exited with code {code}"
            progress(f"{fault.name}: {out.note}")
            records = await client_records(client)
            out.ready_false_s = await watch.stop()
            tally(out, records, t_fault, connections_cut=fault.holds_connections)
            if not fault.role:
                out.recover_s = None  # the stack is gone: nothing recovers by itself
            elif out.recovered and (out.recover_s is None or probe_done - t_fault < out.recover_s):
                out.recover_s = round(probe_done - t_fault, 3)
        finally:
            if up.returncode is None:
                up.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(up.wait(), 60)
                except TimeoutError:
                    up.kill()
                    await up.wait()
    return out


async def _wait_ready(url: str, up: asyncio.subprocess.Process, logfile: Path) -> None:
    """Until `fnplane up` printed its banner (every role started: a gateway worker that
    answers is not yet all of them) and the gateway says ready."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
        for _ in range(600):
            if up.returncode is not None:
                raise RuntimeError(f"fnplane up exited: {logfile.read_text()[-2000:]}")
            if "Ctrl-C stops everything" not in logfile.read_text(errors="replace"):
                await asyncio.sleep(0.1)
                continue
            try:
                async with http.get(f"{url}/v2/health/ready") as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("fnplane up was not ready in 60 s")


# ---- the whole matrix -------------------------------------------------------------------------


def goal_met(outcomes: list[Outcome]) -> bool:
    """0 lost and 0 hung everywhere; every request 200 except those refused or cut where
    the fault removed the process holding the client's connection; recovered by itself."""
    for o in outcomes:
        if o.lost or o.hung or o.recovered is False:
            return False
        if o.ok + o.refused + o.cut != o.sent:
            return False
        if o.refused and o.fault != "sigterm-fnplane-up":
            return False
    return True


async def run(opts: Options) -> dict[str, Any]:
    outcomes: list[Outcome] = []
    for fault in FAULTS:
        if opts.only and not any(o in fault.name for o in opts.only):
            continue
        t0 = time.time()
        outcomes.append(await run_fault(fault, opts))
        progress(f"{fault.name}: {asdict(outcomes[-1])} in {time.time() - t0:.1f}s")
    for up_fault in UP_FAULTS:
        if opts.only and not any(o in up_fault.name for o in opts.only):
            continue
        t0 = time.time()
        outcomes.append(await run_up_fault(up_fault, opts))
        progress(f"{up_fault.name}: {asdict(outcomes[-1])} in {time.time() - t0:.1f}s")
    return {
        "faults": [asdict(o) for o in outcomes],
        "not_applicable": NOT_APPLICABLE,
        "goal_met": goal_met(outcomes),
        "options": asdict(opts),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the JSON object (always printed)")
    p.add_argument("--quick", action="store_true",
                   help="300 requests per fault, recovery probe 3 s after it")
    p.add_argument("--requests", type=int)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--only", action="append", default=[],
                   help="run only the faults whose name contains this (repeatable)")
    p.add_argument("--scale-min", type=int, default=1,
                   help="scale instances, sharded by service (2: a service's idle pods may "
                        "belong to another instance's shard)")
    args = p.parse_args(argv)
    opts = Options(concurrency=args.concurrency, only=tuple(args.only),
                   scale_min=args.scale_min)
    if args.quick:
        opts = replace(opts, requests=300, latency_ms=300, fault_after_s=1.0,
                       recovery_after_s=3.0)
    if args.requests:
        opts = replace(opts, requests=args.requests)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    result = asyncio.run(run(opts))
    print(json.dumps(result))
    return 0 if result["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())

