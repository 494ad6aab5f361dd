"""Run one control-function instance as its own process:
`python -m controlplane.instance schedule --nats URL [--redis URL] [--id ID]`.
The same entry point serves the process runtime here and the container image on Kubernetes.
Wiring only; SIGTERM stops the instance cleanly."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from kernel.config import Config, ScaleConfig, ScheduleConfig


def build(kind: str, args: argparse.Namespace):
    if kind == "schedule":
        from functions.schedule.instance import ScheduleInstance

        return ScheduleInstance(args.nats, ScheduleConfig(), instance_id=args.id)
    if kind == "scale":
        from functions.scale.instance import ScaleInstance

        return ScaleInstance(args.nats, ScaleConfig())
    if kind == "route":
        from functions.route.instance import RouteInstance

        return RouteInstance(args.nats, args.redis or Config().redis_url)
    raise SystemExit(f"unknown control function {kind!r} (schedule, scale, route)")


async def run(args: argparse.Namespace) -> int:
    instance = build(args.kind, args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await instance.start()
    print(f"{args.kind} instance {getattr(instance, 'id', '?')} running", flush=True)
    await stop.wait()
    await instance.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controlplane.instance")
    p.add_argument("kind", choices=["schedule", "scale", "route"])
    p.add_argument("--nats", required=True)
    p.add_argument("--redis", default="")
    p.add_argument("--id", default="")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s {args.kind} %(levelname)s %(message)s")
    try:
        import uvloop

        return uvloop.run(run(args))
    except ImportError:
        return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
