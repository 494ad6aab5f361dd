"""The dataplane probe of issue 11, shaped like Knative's dataplane-probe: what the activator
adds to a warm request. Starts the embedded stack in this process, deploys two services of the
sample model (each request sleeps `--latency-ms`, 100 by default) with their pods already up,
and sends an open-loop load (constant arrival rate, from load-generator processes of their
own, `loadtests.dataplane_client`) interleaved over three paths at each rate:

- `direct-to-pod`: the client calls the pod's own URL (the pod of `dp-proxy`): the baseline;
- `activator-proxy`: through the gateway, buffer and throttler — `dp-proxy` has target burst
  capacity -1, so `scale` keeps the activator in its path (Knative's meaning);
- `gateway-direct`: through the gateway in direct mode — `dp-direct` has target burst capacity
  0, so `route` publishes "direct" as soon as it has a ready pod.

Prints ONE JSON object: per rate and path p50/p95/p99 and errors, the X-Fnplane-Path each
answer carried, the activator's added latency over direct-to-pod, the generators' lag behind
their schedule, the CPU of the generators, the stack (gateway and control plane: one
process), the pods, nats-server and Redis (from /proc/<pid>/stat over the measured window),
and a `goal` section (≤ 1 ms p50, ≤ 5 ms p99 added at the highest rate). A PNG beside it.

    python -m loadtests.dataplane --json                  # 250 and 1,000 QPS per path, 60 s each
    python -m loadtests.dataplane --quick --json          # seconds, for the smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import aiohttp
from nats.aio.msg import Msg

from controlplane.stack import Stack
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import ActivatorConfig, Config, NodesConfig
from kernel.identity import login
from kernel.messages import DeployRequest, Endpoints, Resources, ScalingSpec, ServiceSpec
from kernel.procs import descendants, pdeathsig_preexec
from kernel.revisions import parent_of
from loadtests import dataplane_report as dr
from loadtests.burst import processes_left
from loadtests.burst_client import BODY, JSON_HEADERS
from loadtests.options import from_args

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PROXY_SVC = "dp-proxy"
DIRECT_SVC = "dp-direct"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProbeOptions:
    rates: tuple[float, ...] = (250.0, 1000.0)  # requests per second per path
    duration_s: float = 60.0  # measured, per rate
    warmup_s: float = 2.0  # sent first at the same rate, not measured
    latency_ms: float = 100.0  # SAMPLE_LATENCY_MS of the pods
    clients: int = 2  # load-generator processes sharing one schedule
    pods: int = 1  # per service
    # "processes": the stack as `fnplane up` runs it, the gateway alone in its process (or
    # several: gateway_workers); "inline": gateway and control plane on one event loop.
    roles: str = "processes"
    gateway_workers: int = 1
    out: Path = REPO / "loadtests" / "out"

    def __post_init__(self) -> None:
        if not self.rates or min(self.rates) <= 0 or self.duration_s <= 0:
            raise ValueError("rates and duration must be > 0")
        if self.clients < 1 or self.pods < 1 or self.latency_ms < 0 or self.warmup_s < 0:
            raise ValueError("clients and pods must be >= 1, latency and warm-up >= 0")

    def spec(self, name: str, target_burst_capacity: float) -> ServiceSpec:
        """Pods fixed at `pods` (no scaling during the probe) and no container concurrency,
        so the throttler never buffers: what is measured is the path, not admission."""
        return ServiceSpec(
            name=name,
            command=[sys.executable, "-m", "examples.sample.server"],
            env={"SAMPLE_LATENCY_MS": f"{self.latency_ms:g}"},
            resources=Resources(cpu=0.1, memory_mb=64),
            container_concurrency=0,
            scaling=ScalingSpec(min_scale=self.pods, max_scale=self.pods,
                                initial_scale=self.pods,
                                target_burst_capacity=target_burst_capacity),
        ).validate()

    def config(self, state_dir: Path) -> Config:
        return Config(
            state_dir=state_dir,
            activator=ActivatorConfig(port=0),
            nodes=NodesConfig(count=1, capacity=Resources(cpu=4.0, memory_mb=8192),
                              workdir=REPO),
        )


def progress(text: str) -> None:
    print(f"[dataplane] {text}", file=sys.stderr, flush=True)


# ---- CPU from /proc ---------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads); 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    after_comm = text[text.rindex(")") + 2:].split()
    return (int(after_comm[11]) + int(after_comm[12])) / CLK_TCK


def stack_pids() -> list[tuple[str, int]]:
    """The gateway and the control plane: this process, and (one process per role) the role
    processes and the instances the coordinator runs under it. Pods are not in it."""
    found = [("this-process", os.getpid())]
    for pid in sorted(descendants(os.getpid())):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for marker in (b"controlplane.role", b"controlplane.instance"):
            if marker in args:
                rest = args[args.index(marker) + 1:]
                found.append((b"-".join(a for a in rest if a).decode(), pid))
    return found


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat's first line."""
    # user nice system idle iowait irq softirq steal; guest time is already within user.
    line = Path("/proc/stat").read_text().split("\n", 1)[0]
    values = [int(v) for v in line.split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def pod_pids(pod: str) -> list[int]:
    """Processes of this stack whose environment names the pod (the local backend sets
    FNPLANE_POD in it), a wrapper and the server alike."""
    needle = f"FNPLANE_POD={pod}".encode()
    found = []
    for pid in descendants(os.getpid()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env:
            found.append(pid)
    return found


# ---- the run ----------------------------------------------------------------------------


class Probe:
    def __init__(self, opts: ProbeOptions, stack: Stack) -> None:
        self.opts = opts
        self.stack = stack
        self.endpoints: dict[str, Endpoints] = {}
        self.changed = asyncio.Event()
        self.stack_idle = 0.0  # CPU share of the stack at rest, measured before the load

    async def _on_endpoints(self, msg: Endpoints, _raw: Msg) -> None:
        # `route` publishes per revision (`NAME-00001`); each service here has one.
        name = parent_of(msg.service) or msg.service
        old = self.endpoints.get(name)
        if old is None or msg.version > old.version:
            self.endpoints[name] = msg
            self.changed.set()

    async def run(self) -> dict[str, object]:
        assert self.stack.nats_url is not None
        bus = await Bus.connect(self.stack.nats_url, "loadtests-dataplane",
                                login=login(self.stack.config.credentials, "admin"))
        try:
            await bus.serve(ep.ENDPOINTS, self._on_endpoints)
            for name, tbc in ((PROXY_SVC, -1.0), (DIRECT_SVC, 0.0)):
                await bus.call(ep.ADMIN_DEPLOY, DeployRequest(spec=self.opts.spec(name, tbc)),
                               timeout=5.0)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                await self._wait_for_paths(http)
            self.stack_idle = await self._stack_at_rest()
            pod = self.endpoints[PROXY_SVC].endpoints[0]
            targets = [
                (dr.POD, f"{pod.url}/v2/models/{PROXY_SVC}/infer"),
                (dr.PROXY, f"{self.stack.url}/v2/models/{PROXY_SVC}/infer"),
                (dr.GATEWAY_DIRECT, f"{self.stack.url}/v2/models/{DIRECT_SVC}/infer"),
            ]
            rates: dict[str, object] = {}
            for rate in self.opts.rates:
                progress(f"{rate:g} QPS per path for {self.opts.duration_s:g}s "
                         f"(+{self.opts.warmup_s:g}s warm-up), {self.opts.clients} generators")
                rates[f"{rate:g}"] = await self._phase(rate, targets)
            return {
                "rates": rates,
                "pods": {svc: [e.pod for e in eps.endpoints]
                         for svc, eps in sorted(self.endpoints.items())},
                "targets": dict(targets),
            }
        finally:
            await bus.close()

    async def _wait_for_paths(self, http: aiohttp.ClientSession, timeout_s: float = 60.0) -> None:
        """Until both services have their pods and the gateway answers each on the path
        wanted (proxy: "activator", direct: "direct"): a request every 0.2 s also gives
        `scale` the demand samples its mode decision is made from."""
        want = {PROXY_SVC: "activator", DIRECT_SVC: "direct"}
        deadline = time.monotonic() + timeout_s
        seen: dict[str, str] = {}
        while True:
            for svc in want:
                eps = self.endpoints.get(svc)
                if eps is None or len(eps.endpoints) < self.opts.pods:
                    seen[svc] = "no pods yet"
                    continue
                try:
                    url = f"{self.stack.url}/v2/models/{svc}/infer"
                    async with http.post(url, data=BODY, headers=JSON_HEADERS) as resp:
                        await resp.read()
                        seen[svc] = f"{resp.status} {resp.headers.get('X-Fnplane-Path', '-')}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    seen[svc] = type(exc).__name__
            if all(seen.get(svc) == f"200 {path}" for svc, path in want.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"services not on their paths within {timeout_s:g}s: {seen}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 0.2)
            except TimeoutError:
                pass

    async def _stack_at_rest(self, seconds: float = 2.0) -> float:
        """The stack's CPU share (of one core) with no requests: heartbeats, scrapes and
        reports of the control plane, which the same process runs beside the gateway."""
        pids = [pid for _, pid in stack_pids()]
        before, t0 = sum(map(proc_cpu_s, pids)), time.monotonic()
        await asyncio.sleep(seconds)
        return (sum(map(proc_cpu_s, pids)) - before) / (time.monotonic() - t0)

    def _processes(self) -> list[tuple[str, str, int]]:
        procs = [("stack", name, pid) for name, pid in stack_pids()]
        for server, role in ((self.stack.nats, "nats-server"), (self.stack.redis, "redis-server")):
            if server is not None:
                procs.append((role, role, server.process.pid))
        for svc, eps in sorted(self.endpoints.items()):
            for e in eps.endpoints:
                procs.extend(("pod", f"{svc}/{e.pod}", pid) for pid in pod_pids(e.pod))
        return procs

    async def _phase(self, rate: float, targets: list[tuple[str, str]]) -> dict[str, object]:
        o = self.opts
        base = [sys.executable, "-m", "loadtests.dataplane_client", "--rate", f"{rate:g}",
                "--duration", f"{o.duration_s:g}", "--warmup", f"{o.warmup_s:g}",
                "--start-at", "0", "--of", str(o.clients)]
        for name, url in targets:
            base += ["--target", f"{name}={url}"]
        clients = [
            await asyncio.create_subprocess_exec(
                *base, "--index", str(i), cwd=REPO, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, preexec_fn=pdeathsig_preexec)
            for i in range(o.clients)
        ]
        procs = self._processes()
        try:
            # Each generator says when it is set up; then all get one start time.
            for c in clients:
                assert c.stdout is not None and c.stdin is not None
                line = await asyncio.wait_for(c.stdout.readline(), timeout=60.0)
                if line.strip() != b"ready":
                    raise RuntimeError(f"a load generator did not start: {line!r}")
            start_at = time.time() + 0.2
            for c in clients:
                assert c.stdin is not None
                c.stdin.write(f"{start_at!r}\n".encode())
                await c.stdin.drain()
            window_start = start_at + o.warmup_s
            await asyncio.sleep(max(0.0, window_start - time.time()))
            before = {pid: proc_cpu_s(pid) for _, _, pid in procs}
            busy0, total0 = machine_ticks()
            t0 = time.monotonic()
            deadline = o.warmup_s + o.duration_s + 60.0
            outs = await asyncio.wait_for(
                asyncio.gather(*(c.communicate() for c in clients)), timeout=deadline)
            wall = time.monotonic() - t0
            busy1, total1 = machine_ticks()
            after = {pid: proc_cpu_s(pid) for _, _, pid in procs}
        finally:
            for c in clients:
                if c.returncode is None:
                    c.kill()
                    await c.wait()
        if any(c.returncode != 0 for c in clients):
            raise RuntimeError(f"a load generator failed: {[c.returncode for c in clients]}")
        docs = [json.loads(out) for out, _ in outs]
        merged = dr.merge_clients(docs)
        readings = [dr.CpuReading(role, name, after[pid] - before[pid])
                    for role, name, pid in procs]
        readings += [dr.CpuReading("generator", f"client-{i}", float(d["cpu_s"]))
                     for i, d in enumerate(docs)]
        busy_s = (busy1 - busy0) / CLK_TCK if total1 > total0 else None
        paths = {name: dr.summarize_path(name, merged["paths"][name], o.duration_s)  # type: ignore[index]
                 for name, _ in targets}
        cpu = dr.cpu_summary(readings, wall, busy_s, os.cpu_count() or 1)
        cpu["stack_at_rest_percent_of_one_core"] = round(100.0 * self.stack_idle, 1)
        cpu["ms_per_request"] = dr.cpu_per_request(readings, paths,
                                                   stack_idle_s=self.stack_idle * wall)
        return {
            "rate_qps_per_path": rate,
            "paths": paths,
            "activator_added_ms": dr.added(paths, dr.PROXY),
            "gateway_direct_added_ms": dr.added(paths, dr.GATEWAY_DIRECT),
            "generator_lag": dr.lag_summary(merged["lag_ms"]),  # type: ignore[arg-type]
            "cpu": cpu,
        }


async def run_probe(opts: ProbeOptions) -> dict[str, object]:
    opts.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fnplane-dataplane-") as state:
        stack = Stack(opts.config(Path(state)), nats_port=None, roles=opts.roles,
                      gateway_workers=opts.gateway_workers)
        await stack.start()
        progress(f"stack up: gateway {stack.url} ({opts.roles})")
        try:
            result = await Probe(opts, stack).run()
        finally:
            await stack.stop()
    rates: dict[str, dict[str, object]] = result["rates"]  # type: ignore[assignment]
    out: dict[str, object] = {
        "goal": dr.goal(rates, max(opts.rates)),
        "errors": sum(int(p["errors"]) for r in rates.values()  # type: ignore[call-overload]
                      for p in r["paths"].values()),  # type: ignore[attr-defined]
        "wrong_path": sum(int(p["wrong_path"]) for r in rates.values()  # type: ignore[call-overload]
                          for p in r["paths"].values()),  # type: ignore[attr-defined]
        **result,
        "processes_left": await processes_left(),
    }
    from loadtests.plots import plot_dataplane  # after the stack: pods fork a smaller process

    out["plots"] = [str(plot_dataplane(opts.out / "dataplane.png", rates))]
    out["options"] = {f.name: _jsonable(getattr(opts, f.name)) for f in fields(opts)}
    path = opts.out / "dataplane.json"
    out["json"] = str(path)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    return list(value) if isinstance(value, tuple) else value


# ---- command line -----------------------------------------------------------------------

QUICK = {"rates": (40.0, 120.0), "duration_s": 2.0, "warmup_s": 0.5, "clients": 1}


def parse_args(argv: list[str] | None = None) -> tuple[ProbeOptions, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m loadtests.dataplane", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=lambda s: tuple(float(x) for x in s.split(",")),
                   help="QPS per path, comma-separated (default 250,1000)")
    p.add_argument("--duration", dest="duration_s", type=float,
                   help="measured seconds per rate (default 60)")
    p.add_argument("--warmup", dest="warmup_s", type=float,
                   help="unmeasured seconds before each rate (default 2)")
    p.add_argument("--latency-ms", type=float, help="model time per request (default 100)")
    p.add_argument("--clients", type=int, help="load-generator processes (default 2)")
    p.add_argument("--pods", type=int, help="pods per service (default 1)")
    p.add_argument("--roles", choices=["processes", "inline"],
                   help="processes (default: as `fnplane up` runs it) or inline")
    p.add_argument("--gateway-workers", type=int, help="gateway processes (default 1)")
    p.add_argument("--out", type=Path, help="where the JSON and PNG go (default loadtests/out)")
    p.add_argument("--quick", action="store_true",
                   help="seconds, not minutes: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--json", action="store_true", help="print only the JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="the stack's INFO logs on stderr")
    args = p.parse_args(argv)
    return from_args(ProbeOptions, args, QUICK, p), args


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run_probe(opts))
    else:
        result = uvloop.run(run_probe(opts))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "options"}, indent=2))
    return 0 if result["errors"] == 0 and result["processes_left"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
