"""Parallel cold starts (issue 11, Knative's scale-from-zero test shape): for each size N, start
the embedded stack in this process on nodes big enough for every pod, deploy N copies of the
sample model at zero pods, wake all of them at once with one request each (from a client
process of its own, `loadtests.coldstart_client`), and read each cold start stage by stage from
the activator's `ColdStart` records. Prints ONE JSON object (per size: p50/p95/max time to
first answer, the p95 of each stage; the CPU floor; the goals, met or not) and writes a PNG.

    python -m loadtests.coldstart_parallel --json            # 1, 5, 25 and 100 services
    python -m loadtests.coldstart_parallel --quick --json    # 1 and 5, for the smoke test

The CPU floor: N cold starts cannot finish sooner than N x one pod's own start CPU time
divided by the machine's cores. One sample pod is started alone before any stack runs, and its
CPU time (user + system, from /proc/<pid>/stat) until it answers ready is that cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
from nats.aio.msg import Msg

from controlplane.stack import Stack
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import ActivatorConfig, Config, NodesConfig
from kernel.identity import login
from kernel.messages import ColdStart, DeployRequest, Resources, ScalingSpec, ServiceSpec
from kernel.procs import free_port, pdeathsig_preexec
from kernel.revisions import parent_of
from loadtests import coldstart_report as report
from loadtests.burst import processes_left
from loadtests.burst_run import progress
from loadtests.dataplane import proc_cpu_s, stack_pids

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SIZES = (1, 5, 25, 100)
QUICK_SIZES = (1, 5)
FLOOR_SAMPLES = 3


@dataclass(frozen=True)
class Options:
    sizes: tuple[int, ...] = SIZES
    # Four nodes of 8 cpu, as issue 11 measured: 100 pods of 0.1 cpu fit with room to spare.
    nodes: int = 4
    node_cpu: float = 8.0
    node_memory_mb: int = 16384
    pod_cpu: float = 0.1
    pod_memory_mb: int = 64
    request_timeout_s: float = 120.0
    pod_nice: int | None = None  # None: the nodes' default (NodesConfig.pod_nice)
    # "processes": one process per role, as `fnplane up` runs it; "inline": all on this loop.
    roles: str = "processes"
    out: Path = REPO / "loadtests" / "out"

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError("sizes must be >= 1")
        fits = int(self.node_cpu / self.pod_cpu) * self.nodes
        if max(self.sizes) > fits:
            raise ValueError(f"{max(self.sizes)} pods do not fit on {self.nodes} nodes of "
                             f"{self.node_cpu:g} cpu ({fits} at most)")

    def spec(self, name: str) -> ServiceSpec:
        return ServiceSpec(
            name=name,
            command=[sys.executable, "-m", "examples.sample.server"],
            env={"SAMPLE_LATENCY_MS": "0"},
            resources=Resources(cpu=self.pod_cpu, memory_mb=self.pod_memory_mb),
            container_concurrency=1,
            startup_timeout_s=self.request_timeout_s,
            scaling=ScalingSpec(min_scale=0, initial_scale=0, max_scale=1,
                                target_concurrency=1.0),
        ).validate()

    def config(self, state_dir: Path) -> Config:
        return Config(
            state_dir=state_dir,
            activator=ActivatorConfig(port=0, request_timeout_s=self.request_timeout_s),
            nodes=NodesConfig(
                count=self.nodes,
                capacity=Resources(cpu=self.node_cpu, memory_mb=self.node_memory_mb),
                workdir=REPO,
                **({} if self.pod_nice is None else {"pod_nice": self.pod_nice}),
            ),
        )


# ---- the CPU floor --------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """utime + stime of pid (and of its waited-for children), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    f = text[text.rfind(")") + 2:].split()
    ticks = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def control_plane_cpu_s() -> float:
    """CPU seconds of this process and of the control plane's processes under it (roles and
    the instances the coordinator runs; pods excluded)."""
    return sum(proc_cpu_s(pid) for _, pid in stack_pids())


