"""`fnplane`: run the embedded stack (`up`) and manage services on a running one. The
management commands talk to the stack over NATS (the admin API), never through its files.
Flags follow `kn service` where the meaning is the same (`--scale-min`, `--concurrency-limit`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from controlplane import metricsread
from controlplane.servers import redacted
from controlplane.specfile import (
    DEFAULT_COMMAND,
    load_spec_file,
    parse_cpu,
    parse_memory_mb,
    parse_toleration,
    traffic_from_manifest,
)
from kernel import endpoints as ep
from kernel import revisions as rv
from kernel.bus import Bus
from kernel.config import (
    DEFAULT_NATS_URL,
    ActivatorConfig,
    ApiKeysConfig,
    Config,
    ConfigError,
    NodesConfig,
    TlsConfig,
    default_state_dir,
)
from kernel.endpoints import Endpoint
from kernel.errors import RemoteError
from kernel.identity import CREDENTIALS_FILE, Login, login
from kernel.limits import raise_open_files_limit
from kernel.messages import (
    BatchingSpec,
    DeployRequest,
    Empty,
    KeyCreate,
    KeyQuery,
    KeyRevoke,
    NameRequest,
    Resources,
    ScalingSpec,
    ServiceSpec,
    ServiceStatus,
    SpecError,
    TrafficRequest,
)
from kernel.procs import PortInUseError, ServerStartError, port_in_use
from partitions.agents.podusers import LABEL as POD_USER_LABEL


class CliError(Exception):
    pass


# ---- up ----------------------------------------------------------------------------------


async def run_up(args: argparse.Namespace) -> int:
    from controlplane.stack import Stack

    try:
        import uvloop  # noqa: F401 - event loop chosen in main()
    except ImportError:
        pass
    for what, port in (("activator", args.port), ("NATS", args.nats_port)):
        if port and port_in_use(args.host, port):
            raise CliError(
                f"{what} port {port} on {args.host} is already in use; pass "
                f"{'--port' if what == 'activator' else '--nats-port'} to choose another"
            )
    if args.grpc_port > 0 and port_in_use(args.host, args.grpc_port):
        raise CliError(f"gRPC port {args.grpc_port} on {args.host} is already in use; pass "
                       "--grpc-port to choose another (-1: none)")
    # Gateway connections and pod spawns share this process's descriptors (kernel/limits.py).
    raise_open_files_limit()
    config = Config(
        state_dir=Path(args.state_dir),
        tls=tls_from_flags(args),
        activator=ActivatorConfig(host=args.host, port=args.port,
                                  drain_grace_s=args.drain_grace, grpc_port=args.grpc_port,
                                  keys=ApiKeysConfig(enabled=args.api_keys)),
        nodes=NodesConfig(
            count=args.nodes,
            capacity=Resources(
                cpu=parse_cpu(args.node_cpu), memory_mb=parse_memory_mb(args.node_memory),
                gpu=args.node_gpus,
            ),
            workdir=Path(args.workdir).resolve(),
            pod_user=args.pod_user,
            model_root=Path(args.model_root).resolve() if args.model_root else None,
            model_hosts=tuple(h.strip() for h in (args.model_hosts or "").split(",")
                              if h.strip()),
            node_cache_bytes=_bytes(args.node_cache_size, "--node-cache-size"),
        ),
    )
    config = replace(config, coordinator=replace(
        config.coordinator, schedule_min=args.schedule_min,
        schedule_max=max(args.schedule_max, args.schedule_min), runtime=args.runtime,
        scale_min=args.scale_min, scale_max=max(args.scale_max, args.scale_min),
        route_min=args.route_min, route_max=max(args.route_max, args.route_min),
    ))
    kube = None
    if args.backend == "kubernetes":
        from partitions.agents.kubernetes.agent import KubernetesConfig

        config = replace(config, nodes=replace(config.nodes, backend="kubernetes"))
        kube = KubernetesConfig(kubeconfig=args.kubeconfig,
                                image=os.environ.get("FNPLANE_POD_IMAGE", "fnplane:0.1.0"))
    stack = Stack(config, nats_port=args.nats_port or None, kubernetes=kube, roles=args.roles,
                  gateway_workers=args.gateway_workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    t0 = time.time()
    try:
        await stack.start()
    except (PortInUseError, ServerStartError) as exc:
        raise CliError(str(exc)) from None
    print(f"fnplane is up in {time.time() - t0:.1f}s", flush=True)
    print(f"  gateway  {stack.url}   (KServe v1 and Open Inference Protocol v2)", flush=True)
    if stack.grpc_address:
        print(f"  grpc     {stack.grpc_address}   (Open Inference Protocol v2 over gRPC)",
              flush=True)
    if args.api_keys:
        print("  keys     API keys required (`fnplane key create --service NAME`)", flush=True)
    workers = [p for p in stack.role_processes.values() if p.own_url]
    for p in workers:
        print(f"           {p.name}: {p.own_url}/metrics   (this worker alone)", flush=True)
    shown = stack.metrics_urls()
    for name, url in shown.items():
        if not any(p.name == name for p in workers):
            print(f"  metrics  {name}: {url}", flush=True)
    # Instances the coordinator started as processes have ports of their own (inline ones
    # share the stack's, printed above); `fnplane status` lists them as they come and go.
    for name, url in sorted((await stack.instance_metrics_urls()).items()):
        if url not in shown.values():
            print(f"  metrics  {name}: {url}", flush=True)
    if stack.role_processes:
        print(f"  roles    {', '.join(stack.role_processes)}: one process each, restarted "
              "when they die (logs in <state-dir>/logs)", flush=True)
    print(f"  nats     {stack.nats_url}   (export FNPLANE_NATS_URL={stack.nats_url})", flush=True)
    if stack.config.credentials is not None:
        print(f"  creds    {stack.config.credentials}   (one NATS user per component; the CLI "
              f"uses its admin entry: export FNPLANE_CREDS={stack.config.credentials})",
              flush=True)
    print(f"  redis    {redacted(stack.redis_url or '')}", flush=True)
    if stack.config.tls.serves:
        print(f"  tls      NATS and Redis require TLS; clients trust {stack.config.tls.ca}   "
              f"(export FNPLANE_TLS_CA={stack.config.tls.ca})", flush=True)
    if kube is not None:
        print(f"  nodes    the cluster of {args.kubeconfig or 'the default kubeconfig'}"
              f" (pods outlive `up`; the next `up` adopts them)", flush=True)
    else:
        print(f"  nodes    {args.nodes} local, state in {args.state_dir}", flush=True)
    print("Ctrl-C stops everything.", flush=True)
    await stop.wait()
    print("fnplane: stopping...", flush=True)
    await stack.stop()
    print("fnplane: stopped", flush=True)
    return 0


def tls_from_flags(args: argparse.Namespace) -> TlsConfig:
    """--tls-cert/--tls-key/--tls-ca: all three or none (TlsConfig says why), files that
    exist, made absolute (the servers and child processes run from other directories)."""
    given = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    if not any(given.values()):
        return TlsConfig()
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise CliError(f"TLS needs --tls-cert, --tls-key and --tls-ca together; "
                       f"missing {', '.join(missing)}")
    paths = {flag: Path(value).resolve() for flag, value in given.items()}
    for flag, path in paths.items():
        if not path.is_file():
            raise CliError(f"{flag} {path}: no such file")
    return TlsConfig(cert=paths["--tls-cert"], key=paths["--tls-key"], ca=paths["--tls-ca"])


# ---- management commands -----------------------------------------------------------------


Rep = TypeVar("Rep")


def admin_login() -> Login | None:
    """The admin credentials: `FNPLANE_CREDS` (a credentials file), else the state dir's
    (`FNPLANE_STATE_DIR`, default ~/.fnplane), where `fnplane up` made them."""
    path = Path(os.environ.get("FNPLANE_CREDS") or default_state_dir() / CREDENTIALS_FILE)
    return login(path, "admin") if path.exists() else None


def admin_tls() -> TlsConfig:
    """The CA a TLS stack's servers are verified with: `FNPLANE_TLS_CA` (`fnplane up
    --tls-ca` prints it). Without it a tls:// URL is checked against the system's CAs."""
    ca = os.environ.get("FNPLANE_TLS_CA")
    return TlsConfig(ca=Path(ca)) if ca else TlsConfig()


async def _admin(nats_url: str, endpoint: Endpoint[Any, Rep], msg: msgspec.Struct,
                 timeout: float = 5.0) -> Rep:
    try:
        bus = await Bus.connect(
            nats_url, f"fnplane-cli-{os.getpid()}", connect_timeout=2.0, reconnect=False,
            login=admin_login(), tls=admin_tls().client_context(),
        )
    except Exception as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise CliError(
                f"fnplane at {nats_url} uses TLS with a certificate we do not trust: set "
                "FNPLANE_TLS_CA to the CA it was started with (`fnplane up --tls-ca`)"
            ) from None
        if "Authorization" in str(exc):
            raise CliError(
                f"fnplane at {nats_url} refused our credentials: point FNPLANE_CREDS at the "
                "credentials.json of its state dir (or set FNPLANE_STATE_DIR)"
            ) from None
        raise CliError(
            f"cannot reach fnplane's NATS at {nats_url} ({exc}): `fnplane up` is not running, "
            "or its nats-server is down (`fnplane up` restarts it within seconds; see "
            "<state-dir>/logs/nats-server.log). Set --nats or FNPLANE_NATS_URL for another."
        ) from None
    try:
        return await bus.call(endpoint, msg, timeout=timeout)
    except RemoteError as exc:
        raise CliError(exc.message) from None
    finally:
        await bus.close()


async def run_creds(args: argparse.Namespace) -> int:
    """Print fresh credentials for deploy/ as Kubernetes Secrets (deploy/README.md)."""
    from controlplane.kubesecrets import render

    sys.stdout.write(render(args.namespace))
    return 0


def spec_from_flags(args: argparse.Namespace) -> ServiceSpec:
    if args.file:
        spec = load_spec_file(Path(args.file))
        return msgspec.structs.replace(spec, name=args.name) if args.name else spec
    if not args.name:
        raise SpecError("a service NAME (or -f FILE) is required")
    cc = args.container_concurrency or 0
    target = args.target_concurrency
    scaling = ScalingSpec(
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        initial_scale=args.initial_scale,
        # No target: Knative's, from the container concurrency (functions/scale/kpa.py).
        target_concurrency=target if target else None,
        stable_window_s=_seconds(args.scale_window),
        scale_to_zero_grace_s=_seconds(args.scale_to_zero_grace),
        activation_scale=args.activation_scale,
    )
    env = {}
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return ServiceSpec(
        name=args.name,
        command=args.command or list(DEFAULT_COMMAND),
        env=env,
        resources=Resources(cpu=parse_cpu(args.cpu), memory_mb=parse_memory_mb(args.memory),
                            gpu=args.gpu),
        scaling=scaling,
        container_concurrency=cc,
        readiness_path=args.readiness_path,
        readiness_period_s=_seconds(args.readiness_period),
        readiness_failure_threshold=args.readiness_failure_threshold,
        batching=BatchingSpec(
            max_batch_size=args.max_batch_size, max_wait_ms=args.max_batch_wait_ms
        ),
        image=args.image,
        model_version=args.model_version,
        run_as_user=args.run_as_user,
        run_as_group=args.run_as_group,
        tolerations=[parse_toleration(t) for t in args.toleration or []],
        storage_uri=args.storage_uri,
        timeout_s=_seconds(args.timeout),
        response_start_timeout_s=(_seconds(args.response_start_timeout)
                                  if args.response_start_timeout else None),
        idle_timeout_s=_seconds(args.idle_timeout),
        storage_sha256=args.storage_sha256,
        prefetch=args.prefetch,
    ).validate()


def _bytes(value: str, flag: str) -> int:
    """A size as a Kubernetes quantity ('20Gi', '500M'); a bare number is bytes."""
    from controlplane.specfile import parse_quantity
    try:
        n = parse_quantity(value)
    except ValueError:
        n = -1
    if n < 1:
        raise ConfigError(f"{flag} {value!r}: expected a size such as '20Gi'")
    return int(n)


def _seconds(value: str) -> float:
    """'30', '30s', '2m' → seconds (kn accepts durations)."""
    text = str(value).strip()
    try:
        if text.endswith("ms"):
            return float(text[:-2]) / 1000
        if text.endswith("s"):
            return float(text[:-1])
        if text.endswith("m"):
            return float(text[:-1]) * 60
        return float(text)
    except ValueError:
        raise SpecError(f"duration {value!r}: expected e.g. 30s, 2m") from None


def _target(sc: ScalingSpec) -> str:
    """The declared per-pod target, or where Knative takes it from when none is declared."""
    if sc.metric == "rps":
        return f"{sc.target_rps:g} rps"
    if sc.target_concurrency is None:
        return "container concurrency (else 100)"
    return f"{sc.target_concurrency:g}"


def _traffic_flags(args: argparse.Namespace) -> dict[str, Any]:
    """kn's `--traffic REV=PCT` (`@latest`, a revision, its number or a tag) and `--tag
    REV=TAG`, checked for shape here; the registry checks the rest (sum, names, clashes)."""
    try:
        traffic = rv.parse_traffic(args.traffic) if args.traffic else None
        tags = dict(rv.parse_assignments(args.tag or [], what="--tag"))
    except RemoteError as exc:
        raise CliError(exc.message) from None
    return {"traffic": traffic, "tags": tags}


def _manifest(path: str) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"{path}: {exc}") from None
    return doc if isinstance(doc, dict) else {}


def _print_traffic(st: ServiceStatus) -> None:
    for r in st.revisions:
        tags = f"  tag {', '.join(r.tags)}" if r.tags else ""
        print(f"  {r.percent:>3}%  {r.spec.name}{tags}")


async def run_deploy(args: argparse.Namespace) -> int:
    spec = spec_from_flags(args)
    t0 = time.time()
    flags = {**_traffic_flags(args), "canary_percent": args.canary_percent}
    if args.canary_percent is not None and flags["traffic"] is not None:
        raise CliError("give --traffic or --canary-percent, not both")
    if args.file and flags["traffic"] is None and flags["canary_percent"] is None:
        # the manifest's traffic block or canaryTrafficPercent, as the operator reads them
        flags = {**traffic_from_manifest(_manifest(args.file)), "tags": flags["tags"] or {}}
    reply = await _admin(args.nats, ep.ADMIN_DEPLOY, DeployRequest(spec=spec, **flags))
    verb = "created" if reply.spec.generation == 1 else "updated"
    if spec.scaling.min_scale > 0 and not args.no_wait:
        await _wait_ready(args.nats, spec.name, spec.scaling.min_scale, args.wait_timeout)
    print(f"Service '{spec.name}' {verb} (generation {reply.spec.generation}, latest "
          f"revision {reply.spec.latest_revision}).")
    print("Traffic: " + ", ".join(f"{t.revision} {t.percent}%" + (f" (tag {t.tag})" if t.tag
                                                                  else "")
                                  for t in reply.spec.traffic))
    print(f"Service '{spec.name}' is ready to serve in {time.time() - t0:.2f}s", end="")
    print(" (scaled to zero until the first request)." if spec.scaling.min_scale == 0 else ".")
    print(reply.url)
    return 0


async def _wait_ready(nats_url: str, name: str, want: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = await _admin(nats_url, ep.ADMIN_DESCRIBE, NameRequest(name=name))
        if st.ready_pods >= want:
            return
        if st.last_error:
            raise CliError(f"service {name} failed: {st.last_error}")
        await asyncio.sleep(0.2)
    raise CliError(f"service {name} not ready within {timeout:g}s")


async def run_list(args: argparse.Namespace) -> int:
    reply = await _admin(args.nats, ep.ADMIN_LIST, Empty())
    if args.json:
        print(json.dumps(msgspec.to_builtins(reply), indent=2))
        return 0
    rows = [("NAME", "URL", "LATEST", "READY", "PODS")]
    for st in reply.services:
        ready = "True" if st.ready_pods or st.spec.scaling.min_scale == 0 else "False"
        rows.append((st.spec.name, st.url, st.latest_ready_revision or "-", ready,
                     str(st.ready_pods)))
    _table(rows)
    return 0


async def run_describe(args: argparse.Namespace) -> int:
    st = await _admin(args.nats, ep.ADMIN_DESCRIBE, NameRequest(name=args.name))
    cluster = await _admin(args.nats, ep.ADMIN_STATUS, Empty())
    if args.json:
        print(json.dumps(msgspec.to_builtins(st), indent=2))
        return 0
    sp, sc = st.spec, st.spec.scaling
    part_of = {n: p.id for p in cluster.partitions.partitions for n in p.nodes}
    print(f"Name:        {sp.name}  (generation {sp.generation})")
    print(f"URL:         {st.url}")
    print(f"Command:     {' '.join(sp.command)}")
    print(f"Model:       {sp.model_id}, version {sp.model_version}")
    if sp.storage_uri:
        cached = sorted((n.name, n.model_bytes.get(sp.model_id, 0))
                        for n in cluster.partitions.nodes.values() if sp.model_id in n.models)
        where = ", ".join(f"{name} ({size / 2**20:.1f} MiB)" for name, size in cached)
        print(f"Cached on:   {where or 'no node yet'}"
              + (f" (prefetch {sp.prefetch})" if sp.prefetch else ""))
    print(f"Resources:   {sp.resources.cpu:g} cpu, {sp.resources.memory_mb} MiB"
          + (f", {sp.resources.gpu} gpu" if sp.resources.gpu else ""))
    print(f"Scale:       min {sc.min_scale}, max {sc.max_scale or 'unbounded'}, "
          f"target {_target(sc)} ({sc.target_utilization:.0%}), "
          f"container concurrency {sp.container_concurrency or 'unlimited'}, "
          f"window {sc.stable_window_s:g}s, scale-to-zero grace {sc.scale_to_zero_grace_s:g}s")
    start = sp.response_start_timeout_s
    print(f"Timeouts:    request {sp.timeout_s:g}s, response start "
          f"{f'{start:g}s' if start is not None else 'as request'}, idle "
          f"{f'{sp.idle_timeout_s:g}s' if sp.idle_timeout_s else 'none'}")
    print(f"Pods:        {st.ready_pods} ready, {st.desired_pods} desired")
    for p in st.pods:
        print(f"  {p.pod:<22} {p.state:<11} node {p.node} (partition "
              f"{part_of.get(p.node, '?')})  {p.url}")
        if p.run_as:
            print(f"  {'':<22} runs as {p.run_as}")
    if st.revisions:
        print(f"Revisions:   latest {sp.latest_revision}, latest ready "
              f"{st.latest_ready_revision or 'none yet'}")
        for r in st.revisions:
            tags = f"  tag {', '.join(r.tags)}" if r.tags else ""
            state = ("ready" if r.ready else "not ready") + (
                "" if r.spec.routing_state == "active" else ", reserve (scales to zero)")
            print(f"  {r.spec.name:<22} {r.percent:>3}%  {r.ready_pods} pods  {state}{tags}")
            if r.last_error:
                print(f"  {'':<22} cannot start: {r.last_error} (its share goes to the "
                      "other revisions)")
    if st.last_error:
        print(f"Last error:  {st.last_error}")
    got = await metricsread.scrape_all(
        args.metrics_url or [metricsread.gateway_metrics_url(st.url), cluster.metrics_url,
                             *(i.metrics_url for i in cluster.instances)])
    print(f"Metrics:     {metricsread.render(metricsread.service_figures(got.series, sp.name))}")
    print(f"             ({got.line()})")
    cs = st.last_cold_start
    if cs is not None:
        print(f"Last cold start ({time.strftime('%H:%M:%S', time.localtime(cs.request_in))},"
              f" pod {cs.pod} on {cs.node}):")
        for stage, ms in cs.stages_ms().items():
            print(f"  {stage:<36} {ms:>9.1f} ms")
    return 0


async def run_traffic(args: argparse.Namespace) -> int:
    """`fnplane traffic NAME --traffic REV=PCT … --tag REV=TAG`: only the split and tags."""
    st = await _admin(args.nats, ep.ADMIN_TRAFFIC, TrafficRequest(name=args.name,
                                                                  **_traffic_flags(args)))
    print(f"Traffic of '{args.name}':")
    _print_traffic(st)
    return 0


async def run_rollback(args: argparse.Namespace) -> int:
    st = await _admin(args.nats, ep.ADMIN_TRAFFIC, TrafficRequest(name=args.name,
                                                                  rollback=True))
    print(f"Service '{args.name}' rolled back:")
    _print_traffic(st)
    return 0


async def run_delete(args: argparse.Namespace) -> int:
    await _admin(args.nats, ep.ADMIN_DELETE, NameRequest(name=args.name))
    print(f"Service '{args.name}' deleted.")
    return 0


async def run_status(args: argparse.Namespace) -> int:
    st = await _admin(args.nats, ep.ADMIN_STATUS, Empty())
    if args.json:
        print(json.dumps(msgspec.to_builtins(st), indent=2))
        return 0
    nodes = st.partitions.nodes
    down = {name: why for name, why in st.dependencies.items() if why != "up"}
    print("Dependencies: nats up, " + ", ".join(f"{n} {w}" for n, w in st.dependencies.items()))
    if down:
        print("DEGRADED: " + "; ".join(f"{n} is {w}" for n, w in down.items()))
    print(f"Partition map version {st.partitions.version}")
    free = {s.partition: s for s in st.summaries}
    rows = [("PARTITION", "EPOCH", "OWNER", "FREE CPU", "FREE MEMORY", "NODES")]
    for p in st.partitions.partitions:
        f = free.get(p.id)
        rows.append((str(p.id), str(p.epoch), p.owner or "-",
                     f"{f.free.cpu:g}" if f else "?", f"{f.free.memory_mb} MiB" if f else "?",
                     ", ".join(p.nodes) if len(p.nodes) <= 8 else f"{len(p.nodes)} nodes"))
    _table(rows)
    print()
    rows = [("NODE", "CPU", "MEMORY", "GPU", "BACKEND")]
    for n in sorted(nodes.values(), key=lambda n: n.name):
        rows.append((n.name, f"{n.capacity.cpu:g}", f"{n.capacity.memory_mb} MiB",
                     str(n.capacity.gpu), n.backend))
    _table(rows)
    for pod_user in sorted({n.labels[POD_USER_LABEL] for n in nodes.values()
                            if POD_USER_LABEL in n.labels}):
        print(f"Local pods run as: {pod_user}")
    print()
    rows = [("KIND", "INSTANCE", "LAST SEEN", "PARTITION", "SHARDS", "METRICS")]
    for i in st.instances:
        rows.append((i.kind, i.instance, f"{time.time() - i.last_seen:.1f}s ago",
                     str(i.partition) if i.partition >= 0 else "-", _ranges(i.shards),
                     i.metrics_url or "-"))
    _table(rows)
    got = await metricsread.scrape_all(
        args.metrics_url or [st.metrics_url, *(i.metrics_url for i in st.instances)])
    print(f"Metrics: {metricsread.render(metricsread.plane_figures(got.series))}")
    print(f"         ({got.line()})")
    if st.shards is not None:
        print()
        print(f"Shard map version {st.shards.version} ({st.shards.count} service shards)")
        rows = [("FUNCTION", "OWNER", "SHARDS", "EPOCHS")]
        for kind, shards in sorted(st.shards.shards.items()):
            by_owner: dict[str, list[int]] = {}
            for s in shards:
                by_owner.setdefault(s.owner, []).append(s.id)
            for owner, ids in sorted(by_owner.items()):
                epochs = sorted({s.epoch for s in shards if s.owner == owner})
                rows.append((kind, owner or "-", _ranges(ids),
                             f"{epochs[0]}..{epochs[-1]}" if len(epochs) > 1 else str(epochs[0])))
        _table(rows)
    return 0


# ---- key ---------------------------------------------------------------------------------


async def run_key_create(args: argparse.Namespace) -> int:
    reply = await _admin(args.nats, ep.ADMIN_KEY_CREATE,
                         KeyCreate(service=args.service, rps=args.rps, burst=args.burst))
    if args.json:
        print(json.dumps(msgspec.to_builtins(reply), indent=2))
        return 0
    k = reply.key
    limit = f"{k.rps:g} requests/s, burst {k.burst}" if k.rps else "no rate limit"
    print(f"API key {k.id} for service '{k.service}' ({limit}). It is shown only now:")
    print(reply.secret)
    return 0


async def run_key_list(args: argparse.Namespace) -> int:
    reply = await _admin(args.nats, ep.ADMIN_KEY_LIST, KeyQuery(service=args.service or ""))
    if args.json:
        print(json.dumps(msgspec.to_builtins(reply), indent=2))
        return 0
    rows = [("ID", "SERVICE", "RPS", "BURST", "CREATED", "REVOKED")]
    for k in reply.keys:
        rows.append((k.id, k.service, f"{k.rps:g}" if k.rps else "-",
                     str(k.burst) if k.rps else "-", _when(k.created_at),
                     _when(k.revoked_at) if k.revoked_at else "-"))
    _table(rows)
    return 0


async def run_key_revoke(args: argparse.Namespace) -> int:
    await _admin(args.nats, ep.ADMIN_KEY_REVOKE, KeyRevoke(id=args.id))
    print(f"API key {args.id} revoked.")
    return 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] → "0-2,5" ("-" for none)."""
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in out) or "-"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# ---- argument parsing --------------------------------------------------------------------


def _add_traffic_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--traffic", action="append", metavar="REV=PERCENT",
                   help="a revision's share (repeatable, summing to 100): NAME-0000N, its "
                        "number, a tag, or @latest for the newest revision")
    p.add_argument("--tag", action="append", metavar="REV=TAG",
                   help="reach REV with header X-Fnplane-Tag: TAG (repeatable)")


def _metrics_url_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-url", action="append", default=[],
                   help="scrape these Prometheus endpoints instead of the ones the stack "
                        "advertises (repeatable; e.g. Prometheus's /federate), see "
                        "controlplane/metricsread.py")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fnplane", description=__doc__)
    p.add_argument("--nats", default=os.environ.get("FNPLANE_NATS_URL", DEFAULT_NATS_URL),
                   help="NATS URL of a running stack (env FNPLANE_NATS_URL)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the embedded stack in the foreground")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8080, help="activator HTTP port")
    up.add_argument("--nats-port", type=int, default=4222)
    up.add_argument("--grpc-port", type=int, default=8081,
                    help="Open Inference Protocol gRPC port (-1: none, 0: any free)")
    up.add_argument("--api-keys", action="store_true",
                    help="require an API key on every model request (`fnplane key create`)")
    up.add_argument("--nodes", type=int, default=2, help="local nodes")
    up.add_argument("--node-cpu", default="4", help="cpu per node (cores or millicores)")
    up.add_argument("--node-memory", default="8Gi", help="memory per node")
    up.add_argument("--node-gpus", type=int, default=0,
                    help="GPUs per local node: node i has this machine's CUDA devices "
                         "i*N to i*N+N-1, handed to its GPU pods as CUDA_VISIBLE_DEVICES")
    up.add_argument("--schedule-min", type=int, default=1, help="schedule instances, at least")
    up.add_argument("--schedule-max", type=int, default=4, help="schedule instances, at most")
    up.add_argument("--scale-min", type=int, default=1,
                    help="scale instances (sharded by service), at least")
    up.add_argument("--scale-max", type=int, default=4, help="scale instances, at most")
    up.add_argument("--route-min", type=int, default=1,
                    help="route instances (sharded by service), at least")
    up.add_argument("--route-max", type=int, default=4, help="route instances, at most")
    up.add_argument("--roles", choices=["processes", "inline"], default="processes",
                    help="processes: the coordinator, the node agents and each gateway worker "
                         "as supervised processes of their own (control-function instances "
                         "are the coordinator's); inline: everything in this process")
    up.add_argument("--gateway-workers", type=int, default=1,
                    help="gateway processes sharing the port (SO_REUSEPORT); each gets 1/N of "
                         "every pod's container concurrency and of each service's buffer")
    up.add_argument("--runtime", choices=["tasks", "processes"], default="tasks",
                    help="with --roles inline: control-function instances as tasks here or as "
                         "OS processes (with --roles processes they are always processes)")
    up.add_argument("--state-dir", default=str(default_state_dir()))
    up.add_argument("--drain-grace", type=float, default=1.0,
                    help="on SIGTERM/SIGINT: seconds the gateway keeps serving with readiness "
                         "false before it stops accepting (in-flight requests always finish; "
                         "answers meanwhile close their connection, so keep-alive clients "
                         "reconnect instead of writing into a closing one)")
    up.add_argument("--workdir", default=".", help="where local pods are started from")
    up.add_argument("--pod-user", default="auto",
                    help="who local pods run as: auto (as root: the unprivileged fnplane-pod, "
                         "created on first use, where it can reach the pod's program and "
                         "workdir, else root with a warning), a user name (always), or "
                         "current (as fnplane itself)")
    up.add_argument("--backend", choices=["local", "kubernetes"], default="local",
                    help="where pods run: local processes, or Pods on a Kubernetes cluster")
    up.add_argument("--tls-cert", default=None,
                    help="server certificate (PEM): NATS and Redis then require TLS")
    up.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    up.add_argument("--tls-ca", default=None,
                    help="CA (PEM) every client verifies the servers with")
    up.add_argument("--kubeconfig", default=None,
                    help="with --backend kubernetes: the cluster (default: in-cluster "
                         "service account, else ~/.kube/config)")
    up.add_argument("--model-root", default=None,
                    help="the only directory file:// storage URIs may name (default: "
                         "file:// refused; never the state dir)")
    up.add_argument("--model-hosts", default="",
                    help="comma-separated hosts http(s)/s3/gs storage URIs may name ('*': any "
                         "but loopback and link-local, which must be listed by name)")
    up.add_argument("--node-cache-size", default="20Gi",
                    help="each node's model cache (least recently used models no pod uses "
                         "are evicted to stay within it)")
    up.set_defaults(func=run_up)

    dep = sub.add_parser("deploy", help="create or update a service")
    dep.add_argument("name", nargs="?")
    dep.add_argument("-f", "--file", help="FnService YAML (KServe-like shape)")
    dep.add_argument("--min-scale", "--scale-min", type=int, default=0)
    dep.add_argument("--max-scale", "--scale-max", type=int, default=0)
    dep.add_argument("--initial-scale", "--scale-init", type=int, default=1)
    dep.add_argument("--target-concurrency", "--scale-target", type=float, default=0)
    dep.add_argument("--container-concurrency", "--concurrency-limit", type=int, default=0)
    dep.add_argument("--scale-window", default="60s")
    dep.add_argument("--scale-to-zero-grace", default="30s")
    dep.add_argument("--cpu", default="500m")
    dep.add_argument("--memory", default="256Mi")
    dep.add_argument("--env", "-e", action="append", help="KEY=VALUE for the pod")
    dep.add_argument("--readiness-path", default="/v2/health/ready")
    dep.add_argument("--gpu", type=int, default=0, help="GPUs per pod (nvidia.com/gpu)")
    dep.add_argument("--toleration", action="append", metavar="KEY[=VALUE][:EFFECT]",
                     help="a node taint the pods tolerate, as kubectl writes taints: "
                          "KEY=VALUE:EFFECT (Equal), KEY:EFFECT or KEY (Exists), '*' every "
                          "taint; GPU pods tolerate nvidia.com/gpu:NoSchedule without it")
    # kn's --timeout (timeoutSeconds), and Knative's two other per-request timeouts.
    dep.add_argument("--timeout", default="300s",
                     help="the whole request on the pod, streamed answer included (Knative "
                          "timeoutSeconds; at most 600s)")
    dep.add_argument("--response-start-timeout", default="",
                     help="wait at most this for the pod's first byte (Knative "
                          "responseStartTimeoutSeconds; default: --timeout)")
    dep.add_argument("--idle-timeout", default="0s",
                     help="at most this between two chunks of a streamed answer (Knative "
                          "idleTimeoutSeconds; 0: no limit)")
    dep.add_argument("--readiness-period", default="1s",
                     help="probe a ready pod this often (a pod failing it gets no traffic)")
    dep.add_argument("--readiness-failure-threshold", type=int, default=3,
                     help="failures in a row before a ready pod gets no traffic")
    dep.add_argument("--image", default="",
                     help="container image on the kubernetes backend (default: fnplane's)")
    dep.add_argument("--run-as-user", type=int, default=None,
                     help="the pod's uid on kubernetes (default the fnplane image's 10001; "
                          "0 = root, refused by a `restricted` namespace)")
    dep.add_argument("--run-as-group", type=int, default=None,
                     help="the pod's gid on kubernetes (default 10001)")
    dep.add_argument("--model-version", default="1",
                     help="the version on OIP's versioned paths (/v2/models/NAME/versions/V)")
    dep.add_argument("--storage-uri", default="",
                     help="the model's weights (file://, http(s)://, s3://, gs://), fetched "
                          "into the node's cache and given to the pod in MODEL_DIR")
    dep.add_argument("--storage-sha256", default="",
                     help="the weights' sha256: the cache keys by it and verifies it")
    dep.add_argument("--prefetch", type=int, default=0,
                     help="warm the model on this many nodes before any request")
    dep.add_argument("--max-batch-size", type=int, default=0)
    dep.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    dep.add_argument("--activation-scale", type=int, default=0,
                     help="the fewest pods when scaling from zero (Knative's "
                          "activation-scale; 0 = not set, else >= 2)")
    _add_traffic_flags(dep)
    dep.add_argument("--canary-percent", type=int, default=None, metavar="N",
                     help="the new revision gets N%%, the previous serving one the rest "
                          "(KServe's canaryTrafficPercent)")
    dep.add_argument("--no-wait", action="store_true")
    dep.add_argument("--wait-timeout", type=float, default=120.0)
    dep.add_argument("--command", nargs=argparse.REMAINDER,
                     help="the pod's argv (default: the sample model server)")
    dep.set_defaults(func=run_deploy)

    for name, func, helptext in (
        ("describe", run_describe, "pods, nodes, partition, last cold start"),
        ("delete", run_delete, "delete a service"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("name")
        c.add_argument("--json", action="store_true")
        c.set_defaults(func=func)
        if name == "describe":
            _metrics_url_flag(c)
    tr = sub.add_parser("traffic", help="change a service's traffic split and tags")
    tr.add_argument("name")
    _add_traffic_flags(tr)
    tr.set_defaults(func=run_traffic)
    rb = sub.add_parser("rollback", help="all traffic back to the previous revision that "
                                         "served it all")
    rb.add_argument("name")
    rb.set_defaults(func=run_rollback)
    ls = sub.add_parser("list", help="services: NAME URL LATEST READY")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)
    st = sub.add_parser("status", help="nodes, partitions and owners, instances")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=run_status)
    _metrics_url_flag(st)

    key = sub.add_parser("key", help="API keys of the gateway (with --api-keys / in deploy/)")
    keys = key.add_subparsers(dest="key_command", required=True)
    kc = keys.add_parser("create", help="a new key for a service; printed once")
    kc.add_argument("--service", required=True)
    kc.add_argument("--rps", type=float, default=0.0, help="requests per second (0: no limit)")
    kc.add_argument("--burst", type=int, default=0,
                    help="requests at once after a quiet spell (0: one second's worth)")
    kc.add_argument("--json", action="store_true")
    kc.set_defaults(func=run_key_create)
    kl = keys.add_parser("list", help="keys (ids, never the keys), of one service or all")
    kl.add_argument("--service", default="")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(func=run_key_list)
    kr = keys.add_parser("revoke", help="revoke a key by its id (gateways refuse it at once)")
    kr.add_argument("id")
    kr.set_defaults(func=run_key_revoke)

    cr = sub.add_parser("creds", help="print fresh credentials for deploy/ as Kubernetes Secrets")
    cr.add_argument("target", choices=["k8s"])
    cr.add_argument("--namespace", default="fnplane")
    cr.set_defaults(func=run_creds)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return runner(args.func(args))
    except (CliError, SpecError, ConfigError) as exc:
        print(f"fnplane: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
