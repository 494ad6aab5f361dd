"""One role of `fnplane up` as its own process: `python -m controlplane.role ROLE`, with the
stack's whole `Config` as JSON in `FNPLANE_CONFIG` (as `controlplane.instance` gets it).

  coordinator  the coordinator and the registry; it starts, counts and replaces the
               control-function instances (scale, schedule, route) as processes of its own
  nodes        the node agents of the stack's backend (all local nodes, or the kubernetes
               backend with FNPLANE_KUBERNETES, a KubernetesConfig as JSON)
  activator    one gateway worker (`--worker I` of `activator.workers`): the HTTP gateway and
               the NATS ingress; workers share the port (SO_REUSEPORT)

The same roles the Kubernetes manifests run as Deployments (`controlplane.component` is that
image's entry point; this one is for a machine's processes, with everything from the Config).
Prints `READY_LINE ROLE ...` once it serves. SIGTERM stops it cleanly; SIGINT is left to the
parent, which stops the roles in order (a Ctrl-C reaches the whole process group at once).
Wiring only."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec

from controlplane import build
from controlplane.instance import CONFIG_ENV, config_from_env
from controlplane.runtime import ProcessRuntime
from kernel import telemetry
from kernel.component import Component
from kernel.config import Config, MetricsConfig, dumps
from kernel.limits import raise_open_files_limit
from kernel.metricsport import open_metrics_port
from kernel.procs import ManagedProcess, ServerStartError

READY_LINE = "fnplane-role ready"
ROLES = ("coordinator", "nodes", "activator")
KUBERNETES_ENV = "FNPLANE_KUBERNETES"
# The control-function kinds the coordinator runs as processes in `fnplane up`.
INSTANCE_KINDS = ["schedule", "scale", "route"]


@dataclass(eq=False)
class RoleProcess:
    """A role running as a child process of `fnplane up` (what the supervisor watches)."""

    role: str
    name: str
    process: ManagedProcess
    stop_timeout: float
    own_url: str = ""  # a gateway worker's own listener
    metrics_url: str = ""  # the process's metrics port (the gateway's are on own_url)

    async def stop(self, timeout: float | None = None) -> None:
        await self.process.stop(self.stop_timeout if timeout is None else timeout)


async def start_role(role: str, config: Config, *, name: str, log_dir: Path,
                     env: dict[str, str], worker: int = 0,
                     ready_timeout: float = 60.0) -> RoleProcess:
    """Start `python -m controlplane.role ROLE` and return once it prints its ready line;
    one that exits or stays silent is stopped and explained with its last output."""
    argv = [sys.executable, "-m", "controlplane.role", role]
    if role == "activator":
        argv += ["--worker", str(worker)]
    process = await ManagedProcess.start(
        argv, name=name, log_dir=log_dir, env={**os.environ, CONFIG_ENV: dumps(config), **env})
    try:
        async with asyncio.timeout(ready_timeout):
            ready = await process.wait_for_line(f"{READY_LINE} {role}")
    except TimeoutError:
        ready = False
    if not ready or process.returncode is not None:
        await process.stop(timeout=2.0)
        raise ServerStartError(f"fnplane {name} did not start", tail=process.tail(40))
    own = metrics = ""
    for line in process.tail().splitlines():
        if line.startswith(READY_LINE) and " own=" in line:
            own = line.split(" own=", 1)[1].split()[0]
        if line.startswith(READY_LINE) and " metrics=" in line:
            metrics = line.split(" metrics=", 1)[1].split()[0]
    act = config.activator
    # A gateway worker drains before it exits; everything else gets the usual bound.
    stop_timeout = 10.0 + (act.drain_grace_s + act.drain_timeout_s if role == "activator"
                           else 0.0)
    return RoleProcess(role, name, process, stop_timeout, own, metrics)


class Group(Component):
    """Several components that start and stop together (the local node agents)."""

    def __init__(self, parts: list[Component]) -> None:
        super().__init__(parts[0].bus)
        self.parts = parts

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.parts))

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.parts), return_exceptions=True)


async def build_role(role: str, config: Config, env: dict[str, str]) -> Component:
    if role == "coordinator":
        runtime = ProcessRuntime(config, kinds=INSTANCE_KINDS)
        public = env.get("FNPLANE_PUBLIC_URL", "")
        return await build.coordinator(config, public_url=public, runtime=runtime)
    if role == "nodes":
        if config.nodes.backend == "kubernetes":
            from partitions.agents.kubernetes.agent import KubernetesConfig

            kube = msgspec.json.decode(env.get(KUBERNETES_ENV, "{}"), type=KubernetesConfig)
            return await build.kubernetes_nodes(config, kube)
        nodes = await build.local_nodes(config, log_dir=Path(config.state_dir) / "pods")
        return Group(list(nodes))
    if role == "activator":
        return await build.activator(config)
    raise SystemExit(f"unknown role {role!r}; one of {', '.join(ROLES)}")


async def run(role: str, config: Config) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if telemetry.tracing_wanted(config.trace_file):
        telemetry.setup_tracing(f"fnplane-{role}", trace_file=config.trace_file)
    component = await build_role(role, config, dict(os.environ))
    # The gateway shows its metrics on its own listener; the other roles on a port.
    metrics_config = config.metrics if role != "activator" else MetricsConfig(port=-1)
    async with open_metrics_port(metrics_config) as port, component:
        # A gateway worker says where its own listener is (its metrics, on their own).
        own = getattr(component, "own_url", "")
        print(f"{READY_LINE} {role} {component.id}" + (f" own={own}" if own else "")
              + (f" metrics={port.url}" if port.url else ""), flush=True)
        await stop.wait()
    telemetry.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controlplane.role")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--worker", type=int, default=0, help="this gateway worker's index")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    # The parent stops its roles in order; a terminal's Ctrl-C must not stop them all at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s {args.role} %(levelname)s %(message)s")
    config = config_from_env(dict(os.environ))
    if args.role == "activator":
        config = dataclasses.replace(
            config, activator=dataclasses.replace(config.activator, worker=args.worker))
    raise_open_files_limit()  # kernel/limits.py
    coro = run(args.role, config)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
