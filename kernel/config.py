"""One typed configuration, built at the edge (CLI flags, environment) and handed to
constructors. Sections validate themselves once, so a bad value fails at start with a clear
message rather than deep in a request path."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from kernel.messages import Resources


class ConfigError(ValueError):
    pass


def default_state_dir() -> Path:
    return Path(os.environ.get("FNPLANE_STATE_DIR", Path.home() / ".fnplane"))


DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@dataclass(frozen=True)
class NatsIngressConfig:
    """The activator's NATS side (issue 4): request-reply on `svc.invoke.{service}` and one
    JetStream stream of fire-and-forget events per service on `svc.events.{service}`."""

    enabled: bool = True
    # Activators share `svc.invoke.*` through this queue group.
    queue_group: str = "activator"
    # Work-queue retention: an event leaves its stream once acked (or given up). Events
    # nobody served are kept this long, and at most this many / this many bytes per
    # service, so a service nobody calls cannot fill the disk; beyond the count or bytes a
    # new event is refused (its publisher's JetStream ack says so) rather than an older
    # one silently dropped.
    stream_max_age_s: float = 24 * 3600.0
    stream_max_msgs: int = 100_000
    stream_max_bytes: int = 256 * 1024 * 1024
    # Events one activator serves at once per service; also capped at half its buffer, so a
    # flood of events cannot crowd HTTP and request-reply callers out of it.
    max_in_flight: int = 64
    fetch_batch: int = 16
    fetch_timeout_s: float = 1.0
    # Delivered-but-unacked events per service across all activators (the consumer's bound).
    max_ack_pending: int = 1000
    # 0: twice the activator's request timeout. A slow pod answer is kept from redelivery by
    # in-progress acks; this bounds how long a crashed activator's events stay invisible.
    ack_wait_s: float = 0.0
    # Deliveries of one event (5xx, timeouts) before it is given up with an error reply.
    max_deliver: int = 20
    nak_delay_s: float = 1.0  # doubles per delivery, up to nak_max_delay_s
    nak_max_delay_s: float = 30.0
    # How long stop() lets requests and events in flight finish before cancelling them.
    drain_timeout_s: float = 5.0
    # False: keep the streams and report their lag as demand, but serve no events (another
    # consumer works them; tests use it to see lag alone wake a service).
    consume_events: bool = True

    def __post_init__(self) -> None:
        if self.stream_max_age_s <= 0 or self.stream_max_msgs < 1 or self.stream_max_bytes < 1:
            raise ConfigError("event streams need a max age > 0, max msgs and bytes >= 1")
        if self.max_in_flight < 1 or self.fetch_batch < 1 or self.max_ack_pending < 1:
            raise ConfigError("events in flight, fetch batch and max ack pending must be >= 1")
        if self.fetch_timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ConfigError("fetch timeout must be > 0 and drain timeout >= 0")
        if self.ack_wait_s < 0 or self.max_deliver < 1:
            raise ConfigError("ack wait must be >= 0 (0: derived) and max deliver >= 1")
        if self.nak_delay_s < 0 or self.nak_max_delay_s < self.nak_delay_s:
            raise ConfigError("nak delays must be >= 0 and max >= the first delay")


@dataclass(frozen=True)
class ApiKeysConfig:
    """Front-door identity (issue 19): with `enabled`, every model request at every ingress
    needs an API key for its service (`fnplane key create`), within the key's rate limit.
    Off on the embedded default (`fnplane up --api-keys` turns it on), on in deploy/."""

    enabled: bool = False
    # How long a gateway trusts what it read of a key (a miss too) before reading it again;
    # a revocation reaches gateways at once over NATS, this bounds it if that is lost.
    cache_ttl_s: float = 5.0

    def __post_init__(self) -> None:
        if self.cache_ttl_s < 0:
            raise ConfigError("API key cache TTL must be >= 0")


@dataclass(frozen=True)
class ActivatorConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Bounded per-service buffer (Knative's activator capacity is per pod; an unbounded
    # buffer is knative/serving#13583). Beyond it: 503 with Retry-After.
    buffer_size: int = 1000
    # How long a buffered request may wait for a pod before it gets a 503.
    request_timeout_s: float = 60.0
    # How long a proxied request may take on the pod when no service spec says (each
    # service's Knative timeouts, ServiceSpec.timeout_s and the rest, govern its requests).
    pod_timeout_s: float = 300.0
    max_body_bytes: int = 16 * 1024 * 1024
    metrics_interval_s: float = 1.0
    retry_after_s: int = 1
    nats: NatsIngressConfig = field(default_factory=NatsIngressConfig)
    # The hard gateway (activator/listener.py). A request's headers must arrive within
    # header_timeout_s of its first byte (of the accept, for a connection's first request),
    # its body within body_timeout_s of its headers: a trickling client is cut (408) and
    # holds no connection slot. An idle keep-alive connection is closed after
    # keepalive_timeout_s (longer than common clients' pool idle, so they close first).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 30.0
    # Connections beyond this are answered 503 and closed at once. At start it is lowered
    # to fit the open-files limit: each connection may hold a second descriptor to a pod,
    # and fd_reserve descriptors stay free for the rest of the process (pod spawning,
    # NATS, Redis, logs), so a flood of clients cannot starve the node agents.
    max_connections: int = 4096
    fd_reserve: int = 1024
    # Total bytes of request bodies held at once; a request beyond it gets 503 with
    # Retry-After instead of more memory.
    max_body_bytes_in_flight: int = 64 * 1024 * 1024
    # On stop: how long readiness reports false while the listener still serves (so load
    # balancers stop sending), then how long in-flight requests may take to finish.
    drain_grace_s: float = 0.0
    drain_timeout_s: float = 30.0
    # Gateway workers sharing the port (SO_REUSEPORT), and which one this is. As Knative
    # divides a revision's capacity among its activators, each worker gets 1/workers of
    # every pod's container concurrency and of each service's buffer, so the pod's limit
    # and the buffer bound hold across all of them.
    workers: int = 1
    worker: int = 0
    # The Open Inference Protocol over gRPC (activator/oipgrpc/) on its own port: -1 none
    # (a bare Config opens no port it was not asked for), 0 any free one. `fnplane up`
    # serves it on 8081 (KServe's gRPC port) unless told otherwise.
    grpc_port: int = -1
    keys: ApiKeysConfig = field(default_factory=ApiKeysConfig)

    def __post_init__(self) -> None:
        if self.workers < 1 or not 0 <= self.worker < self.workers:
            raise ConfigError("gateway workers must be >= 1, the worker index below them")
        if not -1 <= self.grpc_port < 65536:
            raise ConfigError(f"gRPC port {self.grpc_port} out of range (-1: none, 0: any free)")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"activator port {self.port} out of range")
        if self.buffer_size < 1:
            raise ConfigError("activator buffer size must be >= 1")
        if self.request_timeout_s <= 0 or self.pod_timeout_s <= 0:
            raise ConfigError("activator timeouts must be > 0")
        if min(self.header_timeout_s, self.body_timeout_s, self.keepalive_timeout_s) <= 0:
            raise ConfigError("activator header, body and keep-alive timeouts must be > 0")
        if self.max_connections < 1 or self.fd_reserve < 0:
            raise ConfigError("activator max connections must be >= 1, fd reserve >= 0")
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ConfigError("bodies in flight must allow at least one body of max size")
        if self.drain_grace_s < 0 or self.drain_timeout_s < 0:
            raise ConfigError("activator drain grace and timeout must be >= 0")
        if self.nats.ack_wait_s and self.nats.ack_wait_s <= self.request_timeout_s:
            # An event waiting in the buffer for a pod would be redelivered meanwhile.
            raise ConfigError("events ack wait must exceed the activator's request timeout")


@dataclass(frozen=True)
class ScaleConfig:
    # How often the autoscaler re-evaluates every service (Knative ticks every 2 s; demand
    # from the activator triggers an immediate evaluation regardless).
    tick_s: float = 0.5
    place_timeout_s: float = 5.0
    # Knative's max-scale-limit, with a bound by default: no service runs more pods than
    # this, whatever its max-scale says (0 there means "up to this"), so one runaway demand
    # report cannot take the whole cluster. 0 here: no limit, as Knative's default.
    max_scale_limit: int = 100

    def __post_init__(self) -> None:
        if self.tick_s <= 0 or self.place_timeout_s <= 0 or self.max_scale_limit < 0:
            raise ConfigError("scale tick and place timeout must be > 0, max-scale limit >= 0")


@dataclass(frozen=True)
class ScheduleConfig:
    probe_cache_ttl_s: float = 2.0
    max_probes: int = 3
    reserve_timeout_s: float = 1.0
    # The sampling (Sparrow-like) baseline of the scheduler benchmark: nodes probed per
    # try, tries per placement, and its random seed (None: a fresh one).
    sampling_d: int = 2
    sampling_max_tries: int = 4
    sampling_seed: int | None = None
    # Prefer nodes that cache the pod's model (partitions/view.py). Off only to measure what
    # locality buys (loadtests/coldstart.py's cycling scenario, on versus off).
    locality: bool = True

    def __post_init__(self) -> None:
        if self.probe_cache_ttl_s <= 0 or self.reserve_timeout_s <= 0 or self.max_probes < 0:
            raise ConfigError("probe cache TTL and reserve timeout must be > 0, probes >= 0")
        if self.sampling_d < 1 or self.sampling_max_tries < 1:
            raise ConfigError("sampling d and max tries must be >= 1")


@dataclass(frozen=True)
class NodesConfig:
    count: int = 2
    capacity: Resources = Resources(cpu=4.0, memory_mb=8192, gpu=0)
    backend: str = "local"
    # Where pods are started from: the sample's `python -m examples.sample.server` resolves
    # against this directory.
    workdir: Path = field(default_factory=lambda: Path.cwd())
    # The user local pods run as (partitions/agents/podusers.py): "auto" (as root: the
    # unprivileged `fnplane-pod` where the pod's program and workdir are within its reach,
    # else root, said loudly), a user name (always; a pod it cannot start fails), or
    # "current" (as fnplane itself).
    pod_user: str = "auto"
    # The nice value local pods start with (0-19; 0: as fnplane itself). Pods yield the CPU
    # to the control plane that places, probes and routes them, as a kubelet gives pods
    # cpu.shares by their request (0.1 cpu: 102 of 1024, about nice 10's weight) and keeps the
    # rest for the system: 100 pods starting at once at nice 0 starved the embedded stack on
    # 2 cores until its instances missed heartbeats and requests failed. The price: on a
    # machine shared with other work, pods yield to that work too (slower cold starts).
    pod_nice: int = 10
    # The model cache (partitions/modelcache/): where `file://` storage URIs may point (None:
    # file:// refused), the hosts http(s)/s3/gs URIs may name ('*': any but loopback and
    # link-local), each node's cache size, and the bounds of one fetch. The cache lives in
    # `model_cache_dir` (None: <state-dir>/models), one directory per node.
    model_root: Path | None = None
    model_hosts: tuple[str, ...] = ()
    node_cache_bytes: int = 20 * 1024**3
    model_max_bytes: int = 20 * 1024**3
    model_fetch_timeout_s: float = 600.0
    model_cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.node_cache_bytes < 1 or self.model_max_bytes < 1:
            raise ConfigError("node cache size and model size limit must be >= 1 byte")
        if self.model_fetch_timeout_s <= 0:
            raise ConfigError("model fetch timeout must be > 0")
        if self.count < 1:
            raise ConfigError("need at least one node")
        if not 0 <= self.pod_nice <= 19:
            raise ConfigError(f"pod nice {self.pod_nice}: expected 0 to 19")
        if not self.pod_user or self.pod_user.strip() != self.pod_user:
            raise ConfigError(f"pod user {self.pod_user!r}: expected auto, current or a name")


@dataclass(frozen=True)
class CoordinatorConfig:
    heartbeat_interval_s: float = 0.25
    # An instance silent for this long is declared dead and its partition reassigned.
    heartbeat_timeout_s: float = 1.0
    # `schedule` scales between these with its load.
    schedule_min: int = 1
    schedule_max: int = 4
    schedule_target_rps: float = 500.0
    # `scale` and `route` are sharded by service (kernel/shards.py) and scale between these
    # on their own load: demand reports and pod events per second for `scale`, endpoint
    # updates per second for `route`, per instance.
    scale_min: int = 1
    scale_max: int = 4
    scale_target_rps: float = 2000.0
    route_min: int = 1
    route_max: int = 4
    route_target_rps: float = 500.0
    runtime: str = "tasks"  # or "processes": one OS process per instance
    # A node known from the stored partition map that does not register again within this
    # long after a restart is gone: it leaves its partition (`up --nodes 3`, then `--nodes 2`).
    node_register_timeout_s: float = 10.0
    # A registered node no agent has said is alive for this long (agents say so every
    # second) leaves its partition, and its pods are reported lost to `route` and `scale`.
    node_heartbeat_timeout_s: float = 5.0
    # Revisions kept per service that no traffic target names (for rollback); those a split
    # or a tag names are always kept, so a service may hold more while they are routed.
    revision_history: int = 10


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the bus and the state store (issue 10). `cert` and `key` are what the servers
    `fnplane up` starts present; `ca` is what every client trusts. A client-only config (a
    component reaching servers someone else runs) needs only `ca`."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("TLS needs a certificate and its key together")
        if self.cert is not None and self.ca is None:
            # Our own clients must verify the server they reach; nothing may skip that.
            raise ConfigError("TLS needs the CA that signed the server certificate")

    @property
    def serves(self) -> bool:
        """True when the servers fnplane starts itself speak TLS."""
        return self.cert is not None

    def client_context(self) -> ssl.SSLContext | None:
        """What a client verifies the servers with; None without TLS. Hostnames are checked:
        the servers' certificate must name the host clients dial (127.0.0.1 for `up`)."""
        if self.ca is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca))


