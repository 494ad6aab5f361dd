"""Every NATS conversation of fnplane, declared once: subject template, request type, reply
type, queue group, who serves it and who may call it — the shape of nats.py's
`micro.EndpointConfig` plus the types. `Bus.serve` decodes a request with the endpoint's own
msgspec decoder (a payload of another type is counted and answered with `ErrorCode.INVALID`,
never dropped in silence); `Bus.call`/`send`/`gather` build the subject from the template.
The architecture document's table of conversations is generated from `ENDPOINTS` (a test
keeps it in step), and so will the components' NATS permissions be.

Subjects read `fnplane.<what it is about>.<conversation>`: `service.*` for a service's
demand, mode, spec changes, endpoints and routes; `pod.*` for placing pods and their events;
`node.{node}.*` for one node agent and `nodes.*` for all of them; `partition.*` for the map
and its summaries; `shard.*` for the service shard map (`{shard}` in a subject is
`kernel.shards.shard_of(service)`, so only the shard's owner subscribes); `instance.*` for
liveness; `admin.*` for the CLI's API.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kernel.messages import (
    AnnounceRequest,
    ClusterStatus,
    ColdStart,
    Demand,
    DeployRequest,
    Empty,
    Endpoints,
    Heartbeat,
    IdlePods,
    Inventory,
    InventoryRequest,
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyQuery,
    KeyRevoke,
    KeyRevoked,
    NameRequest,
    NodeFree,
    NodeRegistration,
    NodesAlive,
    NodesLost,
    PartitionMap,
    PartitionSummary,
    Placement,
    PlaceRequest,
    PodEvent,
    PodsAnnounced,
    PrefetchModel,
    Reclaimed,
    ReclaimQuery,
    ReclaimRequest,
    Refused,
    ReserveRequest,
    RoutingSnapshot,
    ScaleStatus,
    ServiceDeleted,
    ServiceList,
    ServiceMode,
    ServiceStatus,
    ShardMap,
    SpecUpdated,
    StartPod,
    StopPod,
    TrafficRequest,
    UnknownNodes,
    Unschedulable,
)

Req = TypeVar("Req")
Rep = TypeVar("Rep")

PREFIX = "fnplane"
_PARAM = re.compile(r"\{(\w+)\}")
_TOKEN = re.compile(r"[A-Za-z0-9_\-:]+")  # one subject token: no '.', spaces or wildcards


class SubjectError(ValueError):
    """A subject parameter that is not a single NATS token (a '.', '*' or '>' in a name
    would let a caller address other subjects than the one it means)."""


@dataclass(frozen=True)
class Endpoint(Generic[Req, Rep]):
    """One conversation. `reply` is None for a publication nobody answers; `queue` makes one
    instance of a group answer each request; `served_by`/`called_by` name component kinds."""

    name: str
    subject: str  # template: "{param}" stands for one token
    request: Any  # a Struct type (or a union of them); `Any` because a union is not a type
    reply: Any
    served_by: tuple[str, ...]
    called_by: tuple[str, ...]
    doc: str
    queue: str = ""
    params: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(_PARAM.findall(self.subject)))

    def subject_for(self, **params: str | int) -> str:
        """The concrete subject; a parameter left out becomes the `*` wildcard (for a
        subscription to every node, service or partition at once)."""
        values: dict[str, str] = {}
        used = 0
        for p in self.params:
            value = params.get(p)
            if value is None:
                values[p] = "*"
                continue
            used += 1
            text = str(value)
            if _TOKEN.fullmatch(text) is None:
                raise SubjectError(f"{self.name}: {p}={text!r} is not a single subject token")
            values[p] = text
        if used != len(params):
            unknown = sorted(set(params) - set(self.params))
            raise SubjectError(f"{self.name}: unknown subject parameters {unknown}")
        return self.subject.format_map(values) if values else self.subject

    def params_of(self, subject: str) -> dict[str, str]:
        """The parameters a concrete subject of this endpoint carries ({} if it is not one)."""
        want, got = self.subject.split("."), subject.split(".")
        if len(want) != len(got):
            return {}
        out: dict[str, str] = {}
        for w, g in zip(want, got, strict=True):
            if (m := _PARAM.fullmatch(w)) is not None:
                out[m.group(1)] = g
            elif w != g:
                return {}
        return out

    @property
    def pattern(self) -> str:
        """The subject with every parameter a wildcard: what a permission names."""
        return self.subject_for()


def _ep(name: str, subject: str, request: Any, reply: Any, served_by: str, called_by: str,
        doc: str, queue: str = "") -> Endpoint[Any, Any]:
    return Endpoint(name, f"{PREFIX}.{subject}" if not subject.startswith("svc.") else subject,
                    request, reply, tuple(served_by.split()), tuple(called_by.split()), doc,
                    queue)


# ---- services: demand, scale, route ---------------------------------------------------------
DEMAND: Endpoint[Demand, None] = _ep(
    "demand", "service.demand.{shard}", Demand, None, "scale", "activator node",
    "what a gateway or a node sees of a service now; at once when a request waits at zero; "
    "only the owner of the service's shard subscribes")
SERVICE_MODE: Endpoint[ServiceMode, None] = _ep(
    "service-mode", "service.mode", ServiceMode, None, "route", "scale",
    "proxy through the activator, or direct to pods (Knative's excess burst capacity)")
SERVICE_UPDATED: Endpoint[SpecUpdated, None] = _ep(
    "service-updated", "service.updated", SpecUpdated, None, "scale activator", "coordinator",
    "a service was deployed or its spec changed")
SERVICE_DELETED: Endpoint[ServiceDeleted, None] = _ep(
    "service-deleted", "service.deleted", ServiceDeleted, None, "scale route activator",
    "coordinator", "a service was deleted: its pods stop, its routes go")
ENDPOINTS: Endpoint[Endpoints, None] = _ep(
    "endpoints", "service.endpoints.{service}", Endpoints, None, "activator admin", "route",
    "the full ready set of one service, replacing the previous one (admin may watch)")
ROUTES: Endpoint[Empty, RoutingSnapshot] = _ep(
    "routes", "service.routes", Empty, RoutingSnapshot, "route", "activator coordinator",
    "the endpoints of every service an instance's shards hold (scatter-gather: each `route` "
    "instance answers), for an activator that starts late")
SCALE_STATUS: Endpoint[NameRequest, ScaleStatus] = _ep(
    "scale-status", "service.scale-status.{shard}", NameRequest, ScaleStatus, "scale",
    "coordinator", "desired and current pods of a service, for `fnplane describe`; its "
    "shard's owner answers", queue="scale")
RECLAIM_QUERY: Endpoint[ReclaimQuery, IdlePods] = _ep(
    "reclaim-query", "service.reclaim.query", ReclaimQuery, IdlePods, "scale", "scale",
    "idle pods that could make room, each `scale` instance for its own shards "
    "(scatter-gather)")
RECLAIM: Endpoint[ReclaimRequest, Reclaimed] = _ep(
    "reclaim", "service.reclaim.{shard}", ReclaimRequest, Reclaimed, "scale", "scale",
    "stop these idle pods of your shard to make room for another service", queue="scale")
COLD_START: Endpoint[ColdStart, None] = _ep(
    "cold-start", "service.cold-start", ColdStart, None, "coordinator admin", "activator",
    "one cold request, stage by stage, for `fnplane describe` (admin may watch)")

# ---- pods: placement and lifecycle ------------------------------------------------------------
PLACE: Endpoint[PlaceRequest, Placement | Unschedulable] = _ep(
    "place", "pod.place", PlaceRequest, Placement | Unschedulable, "schedule", "scale",
    "find a node for one new pod; any partition owner may answer", queue="schedule")
RESERVE: Endpoint[ReserveRequest, Placement | Refused] = _ep(
    "reserve", "pod.reserve.{partition}", ReserveRequest, Placement | Refused, "schedule",
    "schedule", "place in your partition or refuse with your summary (a probe)")
POD_EVENTS: Endpoint[PodEvent, None] = _ep(
    "pod-events", "pod.events.{partition}.{service}", PodEvent, None,
    "scale schedule route bench coordinator", "node",
    "a pod changed state: starting, ready, terminating, stopped, failed; only node agents say "
    "so. Keyed by the partition of the pod's node as its agent knows the map (`none` before "
    "the node has one), so a `schedule` instance hears only its own nodes' pods")

# ---- node agents ------------------------------------------------------------------------------
NODE_START: Endpoint[StartPod, Empty] = _ep(
    "node-start", "node.{node}.start", StartPod, Empty, "node", "schedule bench",
    "run one pod on this node; refused from a stale partition epoch; one agent answers "
    "(two run at once during a rollout)", queue="node")
NODE_PREFETCH: Endpoint[PrefetchModel, Empty] = _ep(
    "node-prefetch", "node.{node}.prefetch", PrefetchModel, Empty, "node", "coordinator",
    "warm a service's model in this node's cache before any request (deploy --prefetch)",
    queue="node")
NODE_STOP: Endpoint[StopPod, Empty] = _ep(
    "node-stop", "node.{node}.stop", StopPod, Empty, "node", "scale",
    "stop one pod (idempotent); one agent answers", queue="node")
NODE_PROBE: Endpoint[Empty, NodeFree] = _ep(
    "node-probe", "node.{node}.probe", Empty, NodeFree, "node", "bench",
    "this node's free capacity now (the sampling baseline's probe)")
NODE_REGISTER: Endpoint[NodeRegistration, Empty] = _ep(
    "node-register", "nodes.register", NodeRegistration, Empty, "coordinator", "node",
    "these nodes exist and take pods")
NODE_HEARTBEAT: Endpoint[NodesAlive, UnknownNodes] = _ep(
    "node-heartbeat", "nodes.heartbeat", NodesAlive, UnknownNodes, "coordinator", "node",
    "these nodes are alive (one message per agent per second); the answer names those the "
    "coordinator does not know, to register again")
NODE_LOST: Endpoint[NodesLost, None] = _ep(
    "node-lost", "nodes.lost", NodesLost, None, "scale route", "coordinator",
    "these nodes left the map (their agent fell silent): their pods are gone")
NODE_ANNOUNCE: Endpoint[AnnounceRequest, PodsAnnounced] = _ep(
    "node-announce", "nodes.announce", AnnounceRequest, PodsAnnounced, "node", "scale route",
    "the live pods of services in these shards, for their new owner (scatter-gather)")
NODE_INVENTORY: Endpoint[InventoryRequest, Inventory] = _ep(
    "node-inventory", "nodes.inventory", InventoryRequest, Inventory, "node",
    "schedule bench", "what pods the named nodes run (scatter-gather; each agent answers once)")

# ---- partitions -------------------------------------------------------------------------------
PARTITION_MAP: Endpoint[PartitionMap, None] = _ep(
    "partition-map", "partition.map", PartitionMap, None, "schedule node bench",
    "coordinator", "the partition map, on every change: owners, epochs, nodes")
PARTITION_MAP_GET: Endpoint[Empty, PartitionMap] = _ep(
    "partition-map-get", "partition.map.get", Empty, PartitionMap, "coordinator",
    "schedule node bench coordinator",
    "the current partition map, for a component that starts late")
PARTITION_SUMMARY: Endpoint[PartitionSummary, None] = _ep(
    "partition-summary", "partition.summary", PartitionSummary, None, "schedule coordinator",
    "schedule", "an owner's free capacity, for the others' probe caches")

# ---- service shards ---------------------------------------------------------------------------
SHARD_MAP: Endpoint[ShardMap, None] = _ep(
    "shard-map", "shard.map", ShardMap, None, "scale route activator schedule node",
    "coordinator", "which `scale` and `route` instance owns which service shard, with epochs")
SHARD_MAP_GET: Endpoint[Empty, ShardMap] = _ep(
    "shard-map-get", "shard.map.get", Empty, ShardMap, "coordinator",
    "scale route activator schedule node admin", "the current shard map, for a component that "
    "starts late")

# ---- instances --------------------------------------------------------------------------------
HEARTBEAT: Endpoint[Heartbeat, None] = _ep(
    "heartbeat", "instance.heartbeat.{kind}", Heartbeat, None, "coordinator",
    "scale schedule route activator", "alive, and how loaded (the coordinator scales on it)")

# ---- admin API (CLI, operator ↔ coordinator) ---------------------------------------------------
ADMIN_DEPLOY: Endpoint[DeployRequest, ServiceStatus] = _ep(
    "admin-deploy", "admin.deploy", DeployRequest, ServiceStatus, "coordinator",
    "admin operator", "create or update a service")
ADMIN_TRAFFIC: Endpoint[TrafficRequest, ServiceStatus] = _ep(
    "admin-traffic", "admin.traffic", TrafficRequest, ServiceStatus, "coordinator",
    "admin operator", "change a service's traffic split and tags, or roll it back")
ADMIN_DELETE: Endpoint[NameRequest, Empty] = _ep(
    "admin-delete", "admin.delete", NameRequest, Empty, "coordinator", "admin operator",
    "delete a service")
ADMIN_LIST: Endpoint[Empty, ServiceList] = _ep(
    "admin-list", "admin.list", Empty, ServiceList, "coordinator", "admin activator scale",
    "every service with its URL and ready pods")
ADMIN_DESCRIBE: Endpoint[NameRequest, ServiceStatus] = _ep(
    "admin-describe", "admin.describe", NameRequest, ServiceStatus, "coordinator",
    "admin operator", "one service: pods, nodes, last cold start by stage")
ADMIN_SPEC: Endpoint[NameRequest, SpecUpdated] = _ep(
    "admin-spec", "admin.spec", NameRequest, SpecUpdated, "coordinator", "activator node",
    "one service's spec, for an activator that meets a service it has not heard of")
ADMIN_STATUS: Endpoint[Empty, ClusterStatus] = _ep(
    "admin-status", "admin.status", Empty, ClusterStatus, "coordinator", "admin",
    "partitions, their owners and free capacity, instances")

# ---- API keys (kernel/apikeys.py): made, listed and revoked by admins, checked by gateways ------
ADMIN_KEY_CREATE: Endpoint[KeyCreate, KeyCreated] = _ep(
    "admin-key-create", "admin.key.create", KeyCreate, KeyCreated, "coordinator", "admin",
    "a new API key for a service, with its rate limit; the reply is the only place the "
    "whole key ever appears (Redis keeps its hash)")
ADMIN_KEY_LIST: Endpoint[KeyQuery, KeyList] = _ep(
    "admin-key-list", "admin.key.list", KeyQuery, KeyList, "coordinator", "admin",
    "API keys (ids, services, limits, revoked or not), of one service or all")
ADMIN_KEY_REVOKE: Endpoint[KeyRevoke, KeyList] = _ep(
    "admin-key-revoke", "admin.key.revoke", KeyRevoke, KeyList, "coordinator", "admin",
    "revoke an API key; gateways hear of it at once (key-revoked)")
KEY_REVOKED: Endpoint[KeyRevoked, None] = _ep(
    "key-revoked", "key.revoked", KeyRevoked, None, "activator", "coordinator",
    "an API key was revoked: every gateway drops its cached copy")

# ---- scheduler baselines of the benchmark (functions/schedule/baselines.py) ---------------------
PLACE_CENTRAL: Endpoint[PlaceRequest, Placement | Unschedulable] = _ep(
    "place-central", "bench.central.place", PlaceRequest, Placement | Unschedulable, "bench",
    "bench", "the central baseline scheduler: same request as `place`")
PLACE_SAMPLING: Endpoint[PlaceRequest, Placement | Unschedulable] = _ep(
    "place-sampling", "bench.sampling.place", PlaceRequest, Placement | Unschedulable, "bench",
    "bench", "the sampling (Sparrow-like) baseline scheduler: same request as `place`")

# ---- ingress: what clients send (JSON bodies, not fnplane messages) ------------------------------
INVOKE: Endpoint[bytes, bytes] = _ep(
    "invoke", "svc.invoke.{service}", bytes, bytes, "activator", "client",
    "request-reply inference: a KServe v1 or OIP v2 JSON body, answered as HTTP would; with "
    "`Fnplane-Stream: 1` a streamed answer comes as head, chunk... and end messages "
    "(activator/nats_stream.py)",
    queue="activator")
EVENTS: Endpoint[bytes, None] = _ep(
    "events", "svc.events.{service}", bytes, None, "activator", "client",
    "fire-and-forget inference events, one JetStream stream per service; answered on "
    "`Fnplane-Reply-To` if the producer sets it")

ALL: tuple[Endpoint[Any, Any], ...] = tuple(
    v for v in list(globals().values()) if isinstance(v, Endpoint)
)

# StartPod header of the sampling baseline: the node admits the pod only if it fits there
# (a Sparrow-like scheduler has no authoritative view, so the node is the last check).
ADMIT_IF_FITS = "Fnplane-Admit-If-Fits"


def type_name(t: Any) -> str:
    """`Placement | Unschedulable` for a union, the class name otherwise, "—" for none."""
    if t is None:
        return "—"
    return getattr(t, "__name__", None) or " | ".join(a.__name__ for a in t.__args__)


def markdown_table() -> str:
    """The conversations table of docs/architecture.md (a test keeps the two equal)."""
    rows = [
        "| conversation | subject | request → reply | served by | called by | queue group |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in ALL:
        reply = type_name(e.reply) if e.reply is not None else "— (publish)"
        rows.append(
            f"| {e.name} | `{e.subject}` | {type_name(e.request)} → {reply} | "
            f"{', '.join(e.served_by)} | {', '.join(e.called_by)} | {e.queue or '—'} |"
        )
    return "\n".join(rows) + "\n"
