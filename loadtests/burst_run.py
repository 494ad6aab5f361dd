"""One run of the burst experiment (`loadtests.burst`) against a started embedded stack: its
options, its observers (describe samples, throttler samples, endpoint modes, cold starts, event
loop lag), the burst itself (in a separate process, `loadtests.burst_client`), each pod's
`/stats`, and the activator's added latency. Summaries are `loadtests.report`'s business."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import msgspec
from nats.aio.msg import Msg

from controlplane.stack import Stack
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import ActivatorConfig, Config, NodesConfig
from kernel.errors import RemoteError
from kernel.identity import login
from kernel.messages import (
    ColdStart,
    DeployRequest,
    Endpoints,
    NameRequest,
    Resources,
    ScalingSpec,
    ServiceSpec,
    ServiceStatus,
    TrafficTarget,
)
from kernel.procs import pdeathsig_preexec
from kernel.revisions import parent_of
from loadtests import report
from loadtests.burst_client import BODY, JSON_HEADERS
from loadtests.report import BufferSample, ModeChange, PodSample, PodStats, RequestRecord

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SERVICE = "sample"
INFER_PATH = f"/v2/models/{SERVICE}/infer"
WARMUP_PAIRS = 10


@dataclass(frozen=True)
class BurstOptions:
    requests: int = 1000
    concurrency: int = 200
    latency_ms: float = 20.0  # SAMPLE_LATENCY_MS of the pods
    container_concurrency: int = 4
    max_scale: int = 10
    # Knative's knob for when the activator may leave the path; its default (211) exceeds
    # what 10 pods x 4 slots can ever spare, which would pin the service to proxy mode.
    target_burst_capacity: float = 20.0
    nodes: int = 2
    pod_cpu: float = 0.1  # small, so max-scale pods fit on the local nodes
    latency_pairs: int = 200  # sequential requests per path for the added-latency p50
    sample_interval_s: float = 0.1
    tail_s: float = 1.0  # keep sampling this long after the last answer
    request_timeout_s: float = 60.0  # how long the activator buffers a request
    # A second revision takes this share of the traffic (0: one revision). Both revisions
    # then start at zero (initial scale 0), each scaled by its own KPA up to max-scale.
    split_percent: int = 0
    out: Path = REPO / "loadtests" / "out"

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1 or self.latency_pairs < 1:
            raise ValueError("--requests, --concurrency and latency pairs must be >= 1")
        if self.max_scale < 1 or self.nodes < 1 or self.container_concurrency < 0:
            raise ValueError("--max-scale and nodes must be >= 1, container concurrency >= 0")
        if self.latency_ms < 0 or self.pod_cpu <= 0 or self.request_timeout_s <= 0:
            raise ValueError("latency must be >= 0, pod cpu and request timeout > 0")
        if not 0 <= self.split_percent < 100:
            raise ValueError("--split must be between 0 and 99 (percent to the second revision)")

    def spec(self) -> ServiceSpec:
        cc = self.container_concurrency
        return ServiceSpec(
            name=SERVICE,
            command=[sys.executable, "-m", "examples.sample.server"],
            env={"SAMPLE_LATENCY_MS": f"{self.latency_ms:g}"},
            resources=Resources(cpu=self.pod_cpu, memory_mb=64),
            container_concurrency=cc,
            scaling=ScalingSpec(
                min_scale=0,
                max_scale=self.max_scale,
                target_concurrency=float(cc) if cc else 100.0,
                target_burst_capacity=self.target_burst_capacity,
                initial_scale=0 if self.split_percent else 1,
            ),
        ).validate()

    def deploys(self) -> list[DeployRequest]:
        """One deploy, or with a split two: the second a new revision (its env differs)
        taking `split_percent` of the traffic, the first the rest."""
        first = self.spec()
        if not self.split_percent:
            return [DeployRequest(spec=first)]
        second = msgspec.structs.replace(first, env={**first.env, "BURST_REVISION": "2"})
        return [DeployRequest(spec=first), DeployRequest(spec=second, traffic=[
            TrafficTarget(revision="@latest", percent=self.split_percent),
            TrafficTarget(revision="1", percent=100 - self.split_percent)])]

    def config(self, state_dir: Path) -> Config:
        """`fnplane up`'s defaults, on free ports, with nodes big enough for max-scale pods."""
        per_node = math.ceil(self.max_scale * (2 if self.split_percent else 1) / self.nodes)
        return Config(
            state_dir=state_dir,
            activator=ActivatorConfig(
                port=0,
                request_timeout_s=self.request_timeout_s,
                buffer_size=max(1000, 2 * self.concurrency),
            ),
            nodes=NodesConfig(
                count=self.nodes,
                capacity=Resources(cpu=max(4.0, 2 * per_node * self.pod_cpu), memory_mb=8192),
                workdir=REPO,
            ),
        )


