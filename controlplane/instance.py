"""Run one control-function instance as its own process:
`python -m controlplane.instance KIND [--id ID]`, KIND one of scale, schedule, route (and the
benchmark's baselines, central and sampling). The whole `Config` comes from the environment
as JSON (`FNPLANE_CONFIG`, what the process runtime passes), so every setting of the parent
reaches the instance; without it, the defaults. The same entry point serves the process
runtime here and the container image on Kubernetes. Prints `READY_LINE`, the instance id
and its config once it serves; SIGTERM stops it cleanly. Wiring only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from controlplane import build
from kernel import telemetry
from kernel.config import Config, dumps, loads
from kernel.limits import raise_open_files_limit
from kernel.metricsport import open_metrics_port

READY_LINE = "fnplane-instance ready"
CONFIG_ENV = "FNPLANE_CONFIG"


def config_from_env(env: dict[str, str]) -> Config:
    text = env.get(CONFIG_ENV, "")
    return loads(text) if text else Config()


async def run(kind: str, config: Config, instance_id: str, *, ready_timeout: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if telemetry.tracing_wanted(config.trace_file):
        telemetry.setup_tracing(f"fnplane-{kind}", trace_file=config.trace_file)
    async with (open_metrics_port(config.metrics) as port,
                await build.instance(kind, config, instance_id) as component):
        wait_ready = getattr(component, "wait_ready", None)
        if wait_ready is not None:  # the baselines: once they know the nodes
            await wait_ready(timeout=ready_timeout)
        # A `schedule` instance is ready once the coordinator gives it a partition: its
        # heartbeats say so, and that is what callers watch.
        metrics = f" metrics={port.url}" if port.url else ""
        print(f"{READY_LINE} {kind} {component.id}{metrics} config={dumps(config)}", flush=True)
        await stop.wait()
    telemetry.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controlplane.instance")
    p.add_argument("kind", choices=sorted(build.INSTANCES))
    p.add_argument("--id", default="")
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s {args.kind} %(levelname)s %(message)s")
    config = config_from_env(dict(os.environ))
    raise_open_files_limit()  # kernel/limits.py
    coro = run(args.kind, config, args.id, ready_timeout=args.ready_timeout)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
