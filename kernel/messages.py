"""Every message that crosses NATS, and every record kept in Redis, defined once.

Structs are msgpack-encoded, tagged (a payload of another kind fails to decode with a clear
error instead of being guessed at) and keyword-only (a call names every field it sets).
`SCHEMA_VERSION` travels in the `Fnplane-Schema` header of every message that has headers
(trace context, errors); a message without headers is of the current major version, so a
later major version must always send the header. A receiver refuses a major version it does
not know.
"""

from __future__ import annotations

import re
from typing import Literal, TypeVar

import msgspec

from kernel.errors import ErrorCode

SCHEMA_VERSION = "2"

T = TypeVar("T")

# How gateways reach a service's pods: through the activator, or straight (direct).
ServingMode = Literal["proxy", "direct"]
# `unready`: a pod that was ready and is alive, but must get no traffic now (its readiness
# probe fails, or its node is NotReady); it may become `ready` again. `route` withdraws it,
# `scale` still counts it (as Knative counts not-ready pods as pending, not gone).
PodState = Literal["starting", "ready", "unready", "terminating", "stopped", "failed"]
InstanceKind = Literal["scale", "schedule", "route", "activator", "node", "central", "sampling"]

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# A model version is one path segment of the Open Inference Protocol's versioned paths
# (`/v2/models/{m}/versions/{v}/infer`): Triton's are numbers, others' may be names.
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


# Kubernetes' qualified names (label keys): an optional DNS-subdomain prefix and '/', then a
# name of at most 63 characters, alphanumeric at both ends; label values are such names.
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix)):
        return False
    return bool(_LABEL_NAME_RE.match(name))


class SpecError(ValueError):
    """A service spec a user sent is invalid; the message says which field and why."""


class Resources(msgspec.Struct, frozen=True, kw_only=True):
    """Requests of one pod, or free/total capacity of a node; cpu in cores, memory in MiB."""

    cpu: float = 0.0
    memory_mb: int = 0
    gpu: int = 0

    def fits_in(self, free: Resources) -> bool:
        return (
            self.cpu <= free.cpu + 1e-9
            and self.memory_mb <= free.memory_mb
            and self.gpu <= free.gpu
        )

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            cpu=round(self.cpu + other.cpu, 6),
            memory_mb=self.memory_mb + other.memory_mb,
            gpu=self.gpu + other.gpu,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            cpu=round(self.cpu - other.cpu, 6),
            memory_mb=self.memory_mb - other.memory_mb,
            gpu=self.gpu - other.gpu,
        )


# ---- taints and tolerations (Kubernetes' shape and meaning, core/v1) -------------------------

TaintEffect = Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]


class Taint(msgspec.Struct, frozen=True, kw_only=True):
    """A node's taint, as Kubernetes' `spec.taints[]`: pods that do not tolerate a
    `NoSchedule` or `NoExecute` one are not placed on the node (`PreferNoSchedule` only
    asks the scheduler to avoid it)."""

    key: str
    value: str = ""
    effect: TaintEffect


