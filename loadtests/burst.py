"""The burst experiment of issue 4: start the embedded stack in this process, deploy the sample
model at zero pods, send a burst through the activator (from a load-generator process of its
own, `loadtests.burst_client`) and print ONE JSON object (lost requests, latency percentiles,
first cold start, pods, container-concurrency violations, time to direct mode, the
activator's added latency), plus a PNG of the scale-up next to it. Every process it started
is stopped at the end; `processes_left` in the JSON says so.

    python -m loadtests.burst --json            # 1,000 requests, 200 concurrent, < 2 min
    python -m loadtests.burst --quick --json    # a smaller run, for the smoke test
    python -m loadtests.burst --split 50 --json # against a 50/50 split of two revisions

How it observes the stack, so the numbers can be trusted:
- pods (ready / starting / desired) come from the admin `describe` API over NATS, as the CLI sees
  them; the endpoint mode from `route`'s `Endpoints` of each of its revisions;
  the first cold start from the activator's `ColdStart` record on `fnplane.service.cold-start`;
- the buffer depth is read in-process from the throttlers of the service's revisions: a
  benchmark-only shortcut (the activator exports the same numbers as metrics, but only per
  metrics interval, too coarse for a burst that lasts seconds);
- container concurrency is checked on both sides: every pod's own `/stats` peak after the
  burst, and the throttler's `violations` counter (slots handed out beyond capacity);
- the activator's added latency: once pods are warm, the same request alternately through the
  activator and straight to the pod that answered it, one at a time, p50 of each.
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
from dataclasses import fields
from pathlib import Path

from controlplane.stack import Stack
from kernel.procs import alive, descendants
from loadtests.burst_run import BurstOptions, BurstRun, progress


async def run_burst(opts: BurstOptions) -> dict[str, object]:
    """Start the stack, run, stop everything; the result says how many processes outlived it."""
    opts.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fnplane-burst-") as state:
        stack = Stack(opts.config(Path(state)), nats_port=None)
        t0 = time.time()
        await stack.start()
        progress(f"stack up in {time.time() - t0:.1f}s: gateway {stack.url}, {stack.nats_url}")
        run = BurstRun(opts, stack)
        try:
            result = await run.run()
        finally:
            await stack.stop()
    result["processes_left"] = await processes_left()
    plot = run.plot(opts.out / "burst.png")
    result["plots"] = [str(plot)]
    result["options"] = {f.name: _jsonable(getattr(opts, f.name)) for f in fields(opts)}
    path = opts.out / "burst.json"
    result["json"] = str(path)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


async def processes_left(wait_s: float = 5.0) -> int:
    """Children of this process still running after the stack stopped (pods, servers)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [p for p in descendants(os.getpid()) if alive(p)]
        if not left or time.monotonic() > deadline:
            return len(left)
        await asyncio.sleep(0.1)


def _jsonable(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


# ---- command line ---------------------------------------------------------------------------

QUICK = {
    "requests": 200,
    "concurrency": 50,
    "max_scale": 4,
    "target_burst_capacity": 4.0,  # 4 pods x 4 slots: room to go direct after the burst
    "latency_pairs": 30,
    "tail_s": 0.5,
}


def parse_args(argv: list[str] | None = None) -> tuple[BurstOptions, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.burst",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--requests", type=int, help="requests in the burst (default 1000)")
    p.add_argument("--concurrency", type=int, help="requests in flight at once (default 200)")
    p.add_argument("--latency-ms", type=float, help="SAMPLE_LATENCY_MS of the pods (default 20)")
    p.add_argument("--container-concurrency", type=int, help="per pod (default 4)")
    p.add_argument("--max-scale", type=int, help="pods at most (default 10)")
    p.add_argument(
        "--target-burst-capacity",
        type=float,
        help="spare slots before the activator may leave the path (default 20)",
    )
    p.add_argument("--nodes", type=int, help="local nodes (default 2)")
    p.add_argument("--split", dest="split_percent", type=int, metavar="PCT",
                   help="deploy a second revision taking PCT%% of the traffic (kn's --traffic "
                        "@latest=PCT), both revisions from zero (default 0: one revision)")
    p.add_argument(
        "--latency-pairs",
        type=int,
        help="sequential requests per path for the added latency (default 200)",
    )
    p.add_argument("--out", type=Path, help="where the JSON and PNG go (default loadtests/out)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    p.add_argument("--json", action="store_true", help="print only the JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="the stack's INFO logs on stderr")
    args = p.parse_args(argv)
    chosen = dict(QUICK) if args.quick else {}
    for f in fields(BurstOptions):
        value = getattr(args, f.name, None)
        if value is not None:
            chosen[f.name] = value.resolve() if isinstance(value, Path) else value
    try:
        return BurstOptions(**chosen), args  # type: ignore[arg-type]
    except ValueError as exc:
        p.error(str(exc))
        raise  # unreachable: p.error exits


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run_burst(opts))
    else:
        result = uvloop.run(run_burst(opts))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key not in ("options", "pod_max_in_flight", "mode_changes"):
                print(f"{key:<28} {value}")
    good = result["lost"] == 0 and result["cc_violations"] == 0
    return 0 if good and result["processes_left"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
