"""What else holds each node's allocatable, for the `kubernetes` node backend: every
non-terminal pod bound there that fnplane does not manage in its namespace (DaemonSets, other
tenants, fnplane's own control plane), seen by a cluster-wide pod watch, and the kubelet's
word when it rejected a pod of ours anyway (`OutOfcpu`, `OutOfmemory`, `OutOfpods`,
`OutOfnvidia.com/gpu`: it counts something the API does not show us, such as a static pod
without its mirror pod, or a pod bound a moment ago by another scheduler).

The backend registers each node with its allocatable minus the others' requests, so the best
fit of `schedule` sees the room there really is; a node whose kubelet rejected a pod for a
resource is registered with none of it free until a pod on that node ends or `hold_s`
passes, so the retry goes elsewhere instead of to the same node. Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from kernel.messages import Resources
from partitions.agents.kubernetes import objects as ko

# As the kube-scheduler's informer: pods in these phases hold nothing on their node.
NON_TERMINAL = "status.phase!=Succeeded,status.phase!=Failed"
DEFAULT_PODS = 110  # the kubelet's default maxPods, when a Node does not say
_REJECTED = re.compile(r"^OutOf(\S+?):")
RESOURCES = {"cpu": "cpu", "memory": "memory_mb", ko.GPU: "gpu"}


def rejection(reason: str) -> str:
    """The resource a kubelet's admission found short ("cpu", "pods", "nvidia.com/gpu")
    from a failure reason as `objects.observe_pod` words it, or ""."""
    m = _REJECTED.match(reason)
    return m.group(1) if m else ""


def pods_allowed(node: dict[str, Any]) -> int:
    alloc = (node.get("status") or {}).get("allocatable") or {}
    try:
        return int(alloc.get("pods", DEFAULT_PODS))
    except (TypeError, ValueError):
        return DEFAULT_PODS


def requests_of(pod: dict[str, Any]) -> Resources:
    """A pod's requests as admission counts them: each container's requests (its limits
    where it has none, as the API server defaults them) plus the pod's overhead, rounded up
    (counting a little too much is safe, too little over-commits)."""
    spec = pod.get("spec") or {}
    cpu, mem, gpu = 0.0, 0.0, 0
    parts = [{**(c.get("resources") or {}).get("limits", {}),
              **(c.get("resources") or {}).get("requests", {})}
             for c in spec.get("containers") or []]
    parts.append(spec.get("overhead") or {})
    for q in parts:
        cpu += float(_quantity(q.get("cpu", "0")))
        mem += float(_quantity(q.get("memory", "0")))
        gpu += int(_quantity(q.get(ko.GPU, "0")))
    return Resources(cpu=math.ceil(round(cpu * 1000, 6)) / 1000,
                     memory_mb=math.ceil(mem / (1024 * 1024)), gpu=gpu)


def _quantity(value: object) -> Decimal:
    try:
        return Decimal(parse_quantity(value))
    except ValueError:
        return Decimal(0)


@dataclass(frozen=True)
class Occupant:
    k8s_node: str
    requests: Resources


@dataclass
class Occupancy:
    """The others' pods per node, and the nodes a kubelet said were full (k8s names)."""

    namespace: str  # where fnplane's own pods live; those it tracks itself
    hold_s: float = 30.0
    pods: dict[tuple[str, str], Occupant] = field(default_factory=dict)
    full: dict[str, tuple[set[str], float]] = field(default_factory=dict)  # → (res, until)

    def is_ours(self, pod: dict[str, Any]) -> bool:
        meta = pod.get("metadata") or {}
        return (meta.get("namespace") == self.namespace
                and (meta.get("labels") or {}).get(ko.LABEL_MANAGED_BY) == ko.MANAGED_BY)

    # ---- the watch ------------------------------------------------------------------------

    def on_list(self, items: list[dict[str, Any]]) -> set[str]:
        """A whole list: returns the nodes whose occupancy changed."""
        before = dict(self.pods)
        self.pods = {}
        for obj in items:
            self._put(obj)
        return {o.k8s_node for k, o in before.items() if self.pods.get(k) != o} | {
            o.k8s_node for k, o in self.pods.items() if before.get(k) != o}

    def on_pod(self, kind: str, obj: dict[str, Any]) -> set[str]:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        old = self.pods.pop(key, None)
        if kind != "DELETED":
            self._put(obj)
        new = self.pods.get(key)
        if old == new:
            return set()
        changed = {o.k8s_node for o in (old, new) if o is not None}
        if old is not None and (new is None or new.k8s_node != old.k8s_node):
            self.freed(old.k8s_node)  # room came back there: the kubelet may admit again
        return changed

    def _put(self, obj: dict[str, Any]) -> None:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        phase = (obj.get("status") or {}).get("phase")
        if self.is_ours(obj) or not spec.get("nodeName") or phase in ("Succeeded", "Failed"):
            return
        self.pods[(meta.get("namespace", ""), meta.get("name", ""))] = Occupant(
            spec["nodeName"], requests_of(obj))

    def used(self, k8s_node: str) -> tuple[Resources, int]:
        total, n = Resources(), 0
        for o in self.pods.values():
            if o.k8s_node == k8s_node:
                total, n = total + o.requests, n + 1
        return total, n

    # ---- the kubelet's word -----------------------------------------------------------------

    def rejected(self, k8s_node: str, resource: str, now: float) -> None:
        held, _ = self.full.get(k8s_node, (set(), 0.0))
        self.full[k8s_node] = (held | {resource}, now + self.hold_s)

    def freed(self, k8s_node: str) -> bool:
        return self.full.pop(k8s_node, None) is not None

    def expire(self, now: float) -> set[str]:
        gone = {n for n, (_, until) in self.full.items() if until <= now}
        for n in gone:
            del self.full[n]
        return gone

    # ---- what the node offers fnplane ---------------------------------------------------------

    def capacity(self, k8s_node: str, allocatable: Resources, pods: int, ours: Resources,
                 ours_count: int) -> Resources:
        """What to register: allocatable minus the others' requests; with no pod slot left,
        or after a kubelet's rejection, only what our pods there already hold (nothing free
        of that resource)."""
        others, n = self.used(k8s_node)
        free = allocatable - others
        held, _ = self.full.get(k8s_node, (set(), 0.0))
        if n + ours_count >= pods or "pods" in held:
            return ours
        values = {"cpu": free.cpu, "memory_mb": free.memory_mb, "gpu": free.gpu}
        for res in held:
            attr = RESOURCES.get(res)
            if attr is not None:
                values[attr] = getattr(ours, attr)
        return Resources(cpu=round(max(values["cpu"], 0.0), 6),
                         memory_mb=max(int(values["memory_mb"]), 0),
                         gpu=max(int(values["gpu"]), 0))