class Toleration(msgspec.Struct, frozen=True, kw_only=True):
    """A pod's toleration, as Kubernetes' `spec.tolerations[]`: an empty key with `Exists`
    tolerates every taint, an empty effect every effect; `Equal` compares the value.
    `toleration_seconds` only bounds how long a `NoExecute` taint is tolerated on
    Kubernetes (its eviction); placement ignores it, as kube-scheduler does."""

    key: str = ""
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str = ""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    toleration_seconds: int | None = None

    def check(self, where: str) -> None:
        """Refuse what the API server's validation refuses, so no pod is created with it."""
        if self.key and not _label_key(self.key):
            raise SpecError(f"{where}: key {self.key!r}: expected a label key "
                            "([prefix/]name, e.g. nvidia.com/gpu)")
        if self.value and not _LABEL_NAME_RE.match(self.value):
            raise SpecError(f"{where}: value {self.value!r}: expected a label value "
                            "(letters, digits, '-', '_', '.'; at most 63)")
        if not self.key and self.operator != "Exists":
            raise SpecError(f"{where}: an empty key tolerates every taint only with "
                            "operator Exists")
        if self.operator == "Exists" and self.value:
            raise SpecError(f"{where}: operator Exists takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise SpecError(f"{where}: tolerationSeconds needs effect NoExecute")


class ScalingSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Knative KPA knobs, same names and defaults (pkg/autoscaler/config/config.go)."""

    min_scale: int = 0
    max_scale: int = 0  # 0 = unbounded, as Knative
    initial_scale: int = 1
    # Knative's target annotation. None: not declared, so the container concurrency, or
    # container-concurrency-target-default (100) when that is unlimited (ResolveMetricTarget).
    target_concurrency: float | None = None
    target_utilization: float = 0.7
    metric: Literal["concurrency", "rps"] = "concurrency"
    target_rps: float = 200.0
    stable_window_s: float = 60.0
    panic_window_pct: float = 10.0
    panic_threshold_pct: float = 200.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    scale_down_delay_s: float = 0.0
    scale_to_zero_grace_s: float = 30.0
    target_burst_capacity: float = 211.0  # -1: activator always in path, 0: only at zero
    # Knative's activation-scale: the fewest pods a service scales to from zero or whenever
    # it has demand (0: not set; else >= 2, between min-scale and max-scale).
    activation_scale: int = 0


class BatchingSpec(msgspec.Struct, frozen=True, kw_only=True):
    max_batch_size: int = 0  # 0 = no micro-batching
    max_wait_ms: float = 5.0


class TrafficTarget(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a service's traffic block, as Knative's Route `traffic[]`: `percent` of
    the service's requests go to `revision` (`NAME-0000N`); `tag` makes it reachable alone
    (header `X-Fnplane-Tag`); `latest` makes the target follow the newest revision, as
    Knative's `latestRevision: true`, so the next deploy moves this share to it."""

    revision: str
    percent: int = 0
    tag: str = ""
    latest: bool = False


# Knative's `serving.knative.dev/routingState`: a revision no traffic target names (no
# percent, no tag) is `reserve` and scales to zero whatever its min-scale.
RoutingState = Literal["active", "reserve"]
# Knative's max-revision-timeout-seconds: no request timeout above it.
MAX_TIMEOUT_S = 600.0


def _check_timeouts(s: ServiceSpec) -> None:
    """Knative's bounds (revision_validation.go): each in (0, max]; the first byte cannot be
    waited for longer than the whole request may take."""
    if not 0 < s.timeout_s <= MAX_TIMEOUT_S:
        raise SpecError(f"timeoutSeconds must be in (0, {MAX_TIMEOUT_S:g}]")
    start = s.response_start_timeout_s
    if start is not None and not 0 < start <= s.timeout_s:
        raise SpecError("responseStartTimeoutSeconds must be > 0 and <= timeoutSeconds")
    if not 0 <= s.idle_timeout_s <= MAX_TIMEOUT_S:
        raise SpecError(f"idleTimeoutSeconds must be in [0, {MAX_TIMEOUT_S:g}] (0: no limit)")


class ServiceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A user's inference deployment. `command` is the pod's argv (Knative runtime contract).

    A deployed service is the template plus its revisions: the registry keeps each pod
    template as an immutable revision spec (`name` = `NAME-0000N`, `revision_of` = NAME),
    which `scale`, `schedule` and `route` treat exactly as a service of that name; the
    service's own spec then carries the traffic block (`traffic`, `revisions`) and is what
    clients call. A spec with no `revisions` is a plain service, scaled under its own name.
    """

    name: str
    command: list[str]
    env: dict[str, str] = {}
    resources: Resources = Resources(cpu=0.5, memory_mb=256)
    scaling: ScalingSpec = ScalingSpec()
    container_concurrency: int = 0  # 0 = unlimited, as Knative
    readiness_path: str = "/v2/health/ready"
    startup_timeout_s: float = 60.0
    model: str = ""  # weights identity, for cache locality; defaults to the name
    batching: BatchingSpec = BatchingSpec()
    generation: int = 0
    # The container image on Kubernetes ("" = the backend's default image, which carries the
    # sample model). The local backend runs `command` on this machine and ignores it.
    image: str = ""
    # The model version the service answers to on the versioned OIP paths; any other version
    # of it is unknown (404). One per service: a new version is a new generation of it.
    model_version: str = "1"
    # The user and group the container runs as on Kubernetes (None: the backend's default,
    # the fnplane image's 10001). Set explicitly because pods run with runAsNonRoot: an
    # image whose USER is root (most inference servers) would fail CreateContainerConfigError
    # without a numeric runAsUser; 0 asks for root, which a `restricted` namespace refuses.
    run_as_user: int | None = None
    run_as_group: int | None = None
    # KServe's modelFormat ("name" or "name:version"), a description: fnplane picks no
    # serving runtime by it (controlplane/specfile.py).
    model_format: str = ""
    # Node taints the service's pods tolerate (Kubernetes' tolerations). Pods that request
    # a GPU also tolerate the GPU taints GPU node pools carry (partitions/tolerations.py).
    tolerations: list[Toleration] = []
    # The readiness probe once the pod is ready (Kubernetes' `periodSeconds` and
    # `failureThreshold`): probed every period, `unready` after that many failures in a row,
    # `ready` again at the first success. Kubernetes' default period is 10 s; fnplane's 1 s
    # is what its Pods on Kubernetes always had, so a sick pod leaves the route in seconds.
    readiness_period_s: float = 1.0
    readiness_failure_threshold: int = 3
    # Where the weights are (KServe's storageUri: file://, http(s)://, s3:// or gs:// where
    # their fsspec packages are installed): the node fetches them into its model cache and
    # hands the pod a read-only directory in MODEL_DIR ("" = the pod loads its own).
    storage_uri: str = ""
    # The weights' sha256, when the user knows it: the cache keys by it and verifies it.
    storage_sha256: str = ""
    # Warm the model on this many nodes (chosen by `schedule`) before any request.
    prefetch: int = 0
    # ---- revisions (set by the registry, never by a user; kernel/revisions.py) ----
    # On a revision's spec: the service it is a revision of, and whether any traffic target
    # names it (`reserve`: no percent, no tag, so it scales to zero whatever its min-scale).
    revision_of: str = ""
    routing_state: RoutingState = "active"
    # On a service's spec: its live revisions (oldest first), the newest one, the traffic
    # block, and the revisions that once held 100% (for `rollback`), newest last.
    revisions: list[str] = []
    latest_revision: str = ""
    traffic: list[TrafficTarget] = []
    promoted: list[str] = []
    # Knative's per-request timeouts (RevisionSpec timeoutSeconds, responseStartTimeoutSeconds,
    # idleTimeoutSeconds; config-defaults' revision-*-timeout-seconds): the whole request on
    # the pod, its first byte, the gap between two chunks of its answer. Response start
    # unset is timeoutSeconds and idle 0 is no limit, as Knative's defaults; each expiry is
    # a 504 (activator/timeouts.py). A streamed answer (SSE, chunked) is bounded by all three.
    timeout_s: float = 300.0
    response_start_timeout_s: float | None = None
    idle_timeout_s: float = 0.0

    def validate(self) -> ServiceSpec:
        """Refuse specs the control plane cannot honour, before anything is stored."""
        s, sc = self, self.scaling
        if not _NAME_RE.match(s.name):
            raise SpecError(
                f"name {s.name!r}: must be a DNS label (lowercase letters, digits, '-', 1-63)"
            )
        if not s.command or not all(isinstance(a, str) and a for a in s.command):
            raise SpecError("command: must be a non-empty list of non-empty strings")
        if s.resources.cpu <= 0 or s.resources.memory_mb <= 0 or s.resources.gpu < 0:
            raise SpecError("resources: cpu and memory must be > 0, gpu >= 0")
        if sc.min_scale < 0 or sc.max_scale < 0:
            raise SpecError("min-scale and max-scale must be >= 0")
        if sc.max_scale and sc.min_scale > sc.max_scale:
            raise SpecError(f"min-scale {sc.min_scale} > max-scale {sc.max_scale}")
        if sc.initial_scale < 0:
            raise SpecError("initial-scale must be >= 0")
        if sc.activation_scale:  # as Knative's annotation_validation.go validateMinMaxScale
            if sc.min_scale > sc.activation_scale:
                raise SpecError(f"min-scale {sc.min_scale} > activation-scale "
                                f"{sc.activation_scale}")
            if sc.max_scale and sc.max_scale < sc.activation_scale:
                raise SpecError(f"max-scale {sc.max_scale} < activation-scale "
                                f"{sc.activation_scale}")
            if sc.activation_scale < 2:
                raise SpecError("activation-scale must be >= 2 (0 = not set)")
        if (sc.target_concurrency is not None and sc.target_concurrency <= 0) or (
                sc.target_rps <= 0 or not 0 < sc.target_utilization <= 1):
            raise SpecError("target concurrency/rps must be > 0 and utilization in (0, 1]")
        if sc.stable_window_s < 6 or sc.stable_window_s > 3600:
            raise SpecError("scale window must be between 6s and 1h (as Knative)")
        if sc.scale_to_zero_grace_s < 0 or sc.scale_down_delay_s < 0:
            raise SpecError("scale-to-zero grace and scale-down delay must be >= 0")
        if sc.max_scale_up_rate <= 1 or sc.max_scale_down_rate <= 1:
            raise SpecError("max scale-up/down rates must be > 1")
        if s.container_concurrency < 0:
            raise SpecError("container-concurrency must be >= 0 (0 = unlimited)")
        if not s.readiness_path.startswith("/"):
            raise SpecError("readiness path must start with '/'")
        if s.startup_timeout_s <= 0:
            raise SpecError("startup timeout must be > 0")
        if s.readiness_period_s <= 0 or s.readiness_failure_threshold < 1:
            raise SpecError("readiness probe: period must be > 0 and failure threshold >= 1")
        if s.batching.max_batch_size < 0 or s.batching.max_wait_ms < 0:
            raise SpecError("batching: max batch size and max wait must be >= 0")
        if (s.run_as_user is not None and s.run_as_user < 0) or (
                s.run_as_group is not None and s.run_as_group < 0):
            raise SpecError("run-as user and group must be ids >= 0")
        if not _VERSION_RE.match(s.model_version):
            raise SpecError(f"model version {s.model_version!r}: letters, digits, '.', '_', '-'"
                            " (1-63), starting with a letter or digit")
        for i, toleration in enumerate(s.tolerations):
            toleration.check(f"tolerations[{i}]")
        if s.storage_uri and "://" not in s.storage_uri:
            raise SpecError(f"storage URI {s.storage_uri!r}: expected SCHEME://PATH "
                            "(file://, http://, https://, s3://, gs://)")
        if s.storage_sha256 and not re.fullmatch(r"[0-9a-f]{64}", s.storage_sha256):
            raise SpecError("storage sha256: expected 64 lowercase hex digits")
        if s.prefetch < 0:
            raise SpecError("prefetch must be >= 0 (nodes to warm the model on)")
        if s.prefetch and not s.storage_uri:
            raise SpecError("prefetch needs a storage URI (the weights to warm)")
        _check_timeouts(s)
        return self

    @property
    def model_id(self) -> str:
        """The weights' identity for cache locality: what nodes report they cache (the
        storage URI, when the node fetches the weights itself)."""
        return self.model or self.storage_uri or self.name


# ---- node inventory and partitions -------------------------------------------------------


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A machine pods can run on; `models` are the weights already in its cache."""

    name: str
    capacity: Resources
    labels: dict[str, str] = {}
    models: list[str] = []
    backend: str = "local"
    taints: list[Taint] = []
    # The device indices of its GPUs (`capacity.gpu` of them; empty: 0 to gpu-1). `schedule`
    # assigns each GPU pod its own, so two pods never share a GPU by accident; a local
    # node hands them to the pod as CUDA_VISIBLE_DEVICES (on Kubernetes the device plugin
    # picks the devices, and these indices are only accounting).
    gpu_devices: list[int] = []
    # Bytes each model of `models` takes in the node's cache, where the node has a real
    # cache (partitions/modelcache/): what `fnplane describe` shows.
    model_bytes: dict[str, int] = {}


