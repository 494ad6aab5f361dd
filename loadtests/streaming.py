"""Streaming from zero (issue 19): start the embedded stack in this process, deploy the token
pod (examples/tokens/) at zero pods, open `--streams` streamed chat completions at once
through the gateway's OpenAI route (from a load-generator process of its own,
`loadtests.streaming_client`), and print ONE JSON object: streams lost, time to first token
p50/p99, tokens per second, pods, container-concurrency violations, and the activator's added
time to first token versus straight to the pod, measured in the same run once pods are warm.

    python -m loadtests.streaming --json            # 200 streams of 100 tokens, all at once
    python -m loadtests.streaming --quick --json    # a smaller run, for the smoke test

How it observes: a stream is lost unless it got every token and the pod's `[DONE]`; pods and
violations are read in-process from `stack.activator.services[...].throttler` (a benchmark
shortcut: the metrics say the same, per interval); the added time to first token alternates
one stream through the gateway and one to the pod that serves them, `--pairs` of each, one
at a time, p50 of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from controlplane.stack import Stack
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import ActivatorConfig, Config, NodesConfig
from kernel.identity import login
from kernel.messages import DeployRequest, Resources, ScalingSpec, ServiceSpec
from kernel.revisions import revision_name
from loadtests.burst import processes_left
from loadtests.options import from_args
from loadtests.report import percentile, rounded

REPO = Path(__file__).resolve().parent.parent
SERVICE = "tokens"
# Its first revision's pods serve it (kernel/revisions.py); the throttler is per revision.
REVISION = revision_name(SERVICE, 1)


@dataclass(frozen=True)
class Options:
    streams: int = 200
    concurrency: int = 200
    tokens: int = 100
    token_delay_ms: float = 10.0
    container_concurrency: int = 50
    max_scale: int = 4
    pairs: int = 50
    nodes: int = 2
    out: Path = REPO / "loadtests" / "out"

    def spec(self) -> ServiceSpec:
        cc = self.container_concurrency
        return ServiceSpec(
            name=SERVICE, command=[sys.executable, "-m", "examples.tokens.server"],
            env={"TOKEN_DELAY_MS": f"{self.token_delay_ms:g}"},
            resources=Resources(cpu=0.1, memory_mb=64), container_concurrency=cc,
            scaling=ScalingSpec(min_scale=0, max_scale=self.max_scale,
                                target_concurrency=float(cc) if cc else 100.0),
        ).validate()

    def config(self, state_dir: Path) -> Config:
        return Config(state_dir=state_dir,
                      activator=ActivatorConfig(port=0, buffer_size=max(1000, 2 * self.streams)),
                      nodes=NodesConfig(count=self.nodes, capacity=Resources(cpu=4.0,
                                                                             memory_mb=8192),
                                        workdir=REPO))


PAIR_TOKENS = 3
QUICK = {"streams": 20, "concurrency": 20, "tokens": 20, "pairs": 10}


def progress(text: str) -> None:
    print(f"[streaming] {text}", file=sys.stderr, flush=True)


async def client(urls: list[str], opts: Options, *, streams: int, tokens: int,
                 sequential: bool = False) -> list[list]:
    """The load generator's records (loadtests/streaming_client.py), run as its own process."""
    cmd = [sys.executable, "-m", "loadtests.streaming_client", "--model", SERVICE,
           "--streams", str(streams), "--concurrency", str(opts.concurrency),
           "--tokens", str(tokens)]
    for url in urls:
        cmd += ["--url", url]
    if sequential:
        cmd.append("--sequential")
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=REPO, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator exited {proc.returncode}")
    return json.loads(out)["records"]


async def run(opts: Options) -> dict[str, object]:
    opts.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fnplane-streaming-") as state:
        stack = Stack(opts.config(Path(state)), nats_port=None)
        await stack.start()
        try:
            return await measure(stack, opts)
        finally:
            await stack.stop()