async def one_pod_start(opts: Options) -> tuple[float, float]:
    """Start one sample pod alone, probe it every 2 ms: (CPU s, wall s) until ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "PATH", "TMPDIR")}
    env.update({"PORT": str(port), "MODEL_NAME": "floor", "SAMPLE_LATENCY_MS": "0"})
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *opts.spec("floor").command, cwd=REPO, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=pdeathsig_preexec,
    )
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while time.perf_counter() - t0 < 60:
                try:
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return _cpu_s(proc.pid), time.perf_counter() - t0
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if proc.returncode is not None:
                    break
                await asyncio.sleep(0.002)
        raise RuntimeError("the sample pod did not become ready on its own within 60 s")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def cpu_floor(opts: Options) -> dict[str, float]:
    runs = [await one_pod_start(opts) for _ in range(FLOOR_SAMPLES)]
    return {
        "pod_start_cpu_ms": round(statistics.median(c for c, _ in runs) * 1000.0, 1),
        "pod_start_wall_ms": round(statistics.median(w for _, w in runs) * 1000.0, 1),
        "samples": FLOOR_SAMPLES,
    }


# ---- one case -------------------------------------------------------------------------------


async def run_case(opts: Options, n: int, pod_cpu_s: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="fnplane-coldstart-") as state:
        stack = Stack(opts.config(Path(state)), nats_port=None, roles=opts.roles)
        t0 = time.time()
        await stack.start()
        progress(f"{n} services: stack up in {time.time() - t0:.1f}s")
        try:
            answers, colds, stack_cpu_s = await _wake(opts, stack, n)
        finally:
            await stack.stop()
    case = report.summarize_case(
        n, answers, colds, nodes=opts.nodes, node_cpu=opts.node_cpu,
        node_memory_mb=opts.node_memory_mb, pod_cpu_s=pod_cpu_s, cores=os.cpu_count() or 1)
    # A cold start is recorded under the revision that started (`NAME-00001`).
    example = next((c for c in colds if (parent_of(c.service) or c.service) == _name(n, n // 2)),
                   None)
    case["example_pod_stages_ms"] = report.stages(example) if example else {}
    # The control plane's CPU while the services woke: this process (inline: all of it, on
    # one event loop) plus its role and instance processes (processes), never the pods'.
    case["roles"] = opts.roles
    case["stack_cpu_ms"] = round(stack_cpu_s * 1000.0, 1)
    case["stack_cpu_ms_per_cold_start"] = round(stack_cpu_s * 1000.0 / n, 1)
    case["cold_starts"] = colds  # for the plot; dropped from the JSON
    return case


def _name(n: int, i: int) -> str:
    return f"cold-{n}-{i:03d}"


async def _wake(opts: Options, stack: Stack, n: int) -> tuple[list[report.Answer],
                                                              list[ColdStart], float]:
    assert stack.nats_url is not None
    bus = await Bus.connect(stack.nats_url, "loadtests-coldstart",
                            login=login(stack.config.credentials, "admin"))
    colds: dict[str, ColdStart] = {}

    async def on_cold(msg: ColdStart, _raw: Msg) -> None:
        colds.setdefault(msg.service, msg)

    try:
        await bus.serve(ep.COLD_START, on_cold)
        names = [_name(n, i) for i in range(n)]
        for name in names:
            await bus.call(ep.ADMIN_DEPLOY, DeployRequest(spec=opts.spec(name)), timeout=10.0)
        await asyncio.sleep(0.5)  # let the deploys settle: this measures wake-ups only
        progress(f"{n} services deployed at zero; waking them at once")
        cpu0 = control_plane_cpu_s()
        answers = await _client(opts, stack, names)
        stack_cpu_s = control_plane_cpu_s() - cpu0
        deadline = time.monotonic() + 5.0
        while len(colds) < sum(a.status == 200 for a in answers):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        await bus.close()
    return answers, [colds[k] for k in sorted(colds)], stack_cpu_s


async def _client(opts: Options, stack: Stack, names: list[str]) -> list[report.Answer]:
    urls = [f"{stack.url}/v2/models/{name}/infer" for name in names]
    timeout = opts.request_timeout_s + 30.0  # the activator's own 503 comes first
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtests.coldstart_client", "--timeout", str(timeout), *urls,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, preexec_fn=pdeathsig_preexec,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout + 30.0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the client exited with {proc.returncode}")
    by_url = dict(zip(urls, names, strict=True))
    return [report.Answer(by_url[url], ms, status, pod, error)
            for url, _sent, ms, status, pod, error in json.loads(out)["records"]]


# ---- the whole run --------------------------------------------------------------------------


async def run(opts: Options) -> dict[str, object]:
    opts.out.mkdir(parents=True, exist_ok=True)
    floor = await cpu_floor(opts)
    progress(f"one pod alone: {floor['pod_start_cpu_ms']} ms CPU, "
             f"{floor['pod_start_wall_ms']} ms to ready")
    load_before = os.getloadavg()[0]
    cases = []
    for n in opts.sizes:
        cases.append(await run_case(opts, n, floor["pod_start_cpu_ms"] / 1000.0))
    left = await processes_left()
    from loadtests.coldstart_plot import plot_coldstarts  # matplotlib only after the stacks

    png = plot_coldstarts(opts.out / "coldstart_parallel.png", cases)
    for c in cases:
        c.pop("cold_starts")
    result: dict[str, object] = {
        "cores": os.cpu_count(),
        # Other work on the machine takes CPU from the pods and the stack alike: the floor
        # assumes every core is ours, so a high load here makes the goals unreachable.
        "load_avg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "one_pod": floor,
        "cases": cases,
        "goals": report.goals(cases),
        "processes_left": left,
        "plots": [str(png)],
        "options": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path)
                        else v) for k, v in asdict(opts).items()},
    }
    path = opts.out / "coldstart_parallel.json"
    result["json"] = str(path)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.coldstart_parallel",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: tuple(int(x) for x in s.split(",")),
                   help="services woken at once, per case (default 1,5,25,100)")
    p.add_argument("--quick", action="store_true", help="sizes 1 and 5 only")
    p.add_argument("--pod-nice", type=int, help="the pods' nice value (default: the nodes')")
    p.add_argument("--roles", choices=["processes", "inline"], default="processes",
                   help="the stack as `fnplane up` runs it (default), or all on one loop")
    p.add_argument("--out", type=Path, help="where the JSON and PNG go (default loadtests/out)")
    p.add_argument("--json", action="store_true", help="print only the JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="the stack's INFO logs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chosen: dict[str, object] = {}
    if args.quick or args.sizes:
        chosen["sizes"] = args.sizes or QUICK_SIZES
    if args.out:
        chosen["out"] = args.out.resolve()
    if args.pod_nice is not None:
        chosen["pod_nice"] = args.pod_nice
    chosen["roles"] = args.roles
    try:
        opts = Options(**chosen)  # type: ignore[arg-type]
    except ValueError as exc:
        p.error(str(exc))
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(opts))
    else:
        result = uvloop.run(run(opts))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    cases = result["cases"]
    assert isinstance(cases, list)
    all_ok = all(c["ok"] == c["requests"] == c["services"] for c in cases)
    return 0 if all_ok and result["processes_left"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