class NodeRegistration(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Node backend → coordinator, at start: these nodes exist and can take pods (a `sim`
    backend registers thousands in one message)."""

    infos: list[NodeInfo]


class NodesAlive(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Node agent → coordinator, every second: these nodes of mine are alive. One message per
    agent (a `sim` agent names thousands), so liveness costs one message per agent, not per
    node; a node named in none of them for `node_heartbeat_timeout_s` leaves its partition."""

    agent: str
    nodes: list[str]
    # Node → model → bytes of what its model cache holds now, for nodes with a real cache:
    # the coordinator puts it in their NodeInfo, so `schedule` scores what is really there.
    caches: dict[str, dict[str, int]] = {}


class UnknownNodes(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """The coordinator's answer to `NodesAlive`: of the nodes named, those it does not know
    (it restarted, or took them for lost while their agent was silent). The agent registers
    them again and announces their pods again."""

    nodes: list[str] = []


class NodesLost(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Coordinator → `route`, `scale`: these nodes left the partition map (their agent went
    silent, or never registered again after a restart). Their pods are gone as far as the
    control plane knows: `route` stops routing to them, `scale` replaces them. The
    coordinator says so because nobody else can: a silent agent reports nothing."""

    nodes: list[str]
    reason: str = ""


class InventoryRequest(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """A new partition owner asks the nodes it was given what they already run."""

    nodes: list[str]


class PodAllocation(msgspec.Struct, frozen=True, kw_only=True):
    pod: str
    service: str
    resources: Resources
    gpu_devices: list[int] = []  # the GPU devices the pod was given (StartPod.gpu_devices)


class Inventory(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    pods: dict[str, list[PodAllocation]]  # node → pods running or starting there


class Partition(msgspec.Struct, frozen=True, kw_only=True):
    """A disjoint set of nodes with one owner; `epoch` fences a stale owner's writes."""

    id: int
    epoch: int
    owner: str  # schedule instance id, "" while unowned
    nodes: list[str]


class PartitionMap(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    version: int
    partitions: list[Partition]
    nodes: dict[str, NodeInfo] = {}


class Shard(msgspec.Struct, frozen=True, kw_only=True):
    """Services whose `shard_of(name)` is `id` (kernel/shards.py), owned by one instance of
    a function; `epoch` fences a stale owner, as a partition's does."""

    id: int
    epoch: int
    owner: str  # instance id, "" while unowned


class ShardMap(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Coordinator → `scale`, `route`, activators, nodes, `schedule`: which instance of each
    sharded function (`scale`, `route`) owns which service shard, and with which epoch."""

    version: int
    count: int
    shards: dict[str, list[Shard]] = {}  # function kind → its `count` shards, by id

    def owned_by(self, kind: str, instance: str) -> dict[int, int]:
        """shard id → epoch, for the shards `instance` owns."""
        return {s.id: s.epoch for s in self.shards.get(kind, []) if s.owner == instance}


# ---- control-function messages -------------------------------------------------------------


class Demand(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Activator → scale: what one activator sees of a service right now.

    Sent at once when a request is buffered for a service with no ready pod (`urgent`),
    and on every metrics tick otherwise.
    """

    service: str
    reporter: str  # the activator's id, or the node agent's (`node:NAME`) for pod counts
    buffered: int
    in_flight: int
    requests: int  # requests admitted since the previous report, for the RPS mode
    ts: float
    urgent: bool = False
    # "activator": buffered + proxied + sent direct by a gateway; "pods": in flight as the
    # pods themselves count it (node agents scrape them). scale takes the larger of the two
    # sums, since both count the same requests whenever traffic passes a gateway.
    source: Literal["activator", "pods"] = "activator"


class ServiceMode(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """scale → route: whether gateways send straight to pods (enough spare capacity, by
    Knative's excess-burst-capacity rule) or through the activator."""

    service: str
    mode: ServingMode
    excess_burst_capacity: float = 0.0
    epoch: int = 0  # the sender's epoch of the service's `scale` shard (fencing)


class PlaceRequest(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """scale → schedule: find a node for one new pod of a service. The spec travels along
    so the node can start the pod without another round trip to the registry."""

    pod: str
    spec: ServiceSpec
    requested_at: float
    # The sender's epoch of the service's `scale` shard: `schedule` refuses an older one, so
    # a `scale` instance that lost the shard cannot add pods to it.
    epoch: int = 0

    @property
    def service(self) -> str:
        return self.spec.name

    @property
    def resources(self) -> Resources:
        return self.spec.resources

    @property
    def model(self) -> str:
        return self.spec.model_id


class PartitionSummary(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """An owner's view of its partition's free capacity, for other instances' probe caches."""

    partition: int
    epoch: int
    owner: str
    free: Resources
    largest_free: Resources  # free resources of the emptiest node: the biggest pod that fits
    nodes: int = 0
    # Whether the owner takes placements from the queue group (it steps aside while full):
    # an instance steps aside only for a peer that does, so the group is never left empty
    # by two full partitions each counting on the other.
    serving: bool = True


class Placement(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    pod: str
    service: str
    node: str
    partition: int
    epoch: int
    decided_at: float
    probes: int = 0
    summary: PartitionSummary | None = None  # piggybacked for the asker's probe cache


class Unschedulable(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    pod: str
    service: str
    reason: str
    probes: int = 0


class ReserveRequest(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """schedule → the owner of another partition: place this pod in your partition, or refuse
    with your current summary. `epoch` is the epoch the asker's cache saw, for diagnosis."""

    place: PlaceRequest
    asker: str
    epoch: int = 0
    # Wall-clock time after which the asker has given up: the owner must not commit then.
    deadline: float = 0.0


class Refused(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    pod: str
    partition: int
    reason: str
    summary: PartitionSummary | None = None
    stale: bool = False  # a node refused our epoch: our map is behind


class StartPod(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """schedule → node backend: run one pod of a service on this node. `partition` and
    `epoch` fence a stale owner: a node refuses a start from an epoch older than it knows."""

    pod: str
    spec: ServiceSpec
    node: str
    requested_at: float
    placed_at: float
    partition: int = -1
    epoch: int = 0
    # The node's GPU devices `schedule` assigned the pod (one per GPU it requests).
    gpu_devices: list[int] = []


class PrefetchModel(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Registry → a node: fetch this service's weights into your cache now, before any
    request (`prefetch`); answered at once, the download goes on in the node."""

    service: str
    storage_uri: str
    sha256: str = ""


class StopPod(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    pod: str
    service: str
    reason: str = "scale-down"
    epoch: int = 0  # the sender's `scale` shard epoch; a node refuses an older one


class PodTimeline(msgspec.Struct, frozen=True, kw_only=True):
    """Wall-clock stamps of one pod's cold start, for the breakdown `describe` shows."""

    requested_at: float = 0.0
    placed_at: float = 0.0
    # When the weights were in the node's cache (0: the pod fetches none).
    fetched_at: float = 0.0
    spawned_at: float = 0.0
    ready_at: float = 0.0


class PodEvent(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Node backend → scale, schedule, route: a pod changed state."""

    pod: str
    service: str
    node: str
    state: PodState
    url: str = ""
    container_concurrency: int = 0
    resources: Resources = Resources()
    timeline: PodTimeline = PodTimeline()
    reason: str = ""
    log_tail: str = ""
    ts: float = 0.0
    model: str = ""  # the weights the pod loaded, for schedule's cache locality
    # The user the pod's processes run as (local nodes), and why when it is fnplane's own
    # though a pod user was wanted: `fnplane describe` shows it.
    run_as: str = ""


class AnnounceRequest(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """A new shard owner (`scale`, `route`) → every node agent: the live pods of services in
    these shards, to rebuild what the previous owner knew."""

    shards: list[int]
    count: int


class PodsAnnounced(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """A node agent's answer to `AnnounceRequest`: the latest event of each live pod of the
    asked shards on `nodes` (all the nodes it runs, so the asker knows who answered)."""

    nodes: list[str]
    events: list[PodEvent]


class ReclaimQuery(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """A `scale` owner whose service has requests waiting and no room → the other owners:
    your idle pods that could make room (each answers for its own shards)."""

    asker: str


class IdlePod(msgspec.Struct, frozen=True, kw_only=True):
    pod: str
    service: str
    node: str
    resources: Resources
    idle_since: float


class IdlePods(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    owner: str
    pods: list[IdlePod]


class ReclaimRequest(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """→ the owner of a shard: stop these idle pods of yours to make room for `for_service`
    (the owner checks they are still idle and stops only those)."""

    pods: list[str]
    for_service: str


class Reclaimed(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    pods: list[str]  # the pods being stopped


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    pod: str
    url: str
    node: str
    container_concurrency: int
    timeline: PodTimeline = PodTimeline()


class Endpoints(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """route → activators: the full ready set of one service, replacing the previous one.

    `error` is set when the service has no ready pod because its pods fail to start, so
    activators answer buffered requests with a clear 5xx instead of holding them.
    """

    service: str
    version: int  # the sequence within `epoch`
    endpoints: list[Endpoint]
    mode: ServingMode = "proxy"
    error: str = ""
    # The publishing `route` owner's shard epoch: versions compare as (epoch, version), so a
    # new owner's first set is never taken as older than its predecessor's last.
    epoch: int = 0

    @property
    def order(self) -> tuple[int, int]:
        return (self.epoch, self.version)


class RoutingSnapshot(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    services: list[Endpoints]


class ColdStart(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """One cold request, stage by stage (wall clock seconds), as the activator saw it end."""

    service: str
    pod: str
    node: str
    request_in: float
    placement_decided: float
    process_spawned: float
    ready: float
    first_byte_out: float
    trace_id: str = ""
    # When the node had the weights in its cache (0: none to fetch; the stage is then 0).
    weights_fetched: float = 0.0

    @property
    def fetched(self) -> float:
        return self.weights_fetched or self.placement_decided

    def stages_ms(self) -> dict[str, float]:
        def ms(a: float, b: float) -> float:
            return round((b - a) * 1000.0, 1) if a and b else 0.0

        return {
            "request_in->placement_decided": ms(self.request_in, self.placement_decided),
            "placement_decided->weights_fetched": ms(self.placement_decided, self.fetched),
            "weights_fetched->process_spawned": ms(self.fetched, self.process_spawned),
            "process_spawned->ready": ms(self.process_spawned, self.ready),
            "ready->first_byte_out": ms(self.ready, self.first_byte_out),
            "total": ms(self.request_in, self.first_byte_out),
        }


class Heartbeat(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Every control-function instance, every few hundred ms: alive, and how loaded."""

    kind: InstanceKind
    instance: str
    ts: float
    requests_per_s: float = 0.0
    queue_depth: int = 0
    latency_ms_p99: float = 0.0
    partition: int = -1
    epoch: int = 0
    shards: int = 0  # service shards owned (`scale`, `route`)
    # Where its process's metrics port is ("" for none): `fnplane status` lists it, and the
    # CLI scrapes it, since instances come and go where no one else prints their ports.
    metrics_url: str = ""


# ---- admin API (CLI ↔ coordinator) ---------------------------------------------------------


class DeployRequest(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """`traffic` (kn's `--traffic REV=PCT`, `@latest` for the new revision) or
    `canary_percent` (KServe's canaryTrafficPercent) set the split the deploy ends with;
    neither: the traffic block stays, its `latest` targets following the new revision.
    `tags`: revision (or `@latest`) → tag."""

    spec: ServiceSpec
    traffic: list[TrafficTarget] | None = None
    canary_percent: int | None = None
    tags: dict[str, str] = {}


class TrafficRequest(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Change only a service's split and tags (`fnplane traffic`), or move all traffic back
    to the previous revision that served it all (`fnplane rollback`)."""

    name: str
    traffic: list[TrafficTarget] | None = None
    tags: dict[str, str] = {}
    rollback: bool = False


class NameRequest(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    name: str


class Empty(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    pass


class RevisionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One revision as `describe` shows it: its spec as `scale` runs it, its share and tag,
    whether it ever became ready, and why it cannot start when it cannot."""

    spec: ServiceSpec
    percent: int = 0
    tags: list[str] = []
    ready_pods: int = 0
    desired_pods: int = 0
    ready: bool = False
    last_error: str = ""


# ---- API keys (kernel/apikeys.py: what a key is, how it is checked) ----------------------


class ApiKey(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """What may be shown of a key: never its secret nor the secret's hash. `rps` 0: no rate
    limit; `burst`: the bucket's size (requests let through at once after a quiet spell)."""

    id: str
    service: str
    rps: float = 0.0
    burst: int = 0
    created_at: float = 0.0
    revoked_at: float = 0.0  # 0: in force


class StoredKey(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """The Redis record of a key."""

    key: ApiKey
    secret_sha256: str


class KeyCreate(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    service: str
    rps: float = 0.0
    burst: int = 0


class KeyCreated(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """The only message that ever holds the whole key: the CLI shows it once."""

    key: ApiKey
    secret: str  # the whole `fnp_<id>_<secret>`


class KeyQuery(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    service: str = ""  # "": every service's keys


class KeyList(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    keys: list[ApiKey]


class KeyRevoke(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    id: str


class KeyRevoked(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Told to every gateway so none trusts its cached copy of the key any longer."""

    id: str


class ServiceStatus(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    spec: ServiceSpec
    url: str
    ready_pods: int = 0
    desired_pods: int = 0
    pods: list[PodEvent] = []
    last_cold_start: ColdStart | None = None
    last_error: str = ""
    revisions: list[RevisionStatus] = []
    latest_ready_revision: str = ""


class ServiceList(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    services: list[ServiceStatus]


class InstanceInfo(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    instance: str
    last_seen: float
    partition: int = -1
    shards: list[int] = []  # service shards it owns (`scale`, `route`)
    metrics_url: str = ""  # its process's metrics port, as its heartbeat said


class ClusterStatus(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    partitions: PartitionMap
    instances: list[InstanceInfo]
    # The latest summary each partition's owner broadcast: what is free where.
    summaries: list[PartitionSummary] = []
    # The coordinator's view of what the control plane depends on: "up", or why not. NATS
    # is up when this answer arrives at all.
    dependencies: dict[str, str] = {}
    shards: ShardMap | None = None
    metrics_url: str = ""  # the coordinator's process's metrics port ("" for none)


class ErrorReply(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """A typed error on the wire (`kernel.errors`); its HTTP status follows from the code."""

    code: ErrorCode
    message: str


class SpecUpdated(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    spec: ServiceSpec


class ServiceDeleted(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    name: str


class ScaleStatus(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    service: str
    desired: int
    pods: list[PodEvent]
    last_error: str = ""


class NodeFree(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Node backend → the sampling baseline: a probed node's free capacity right now, and
    the models in its cache (for the same locality-first scoring as the other schedulers)."""

    node: str
    free: Resources
    models: list[str] = []


def _tagged() -> tuple[type[msgspec.Struct], ...]:
    return tuple(
        v for v in list(globals().values())
        if isinstance(v, type) and issubclass(v, msgspec.Struct) and v.__struct_config__.tag
    )


# Every message that crosses NATS (each endpoint declares which it takes and answers).
TAGGED = _tagged()

_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def encode_record(obj: msgspec.Struct) -> bytes:
    """Redis records: the same msgpack, so one schema serves the wire and the store."""
    return _encoder.encode(obj)


def decode_record(data: bytes, kind: type[T]) -> T:
    return msgspec.msgpack.decode(data, type=kind)
