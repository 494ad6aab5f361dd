"""The container image's entry point: one image runs any fnplane component by argument,
`python -m controlplane.component COMPONENT` (the Deployments in deploy/ pass it).

  coordinator  the coordinator and the service registry (admin API), on Redis
  scale | schedule | route   one control-function instance (as `controlplane.instance`)
  activator    the HTTP gateway and NATS ingress
  node         the `kubernetes` node backend (in-cluster service account)
  operator     the FnService reconciler
  probe        exit 0 when this container's component is alive (exec probe)

Configuration: the whole Config as JSON in FNPLANE_CONFIG if set; on top, the variables a
Deployment sets: FNPLANE_NATS_URL, FNPLANE_REDIS_URL, FNPLANE_CREDS (the NATS credentials
file, kernel/identity.py), FNPLANE_PUBLIC_URL (the gateway's URL services are announced at),
FNPLANE_ACTIVATOR_PORT, FNPLANE_GRPC_PORT and FNPLANE_API_KEYS (the gateway's gRPC
port, -1 none; API keys required, 1 or 0), FNPLANE_POD_IMAGE, FNPLANE_POD_PULL_POLICY,
FNPLANE_POD_PORT,
FNPLANE_NAMESPACE, FNPLANE_INSTANCE_ID (a `schedule` instance's id: its pod name, from the
downward API; else HOSTNAME), FNPLANE_LEADER_LEASE (coordinator, node, operator: run only
while holding this Lease, partitions/leader.py), FNPLANE_POD_NAME (this pod's name),
FNPLANE_METRICS_HOST and FNPLANE_METRICS_PORT (the metrics port, kernel/metricsport.py;
deploy/ sets 0.0.0.0 and 9090 on every component but the activator, whose /metrics is on
its own port), and the standard OTEL_* variables (OTLP traces and metrics).
The coordinator's instance runtime: with FNPLANE_RUNTIME=kubernetes (deploy/ sets it) it
owns the replicas of the `schedule` Deployment (FNPLANE_SCHEDULE_DEPLOYMENT, default
fnplane-schedule, in FNPLANE_NAMESPACE; FNPLANE_KUBECONFIG when out of cluster), between
FNPLANE_SCHEDULE_MIN and FNPLANE_SCHEDULE_MAX (default 1 and 4); unset, it has none and
`schedule` keeps whatever replicas its Deployment says.
Wiring only. While the component runs, a heartbeat file (FNPLANE_ALIVE_FILE, default
/tmp/fnplane/alive, on an emptyDir: the root filesystem is read-only) is touched every few
seconds; `probe` checks its age, so a wedged event loop fails the liveness probe.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

from controlplane import build as builder
from controlplane.elastic import Runtime
from controlplane.instance import config_from_env as config_from_json_env
from controlplane.operator import OperatorConfig
from kernel import telemetry
from kernel.component import Component
from kernel.config import DEFAULT_NATS_URL, Config, MetricsConfig
from kernel.limits import raise_open_files_limit
from kernel.metricsport import MetricsPort
from partitions.agents.kubernetes.agent import KubernetesConfig

COMPONENTS = ("coordinator", "scale", "schedule", "route", "activator", "node", "operator")
ALIVE_EVERY_S = 5.0
ALIVE_MAX_AGE_S = 30.0


def alive_file() -> Path:
    return Path(os.environ.get("FNPLANE_ALIVE_FILE", "/tmp/fnplane/alive"))


def config_from_env(env: dict[str, str]) -> Config:
    """The whole Config from `FNPLANE_CONFIG` (JSON) if set, with the Deployment's variables
    on top (they are what deploy/ sets)."""
    base = config_from_json_env(env)
    coordinator = replace(
        base.coordinator,
        schedule_min=int(env.get("FNPLANE_SCHEDULE_MIN", base.coordinator.schedule_min)),
        schedule_max=int(env.get("FNPLANE_SCHEDULE_MAX", base.coordinator.schedule_max)),
    )
    activator = replace(base.activator, host="0.0.0.0",
                        port=int(env.get("FNPLANE_ACTIVATOR_PORT", "8080")))
    # deploy/ serves gRPC on 8081 and requires API keys (FNPLANE_API_KEYS=1).
    activator = replace(activator,
                        grpc_port=int(env.get("FNPLANE_GRPC_PORT", activator.grpc_port)),
                        keys=replace(activator.keys, enabled=env.get(
                            "FNPLANE_API_KEYS", "1" if activator.keys.enabled else "0") == "1"))
    creds = env.get("FNPLANE_CREDS")
    metrics = MetricsConfig(host=env.get("FNPLANE_METRICS_HOST", base.metrics.host),
                            port=int(env.get("FNPLANE_METRICS_PORT", base.metrics.port)))
    return replace(base, nats_url=env.get("FNPLANE_NATS_URL", DEFAULT_NATS_URL),
                   redis_url=env.get("FNPLANE_REDIS_URL", base.redis_url),
                   coordinator=coordinator, activator=activator,
                   credentials=Path(creds) if creds else base.credentials,
                   metrics=metrics)


# The single writers: with FNPLANE_LEADER_LEASE set (deploy/ sets it on these three), only
# the holder of that Lease runs; a second pod of the Deployment (a rolling update's new one,
# or the old one on an unreachable node) waits as a candidate. A Lease rather than the
# `Recreate` strategy: Recreate covers rollouts only, not `kubectl scale --replicas 2` nor a
# pod replaced while its unreachable node may still run it, and it leaves nobody warm.
ELECTED = ("coordinator", "node", "operator")


async def build(name: str, env: dict[str, str]) -> Component:
    built = await _build(name, env)
    lease = env.get("FNPLANE_LEADER_LEASE", "")
    if lease and name in ELECTED:
        from partitions.leader import Elected, LeaseConfig

        host = env.get("FNPLANE_POD_NAME") or env.get("HOSTNAME") or "candidate"
        return Elected(built, LeaseConfig(
            name=lease, identity=f"{host}_{uuid.uuid4().hex[:8]}",
            namespace=env.get("FNPLANE_NAMESPACE", ""),
            kubeconfig=env.get("FNPLANE_KUBECONFIG") or None))
    return built


async def _build(name: str, env: dict[str, str]) -> Component:
    config = config_from_env(env)
    if name == "coordinator":
        return await builder.coordinator(config, public_url=env.get("FNPLANE_PUBLIC_URL", ""),
                                         runtime=coordinator_runtime(env))
    if name in ("scale", "schedule", "route"):
        instance_id = env.get("FNPLANE_INSTANCE_ID") or env.get("HOSTNAME", "")
        return await builder.instance(name, config, instance_id)
    if name == "activator":
        return await builder.activator(config)
    if name == "node":
        return await builder.kubernetes_nodes(config, KubernetesConfig(
            namespace=env.get("FNPLANE_NAMESPACE", ""),
            # Unset: the image of this pod's own `node` container (deploy/ sets none, so
            # kustomize `images:` decides the pods' image too).
            image=env.get("FNPLANE_POD_IMAGE", ""),
            image_pull_policy=env.get("FNPLANE_POD_PULL_POLICY", ""),
            self_pod=env.get("FNPLANE_POD_NAME", ""),
            run_as_user=int(env.get("FNPLANE_POD_RUN_AS_USER", "10001")),
            run_as_group=int(env.get("FNPLANE_POD_RUN_AS_GROUP", "10001")),
            pod_port=int(env.get("FNPLANE_POD_PORT", "8080")),
            pull_timeout_s=float(env.get("FNPLANE_POD_PULL_TIMEOUT_S", "900")),
        ))
    if name == "operator":
        return await builder.operator(config, OperatorConfig(
            namespace=env.get("FNPLANE_NAMESPACE", "")))
    raise SystemExit(f"unknown component {name!r}; one of {', '.join(COMPONENTS)}")


def coordinator_runtime(env: dict[str, str]) -> Runtime | None:
    kind = env.get("FNPLANE_RUNTIME", "")
    if kind == "":
        return None
    if kind == "kubernetes":
        from controlplane.kube_runtime import KubernetesRuntime

        return KubernetesRuntime(
            env.get("FNPLANE_NAMESPACE", ""),
            {"schedule": env.get("FNPLANE_SCHEDULE_DEPLOYMENT", "fnplane-schedule")},
            kubeconfig=env.get("FNPLANE_KUBECONFIG") or None)
    raise SystemExit(f"FNPLANE_RUNTIME={kind!r}: the coordinator component knows only "
                     "'kubernetes' (or unset: no runtime)")


async def _beat(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path.touch()
        await asyncio.sleep(ALIVE_EVERY_S)


async def run(name: str) -> int:
    env = dict(os.environ)
    config = config_from_env(env)
    if telemetry.tracing_wanted(config.trace_file):
        telemetry.setup_tracing(f"fnplane-{name}", trace_file=config.trace_file)
    # The activator's /metrics is on its own listener; every other component has a port.
    port = MetricsPort(config.metrics.host, config.metrics.port)
    if name != "activator" and config.metrics.port >= 0:
        await port.start()
    try:
        return await _run(name, env)
    finally:
        await port.stop()
        telemetry.flush()


async def _run(name: str, env: dict[str, str]) -> int:
    component = await build(name, env)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await component.start()
    beat = asyncio.create_task(_beat(alive_file()), name="alive")
    print(f"fnplane {name} running", flush=True)
    # A component that lost its Lease has stopped acting; the process ends (non-zero) so its
    # Deployment starts it again as a fresh candidate.
    lost: asyncio.Event | None = getattr(component, "lost", None)
    waits = [asyncio.create_task(stop.wait())]
    if lost is not None:
        waits.append(asyncio.create_task(lost.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
        alive_file().unlink(missing_ok=True)
        await component.stop()
    return 1 if lost is not None and lost.is_set() else 0


def probe(max_age_s: float = ALIVE_MAX_AGE_S) -> int:
    try:
        age = time.time() - alive_file().stat().st_mtime
    except OSError:
        print("not started", file=sys.stderr)
        return 1
    if age > max_age_s:
        print(f"no heartbeat for {age:.0f}s", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controlplane.component")
    p.add_argument("component", choices=[*COMPONENTS, "probe"])
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.component == "probe":
        return probe()
    raise_open_files_limit()  # kernel/limits.py
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s {args.component} %(levelname)s %(message)s")
    try:
        import uvloop

        return uvloop.run(run(args.component))
    except ImportError:
        return asyncio.run(run(args.component))


if __name__ == "__main__":
    sys.exit(main())
