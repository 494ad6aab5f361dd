"""Run one scheduler as its own OS process, so each uses its own core:
`python -m functions.schedule --nats URL [--kind partitioned|central|sampling] [--id ID]`.

`partitioned` is the real `schedule` instance; `central` and `sampling` are the benchmark's
baselines. Wiring only. Prints READY_LINE once it can take placements; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from kernel.config import ScheduleConfig

READY_LINE = "fnplane-schedule ready"
KINDS = ("partitioned", "central", "sampling")


def build(args: argparse.Namespace) -> Any:
    if args.kind == "partitioned":
        from functions.schedule.instance import ScheduleInstance

        return ScheduleInstance(args.nats, ScheduleConfig(), instance_id=args.id)
    from functions.schedule.baselines import CentralScheduler, SamplingScheduler

    if args.kind == "central":
        return CentralScheduler(args.nats, instance_id=args.id)
    return SamplingScheduler(
        args.nats, instance_id=args.id, d=args.d, max_tries=args.max_tries, seed=args.seed
    )


async def run(args: argparse.Namespace) -> int:
    component = build(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await component.start()
    try:
        wait_ready = getattr(component, "wait_ready", None)
        if wait_ready is not None:
            await wait_ready(timeout=args.ready_timeout)
        # A partitioned instance is ready when the coordinator gives it a partition: its
        # heartbeats say so, and that is what callers watch.
        print(f"{READY_LINE} {args.kind} {component.id}", flush=True)
        await stop.wait()
    finally:
        await component.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m functions.schedule")
    p.add_argument("--nats", required=True)
    p.add_argument("--kind", choices=KINDS, default="partitioned")
    p.add_argument("--id", default="")
    p.add_argument("--d", type=int, default=2, help="sampling: nodes probed per try")
    p.add_argument("--max-tries", type=int, default=4, help="sampling: tries per placement")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"%(asctime)s {args.kind} %(levelname)s %(message)s",
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(args))
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