@dataclass(frozen=True)
class MetricsConfig:
    """Each process's metrics port (kernel/metricsport.py): 0 takes a free port (several
    processes share a host under `fnplane up`), -1 opens none. On Kubernetes each pod has
    its own address, so every Deployment sets the same fixed port."""

    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        if not -1 <= self.port < 65536:
            raise ConfigError(f"metrics port {self.port} out of range (-1: none, 0: any free)")


@dataclass(frozen=True)
class Config:
    nats_url: str = DEFAULT_NATS_URL
    redis_url: str = "redis://127.0.0.1:6379/0"
    state_dir: Path = field(default_factory=default_state_dir)
    activator: ActivatorConfig = field(default_factory=ActivatorConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    nodes: NodesConfig = field(default_factory=NodesConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    trace_file: Path | None = None
    # The components' NATS credentials (kernel/identity.py), None where NATS has no
    # authorization. `fnplane up` makes them in its state dir.
    credentials: Path | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# ---- one Config across processes -------------------------------------------------------------
# A child process (an instance started by the process runtime) gets the parent's whole Config
# as JSON, so every setting reaches it, not just the few a command line would carry.


def _enc(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__} in a Config")


def _dec(kind: type, obj: object) -> object:
    if kind is Path and isinstance(obj, str):
        return Path(obj)
    raise NotImplementedError(f"cannot decode {kind} in a Config")


def dumps(config: Config) -> str:
    return msgspec.json.encode(config, enc_hook=_enc).decode()


def loads(text: str) -> Config:
    """Validated as it decodes (every section's `__post_init__` runs): bad JSON or a bad
    value is a `ConfigError`, never a half-read Config."""
    try:
        return msgspec.json.decode(text, type=Config, dec_hook=_dec)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"invalid fnplane config: {exc}") from None