class BurstRun:
    """One run against a started stack; owns its NATS connection and sampling tasks."""

    def __init__(self, opts: BurstOptions, stack: Stack) -> None:
        self.opts = opts
        self.stack = stack
        self.bus: Bus | None = None
        self.t0 = 0.0  # wall clock of the burst's first request
        self.records: list[RequestRecord] = []  # times since t0
        # Sampled on the wall clock while the burst runs; since t0 once it is known.
        self.pods: list[PodSample] = []
        self.buffer: list[BufferSample] = []
        self.max_loop_lag_s = 0.0
        self._modes: list[tuple[float, str, int]] = []  # wall clock, mode, endpoints
        self.pod_urls: dict[str, str] = {}
        self.cold_starts: list[ColdStart] = []
        # Filled by the summary, for the plot: mode changes and the first cold answer, both
        # in seconds since the burst started.
        self.modes: list[ModeChange] = []
        self.cold_at: float | None = None
        # What the activator buffers and `route` publishes for: the service's revisions.
        self.targets: list[str] = [SERVICE]
        self._latest: dict[str, tuple[str, int]] = {}  # target → (mode, endpoints)
        self._versions: dict[str, tuple[int, int]] = {}

    def _ours(self, service: str) -> bool:
        return service == SERVICE or parent_of(service) == SERVICE

    # ---- observers ------------------------------------------------------------------------

    async def _on_endpoints(self, msg: Endpoints, _raw: Msg) -> None:
        if not self._ours(msg.service):
            return
        if msg.order <= self._versions.get(msg.service, (-1, -1)):
            return  # a snapshot racing a newer update
        self._versions[msg.service] = msg.order
        for e in msg.endpoints:
            self.pod_urls[e.pod] = e.url
        # The service's mode: direct once every revision with pods is; its endpoints, all.
        self._latest[msg.service] = (msg.mode, len(msg.endpoints))
        serving = [m for m, n in self._latest.values() if n]
        mode = "direct" if serving and all(m == "direct" for m in serving) else "proxy"
        count = sum(n for _, n in self._latest.values())
        last = self._modes[-1] if self._modes else None
        if last is None or (last[1], last[2]) != (mode, count):
            self._modes.append((time.time(), mode, count))

    async def _on_cold_start(self, msg: ColdStart, _raw: Msg) -> None:
        if self._ours(msg.service):
            self.cold_starts.append(msg)

    async def _describe(self) -> ServiceStatus | None:
        assert self.bus is not None
        try:
            st: ServiceStatus = await self.bus.call(
                ep.ADMIN_DESCRIBE, NameRequest(name=SERVICE), timeout=2.0
            )
        except RemoteError as exc:
            log.debug("describe failed: %s", exc)
            return None
        return st

    async def _sample_pods(self) -> None:
        interval = self.opts.sample_interval_s
        while True:
            tick = time.time()
            st = await self._describe()
            # The registry answers with no pods when `scale` did not answer it in time; with
            # ready endpoints published by `route`, such an answer is a gap, not zero pods.
            routed = self._modes[-1][2] if self._modes else 0
            if st is not None and (st.pods or st.desired_pods or not routed):
                states = Counter(p.state for p in st.pods)
                self.pods.append(
                    PodSample(tick, states["ready"], states["starting"], st.desired_pods)
                )
                for p in st.pods:
                    if p.state == "ready" and p.url:
                        self.pod_urls.setdefault(p.pod, p.url)
            await asyncio.sleep(max(0.0, interval - (time.time() - tick)))

    async def _sample_buffer(self) -> None:
        assert self.stack.activator is not None
        services = self.stack.activator.services
        while True:
            thrs = [svc.throttler for t in self.targets if (svc := services.get(t)) is not None]
            if thrs:
                self.buffer.append(BufferSample(time.time(), sum(t.buffered for t in thrs),
                                                sum(t.in_flight for t in thrs)))
            await asyncio.sleep(self.opts.sample_interval_s)

    async def _sample_loop_lag(self, interval: float = 0.02) -> None:
        """How late the stack's event loop wakes up: every component of the embedded stack
        shares it, so a stall here delays heartbeats, placements and proxying alike."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            self.max_loop_lag_s = max(self.max_loop_lag_s, loop.time() - before - interval)

    # ---- the run --------------------------------------------------------------------------

    async def run(self) -> dict[str, object]:
        assert self.stack.nats_url is not None
        self.bus = bus = await Bus.connect(self.stack.nats_url, "loadtests-burst",
                                           login=login(self.stack.config.credentials, "admin"))
        samplers: list[asyncio.Task[None]] = []
        try:
            await bus.serve(ep.ENDPOINTS, self._on_endpoints)
            await bus.serve(ep.COLD_START, self._on_cold_start)
            for deploy in self.opts.deploys():
                st = await bus.call(ep.ADMIN_DEPLOY, deploy, timeout=5.0)
                assert isinstance(st, ServiceStatus), st
            self.targets = list(st.spec.revisions) or [SERVICE]
            split = ", ".join(f"{t.revision} {t.percent}%" for t in st.spec.traffic if t.percent)
            progress(
                f"deployed {SERVICE!r} at zero pods ({split}); burst of {self.opts.requests} "
                f"requests, {self.opts.concurrency} concurrent"
            )
            samplers = [
                asyncio.create_task(self._sample_pods(), name="burst-sample-pods"),
                asyncio.create_task(self._sample_buffer(), name="burst-sample-buffer"),
                asyncio.create_task(self._sample_loop_lag(), name="burst-sample-lag"),
            ]
            self.records = await self._burst()
            duration = max((r.sent_at + r.latency_ms / 1000.0 for r in self.records), default=0)
            progress(f"burst answered in {duration:.1f}s; sampling the tail")
            await asyncio.sleep(self.opts.tail_s)
            await stop_tasks(samplers)
            if not self.cold_starts:  # its record raced our subscription: ask the registry
                st = await self._describe()
                if st is not None and st.last_cold_start is not None:
                    self.cold_starts.append(st.last_cold_start)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                pod_stats, unreadable = await self._pod_stats(http)
                added = await self._added_latency(http)
            summary = self._summary(duration, pod_stats, unreadable)
            summary.update(added)
            return summary
        finally:
            await stop_tasks(samplers)
            await bus.close()

    async def _burst(self) -> list[RequestRecord]:
        """Run the load generator in its own process (see loadtests/burst_client.py for
        why) and take its records; `t0` becomes the wall clock of its first send."""
        o = self.opts
        client_timeout = o.request_timeout_s + 30.0  # the activator's 503 comes first
        cmd = [
            sys.executable,
            "-m",
            "loadtests.burst_client",
            "--url",
            self.stack.url + INFER_PATH,
            "--requests",
            str(o.requests),
            "--concurrency",
            str(o.concurrency),
            "--timeout",
            str(client_timeout),
        ]
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=REPO, stdout=asyncio.subprocess.PIPE, preexec_fn=pdeathsig_preexec
        )
        try:
            # Bounded: every request ends within client_timeout, a few waves of them at most.
            deadline = client_timeout * math.ceil(o.requests / o.concurrency) + 30.0
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=deadline)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"the load generator exited with {proc.returncode}")
        doc = json.loads(out)
        self.t0 = float(doc["started"])
        return [
            RequestRecord(sent - self.t0, ms, status, pod, error)
            for sent, ms, status, pod, error in doc["records"]
        ]

    async def _pod_stats(self, http: aiohttp.ClientSession) -> tuple[list[PodStats], int]:
        """Each pod's own peak of requests in flight; a pod gone by now cannot be read."""

        async def read(pod: str, url: str) -> PodStats | None:
            try:
                async with http.get(f"{url}/stats", timeout=aiohttp.ClientTimeout(total=3)) as r:
                    body = await r.json()
                return PodStats(pod, int(body["max_in_flight"]), int(body["total"]))
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                log.warning("no /stats from %s at %s: %s", pod, url, exc)
                return None

        got = await asyncio.gather(*(read(p, u) for p, u in sorted(self.pod_urls.items())))
        stats = [s for s in got if s is not None]
        return stats, len(got) - len(stats)

    async def _added_latency(self, http: aiohttp.ClientSession) -> dict[str, object]:
        """Pairs of sequential requests, warm pods: through the activator, then straight to
        the pod that answered it, so both paths see the same pod and the same load."""
        proxy_ms: list[float] = []
        direct_ms: list[float] = []
        failed = 0
        via = self.stack.url + INFER_PATH
        for i in range(WARMUP_PAIRS + self.opts.latency_pairs):
            status, pod, through = await timed_post(http, via)
            url = self.pod_urls.get(pod)
            if status != 200 or url is None:
                failed += 1
                continue
            d_status, _, direct = await timed_post(http, url + INFER_PATH)
            if d_status != 200:
                failed += 1
                continue
            if i >= WARMUP_PAIRS:
                proxy_ms.append(through)
                direct_ms.append(direct)
        p_proxy = report.percentile(proxy_ms, 50)
        p_direct = report.percentile(direct_ms, 50)
        added = None if p_proxy is None or p_direct is None else p_proxy - p_direct
        return {
            "proxy_p50_ms": report.rounded(p_proxy, 2),
            "direct_p50_ms": report.rounded(p_direct, 2),
            "activator_added_p50_ms": report.rounded(added, 2),
            "latency_pairs": len(proxy_ms),
            "latency_pairs_failed": failed,
        }

    def _summary(
        self, duration: float, pod_stats: list[PodStats], unreadable: int
    ) -> dict[str, object]:
        assert self.stack.activator is not None
        services = self.stack.activator.services
        thrs = [svc.throttler for t in self.targets if (svc := services.get(t)) is not None]
        self.pods = [replace(p, t=p.t - self.t0) for p in self.pods]
        self.buffer = [replace(b, t=b.t - self.t0) for b in self.buffer]
        self.modes = modes = [ModeChange(t - self.t0, m, n) for t, m, n in self._modes]
        out = report.summarize(
            self.records,
            duration_s=duration,
            pods=self.pods,
            buffer=self.buffer,
            modes=modes,
            pod_stats=pod_stats,
            container_concurrency=self.opts.container_concurrency,
            throttler_violations=sum(t.violations for t in thrs),
        )
        # Which revision answered (a pod's name begins with its revision's).
        out["by_revision"] = dict(sorted(Counter(
            next((t for t in self.targets if r.pod.startswith(t + "-")), "?")
            for r in self.records if r.pod).items()))
        first = self.cold_starts[0] if self.cold_starts else None
        stages = first.stages_ms() if first else {}
        out["first_cold_start_ms"] = stages.get("total")
        out["first_cold_start_stages_ms"] = stages
        out["pods_unreadable"] = unreadable
        out["max_loop_lag_ms"] = round(self.max_loop_lag_s * 1000.0, 1)
        out["mode_changes"] = [[round(m.t, 2), m.mode, m.endpoints] for m in modes]
        self.cold_at = first.first_byte_out - self.t0 if first else None
        return out

    def plot(self, path: Path) -> Path:
        # matplotlib only now, after the stack stopped: every pod spawn forks this process
        # while the stack's event loop waits, and a smaller process forks faster.
        from loadtests.plots import plot_burst

        o = self.opts
        title = (
            f"fnplane burst: {o.requests} requests, {o.concurrency} concurrent, "
            f"{o.latency_ms:g} ms model time, container concurrency {o.container_concurrency}, "
            f"max scale {o.max_scale}"
        )
        return plot_burst(
            path,
            self.records,
            self.pods,
            self.buffer,
            self.modes,
            title=title,
            cold_start_s=self.cold_at,
        )


async def timed_post(http: aiohttp.ClientSession, url: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        async with http.post(url, data=BODY, headers=JSON_HEADERS) as resp:
            await resp.read()
            status, pod = resp.status, resp.headers.get("X-Fnplane-Pod", "")
    except (aiohttp.ClientError, TimeoutError):
        status, pod = 0, ""
    return status, pod, (time.perf_counter() - start) * 1000.0


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def progress(text: str) -> None:
    print(f"[burst] {text}", file=sys.stderr, flush=True)
