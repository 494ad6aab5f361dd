"""Cold start with model storage (issue 15): a model file of `--model-mb` MB served by a local
HTTP server throttled to `--mbps` MB/s (`loadtests.model_server`), fetched by the nodes into
their model caches (partitions/modelcache/), on the local backend's real stack started in this
process. Same run, `--cycles` scale-from-zero cycles each:

- no cache: every cycle a fresh version of the model (its own cache key), fetched anew;
- cache hit: one model, cached on a node by a first (uncounted) wake; locality sends each
  cycle's pod to that node;
- prefetched: every cycle a fresh version deployed with `prefetch: 1`, woken once the node
  reports it cached;
- cycling: `--services` services with distinct models, woken one at a time in a random order
  (fixed `--seed`), on `--nodes` nodes whose caches each hold half of the models, seeded by
  prefetch (each model on half the nodes), with `schedule`'s locality score on, then off
  (`ScheduleConfig.locality`), each on a stack of its own. With locality off best fit alone
  decides: every pod goes to the same idle node, which fetches what it lacks (LRU).

A cycle is a service deployed at zero, one request, then the service deleted and its pod
waited out: the same path as a service scaling through zero, without waiting for the
scale-to-zero window. Stages come from the activator's `ColdStart` record (`describe`); a
cycle is a cache hit when the model server saw no download during its request.
Prints ONE JSON object (scenarios, goals) and writes a PNG under `--out`.

    python -m loadtests.coldstart --json                  # 300 MB at 200 MB/s, 10 cycles
    python -m loadtests.coldstart --quick --json          # a few MB, 2 cycles, 2 services
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from controlplane.stack import Stack
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import ActivatorConfig, Config, NodesConfig, ScaleConfig, ScheduleConfig
from kernel.errors import RemoteError
from kernel.identity import login
from kernel.messages import (
    ClusterStatus,
    ColdStart,
    DeployRequest,
    Empty,
    NameRequest,
    Resources,
    ScalingSpec,
    ServiceSpec,
    ServiceStatus,
)
from kernel.procs import alive, descendants
from loadtests import coldstart_cache_report as report
from loadtests.burst import processes_left
from loadtests.model_server import ModelServer, padded_model
from loadtests.options import from_args

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "examples" / "sample" / "weights.npz"
BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                    "data": [[5.1, 3.5, 1.4, 0.2]]}]}
POD_MARKER = b"examples.sample.server"


@dataclass(frozen=True)
class Options:
    model_mb: float = 300.0
    mbps: float = 200.0
    cycles: int = 10
    services: int = 8  # the cycling scenario's distinct models
    steps: int = 16  # wakes in the cycling scenario, per mode
    nodes: int = 4
    seed: int = 15
    node_cpu: float = 4.0
    node_memory_mb: int = 8192
    request_timeout_s: float = 120.0
    roles: str = "processes"
    out: Path = REPO / "loadtests" / "out"

    def __post_init__(self) -> None:
        if self.model_mb <= 0 or self.mbps <= 0:
            raise ValueError("model size and bandwidth must be > 0")
        if self.cycles < 1 or self.services < 2 or self.steps < 1 or self.nodes < 2:
            raise ValueError("cycles, steps >= 1; services, nodes >= 2")

    @property
    def model_bytes(self) -> int:
        return int(self.model_mb * 1_000_000)

    def spec(self, name: str, uri: str, prefetch: int = 0) -> ServiceSpec:
        return ServiceSpec(
            name=name,
            command=[sys.executable, "-m", "examples.sample.server"],
            env={"SAMPLE_LATENCY_MS": "0"},
            resources=Resources(cpu=0.5, memory_mb=256),
            container_concurrency=1,
            startup_timeout_s=self.request_timeout_s,
            storage_uri=uri,
            prefetch=prefetch,
            scaling=ScalingSpec(min_scale=0, initial_scale=0, max_scale=1),
        ).validate()

    def config(self, state_dir: Path, server: ModelServer, *, cache_models: int,
               locality: bool) -> Config:
        # Room for `cache_models` models, not one more (the model file is a few KB over its
        # nominal size; half a model of slack keeps it at exactly that many).
        cache = int((cache_models + 0.5) * len(server.body))
        return Config(
            state_dir=state_dir,
            activator=ActivatorConfig(port=0, request_timeout_s=self.request_timeout_s),
            scale=ScaleConfig(tick_s=0.2),
            schedule=ScheduleConfig(locality=locality),
            nodes=NodesConfig(
                count=self.nodes,
                capacity=Resources(cpu=self.node_cpu, memory_mb=self.node_memory_mb),
                workdir=REPO,
                model_hosts=(server.url.removeprefix("http://"),),
                node_cache_bytes=cache,
                model_max_bytes=len(server.body) + 1,
            ),
        )


def progress(text: str) -> None:
    print(f"[coldstart] {text}", file=sys.stderr, flush=True)


# ---- one stack, one cycle ---------------------------------------------------------------------


class Bench:
    """One running stack, its admin connection and an HTTP client: wakes services."""

    def __init__(self, opts: Options, stack: Stack, bus: Bus, http: aiohttp.ClientSession,
                 server: ModelServer) -> None:
        self.opts, self.stack, self.bus, self.http = opts, stack, bus, http
        self.server = server

    async def holders(self, uri: str) -> set[str]:
        status: ClusterStatus = await self.bus.call(ep.ADMIN_STATUS, Empty(), timeout=5)
        return {n.name for n in status.partitions.nodes.values() if uri in n.models}

    async def wait_cached(self, uri: str, count: int, timeout: float) -> set[str]:
        deadline = time.monotonic() + timeout
        while len(held := await self.holders(uri)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{uri} not cached on {count} nodes within {timeout:g}s "
                                   f"(on {sorted(held)})")
            await asyncio.sleep(0.05)
        return held

    async def deploy(self, name: str, uri: str, prefetch: int = 0) -> None:
        await self.bus.call(ep.ADMIN_DEPLOY,
                            DeployRequest(spec=self.opts.spec(name, uri, prefetch)), timeout=10)
        if prefetch:
            await self.wait_cached(uri, prefetch, self.opts.request_timeout_s)

    async def wake(self, name: str, uri: str, *, prefetch: int = 0) -> report.Wake:
        """Deploy at zero (prefetched first if asked), one request, the cold start record,
        then delete the service and wait until its pod has ended."""
        await self.deploy(name, uri, prefetch)
        gets = self.server.gets
        t0 = time.perf_counter()
        try:
            async with self.http.post(f"{self.stack.url}/v2/models/{name}/infer",
                                      json=BODY) as r:
                await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s: %s", name, exc)
            status = 0
        latency_ms = (time.perf_counter() - t0) * 1000.0
        cold = await self._cold_start(name) if status == 200 else None
        # One wake at a time: the model server saw no GET for it, so the node had it.
        hit = cold is not None and self.server.gets == gets
        await self.bus.call(ep.ADMIN_DELETE, NameRequest(name=name), timeout=10)
        await self._pods_gone()
        return report.Wake(name, uri, status, round(latency_ms, 1), hit, cold)

    async def _cold_start(self, name: str) -> ColdStart | None:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            st: ServiceStatus = await self.bus.call(ep.ADMIN_DESCRIBE, NameRequest(name=name),
                                                    timeout=5)
            if st.last_cold_start is not None:
                return st.last_cold_start
            await asyncio.sleep(0.05)
        return None

    async def _pods_gone(self, timeout: float = 20.0) -> None:
        """No sample pod left running, so the next cycle starts on idle nodes and no pod
        holds a model the next fetch might need to evict."""
        deadline = time.monotonic() + timeout
        while _pods_running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"pods still running {timeout:g}s after their delete")
            await asyncio.sleep(0.05)


def _pods_running() -> int:
    n = 0
    for pid in descendants(os.getpid()):
        try:
            if alive(pid) and POD_MARKER in Path(f"/proc/{pid}/cmdline").read_bytes():
                n += 1
        except OSError:
            continue
    return n


async def with_stack(opts: Options, server: ModelServer, *, cache_models: int,
                     locality: bool, body):  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory(prefix="fnplane-coldcache-") as state:
        cfg = opts.config(Path(state), server, cache_models=cache_models, locality=locality)
        stack = Stack(cfg, nats_port=None, roles=opts.roles)
        await stack.start()
        try:
            assert stack.nats_url is not None
            bus = await Bus.connect(stack.nats_url, "loadtests-coldcache",
                                    login=login(stack.config.credentials, "admin"))
            timeout = aiohttp.ClientTimeout(total=opts.request_timeout_s + 30.0)
            try:
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    return await body(Bench(opts, stack, bus, http, server))
            finally:
                await bus.close()
        finally:
            await stack.stop()


# ---- the scenarios ----------------------------------------------------------------------------


async def single_model(bench: Bench, server: ModelServer) -> dict[str, list[report.Wake]]:
    """No cache, cache hit, prefetched: one stack, locality on."""
    n = bench.opts.cycles
    out: dict[str, list[report.Wake]] = {"no_cache": [], "cache_hit": [], "prefetched": []}
    for i in range(n):
        out["no_cache"].append(await bench.wake(f"nc-{i}", server.uri(f"nc{i}")))
    progress(f"no cache: {n} cycles")
    await bench.wake("hit-warm", server.uri("hit"))  # fills one node's cache; not counted
    for i in range(n):
        out["cache_hit"].append(await bench.wake(f"hit-{i}", server.uri("hit")))
    progress(f"cache hit: {n} cycles")
    for i in range(n):
        out["prefetched"].append(await bench.wake(f"pf-{i}", server.uri(f"pf{i}"), prefetch=1))
    progress(f"prefetched: {n} cycles")
    return out


def cycling_order(opts: Options) -> list[int]:
    """The services woken, in order: the same for locality on and off; each about as often
    (shuffled rounds of every service), so no model is left out of a short run."""
    rng = random.Random(opts.seed)
    rounds = [list(range(opts.services)) for _ in range(math.ceil(opts.steps / opts.services))]
    for r in rounds:
        rng.shuffle(r)
    return [k for r in rounds for k in r][: opts.steps]


async def cycling(bench: Bench, server: ModelServer, tag: str) -> list[report.Wake]:
    opts = bench.opts
    models = [server.uri(f"cyc{k}") for k in range(opts.services)]
    # Each model on half the nodes: prefetch picks the nodes caching least, so waiting for
    # each before the next spreads them evenly (the caches then hold every model once over).
    per_model = max(1, opts.nodes // 2)
    for k, uri in enumerate(models):
        await bench.deploy(f"svc-{k}", uri, prefetch=per_model)
    progress(f"cycling ({tag}): {opts.services} models seeded on {per_model} nodes each")
    wakes = [await bench.wake(f"svc-{k}-{j}", models[k])
             for j, k in enumerate(cycling_order(opts))]
    progress(f"cycling ({tag}): {len(wakes)} wakes")
    return wakes


async def run(opts: Options) -> dict[str, object]:
    opts.out.mkdir(parents=True, exist_ok=True)
    server = ModelServer(padded_model(WEIGHTS, opts.model_bytes), mbps=opts.mbps)
    await server.start()
    load_before = os.getloadavg()[0]
    try:
        wakes = await with_stack(opts, server, cache_models=3, locality=True,
                                 body=lambda b: single_model(b, server))
        half = math.ceil(opts.services / 2)
        for locality in (True, False):
            tag = "on" if locality else "off"
            wakes[f"cycling_locality_{tag}"] = await with_stack(
                opts, server, cache_models=half, locality=locality,
                body=lambda b, t=tag: cycling(b, server, t))
    finally:
        await server.stop()
    left = await processes_left()
    scenarios = {k: report.summarize(v) for k, v in wakes.items()}
    from loadtests.coldstart_cache_plot import plot_cache  # matplotlib only after the stacks

    png = plot_cache(opts.out / "coldstart_cache.png", scenarios,
                     f"{opts.model_mb:g} MB model at {opts.mbps:g} MB/s, {opts.cycles} cycles; "
                     f"{opts.services} models cycling on {opts.nodes} nodes, seed {opts.seed}")
    result: dict[str, object] = {
        "model_bytes": len(server.body),
        "mbps": opts.mbps,
        "transfer_ms": round(len(server.body) / (opts.mbps * 1000.0), 1),
        "http_gets": server.gets,
        "cycling_order": cycling_order(opts),
        "load_avg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "scenarios": scenarios,
        "goals": report.goals(scenarios),
        "processes_left": left,
        "plots": [str(png)],
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
    }
    path = opts.out / "coldstart_cache.json"
    result["json"] = str(path)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


QUICK = {"model_mb": 4.0, "cycles": 2, "services": 2, "steps": 4}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.coldstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-mb", type=float, help="model size in MB (default 300)")
    p.add_argument("--mbps", type=float, help="the model server's bandwidth (default 200)")
    p.add_argument("--cycles", type=int, help="scale-from-zero cycles per scenario (10)")
    p.add_argument("--services", type=int, help="models in the cycling scenario (8)")
    p.add_argument("--steps", type=int, help="wakes in the cycling scenario, per mode (16)")
    p.add_argument("--seed", type=int, help="the cycling order's seed (15)")
    p.add_argument("--quick", action="store_true",
                   help="smoke size: 4 MB, 2 cycles, 2 services cycling, 4 wakes")
    p.add_argument("--roles", choices=["processes", "inline"], default="processes",
                   help="the stack as `fnplane up` runs it (default), or all on one loop")
    p.add_argument("--out", type=Path, help="where the JSON and PNG go (default loadtests/out)")
    p.add_argument("--json", action="store_true", help="print only the JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="the stack's INFO logs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = from_args(Options, args, QUICK, p)
    try:
        result = asyncio.run(run(opts))
    except RemoteError as exc:
        print(f"coldstart: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    scenarios = result["scenarios"]
    assert isinstance(scenarios, dict)
    all_ok = all(s["ok"] == s["cycles"] == s["cold_start_records"] for s in scenarios.values())
    return 0 if all_ok and result["processes_left"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