async def measure(stack: Stack, opts: Options) -> dict[str, object]:
    creds = stack.config.credentials
    bus = await Bus.connect(stack.nats_url, "loadtests-streaming",
                            login=login(creds, "admin") if creds else None)
    try:
        await bus.call(ep.ADMIN_DEPLOY, DeployRequest(spec=opts.spec()), timeout=10)
    finally:
        await bus.close()
    gateway = f"{stack.url}/openai/v1/chat/completions"
    assert stack.activator is not None
    max_pods = 0

    async def sample() -> None:
        nonlocal max_pods
        while True:
            svc = stack.activator.services.get(REVISION) if stack.activator else None
            if svc is not None:
                max_pods = max(max_pods, svc.throttler.ready_pods())
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    progress(f"{opts.streams} streams of {opts.tokens} tokens from zero")
    t0 = time.time()
    records = await client([gateway], opts, streams=opts.streams, tokens=opts.tokens)
    wall = time.time() - t0
    ok = [r for r in records if r[6] and r[4] == opts.tokens]
    ttft = [r[2] for r in ok if r[2] is not None]
    tokens = sum(r[4] for r in records)
    sampler.cancel()
    svc = stack.activator.services[REVISION]
    # Warm: one stream at a time, alternately through the gateway and to the pod itself.
    pod = min(svc.throttler.pods.values(), key=lambda s: s.pod).url
    progress(f"added time to first token: {opts.pairs} pairs, gateway vs {pod}")
    # A few tokens each: only the first one's time counts here.
    pairs = await client([gateway, pod + "/v1/chat/completions"], opts, streams=2 * opts.pairs,
                         tokens=PAIR_TOKENS, sequential=True)
    via = [r[2] for r in pairs if r[0] == 0 and r[2] is not None]
    direct = [r[2] for r in pairs if r[0] == 1 and r[2] is not None]
    via_p50, direct_p50 = percentile(via, 50), percentile(direct, 50)
    errors: dict[str, int] = {}
    for r in records:
        if not (r[6] and r[4] == opts.tokens):
            key = str(r[5]) if r[5] else (r[7] or "incomplete")
            errors[key] = errors.get(key, 0) + 1
    return {
        "streams": len(records),
        "tokens_per_stream": opts.tokens,
        "ok": len(ok),
        "lost": len(records) - len(ok),
        "errors": errors,
        "ttft_p50_ms": rounded(percentile(ttft, 50)),
        "ttft_p99_ms": rounded(percentile(ttft, 99)),
        "ttft_max_ms": rounded(max(ttft, default=None)),
        "tokens_per_s": round(tokens / wall, 1),
        "wall_s": round(wall, 2),
        "max_pods": max_pods,
        "cc_violations": svc.throttler.violations,
        "gateway_ttft_p50_ms": rounded(via_p50, 2),
        "direct_ttft_p50_ms": rounded(direct_p50, 2),
        "activator_added_ttft_ms": (rounded(via_p50 - direct_p50, 2)
                                    if via_p50 is not None and direct_p50 is not None
                                    else None),
    }


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m loadtests.streaming", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, help="streams at once (default 200)")
    p.add_argument("--concurrency", type=int, help="streams in flight at most (default 200)")
    p.add_argument("--tokens", type=int, help="tokens per stream (default 100)")
    p.add_argument("--token-delay-ms", type=float, help="the pod's pace (default 10)")
    p.add_argument("--container-concurrency", type=int, help="per pod (default 50)")
    p.add_argument("--max-scale", type=int, help="pods at most (default 4)")
    p.add_argument("--pairs", type=int, help="warm streams per path, added TTFT (default 50)")
    p.add_argument("--out", type=Path, help="where the JSON goes (default loadtests/out)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--json", action="store_true", help="print only the JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="the stack's INFO logs")
    args = p.parse_args(argv)
    return from_args(Options, args, QUICK, p), args


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = asyncio.run(run(opts))
    result["processes_left"] = asyncio.run(processes_left())
    result["options"] = {k: str(v) if isinstance(v, Path) else v
                         for k, v in asdict(opts).items()}
    path = opts.out / "streaming.json"
    result["json"] = str(path)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<26} {value}")
    good = result["lost"] == 0 and result["cc_violations"] == 0
    return 0 if good and result["processes_left"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
