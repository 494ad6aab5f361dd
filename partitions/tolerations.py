"""Which nodes a pod may be placed on, by taints and tolerations, as kube-scheduler's
TaintToleration filter decides it (k8s.io/api core/v1 `Toleration.ToleratesTaint`,
component-helpers `FindMatchingUntoleratedTaint`): a node is excluded by a `NoSchedule` or
`NoExecute` taint no toleration of the pod matches; `PreferNoSchedule` never excludes.

GPU node pools are tainted so that only GPU pods land there: GKE taints them
`nvidia.com/gpu=present:NoSchedule`, and EKS/AKS pools are commonly given the same key. A pod
that requests a GPU tolerates that taint without saying so, as Kubernetes' own
ExtendedResourceToleration admission plugin makes a pod requesting `nvidia.com/gpu`
tolerate `nvidia.com/gpu` `Exists` `NoSchedule`. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kernel.messages import ServiceSpec, Taint, Toleration

GPU_KEY = "nvidia.com/gpu"
FILTERING = ("NoSchedule", "NoExecute")
# What a GPU pod tolerates by default. Not `NoExecute`: on `nvidia.com/gpu` that effect is
# how a node is drained (a failed GPU, maintenance), and a pod that tolerated it forever
# would stay; a service that wants it says so in its own tolerations.
GPU_TOLERATIONS = (Toleration(key=GPU_KEY, operator="Exists", effect="NoSchedule"),)


def tolerates(toleration: Toleration, taint: Taint) -> bool:
    """One toleration against one taint, as Kubernetes matches them: an empty effect
    matches every effect, an empty key every key (with `Exists`), `Exists` every value,
    `Equal` the same value only."""
    if toleration.effect and toleration.effect != taint.effect:
        return False
    if toleration.key and toleration.key != taint.key:
        return False
    if toleration.operator == "Exists":
        return True
    return toleration.operator == "Equal" and toleration.value == taint.value


def untolerated(taints: Iterable[Taint], tolerations: Sequence[Toleration]) -> Taint | None:
    """The first taint that keeps the pod off the node, or None when it may go there."""
    for taint in taints:
        if taint.effect in FILTERING and not any(tolerates(t, taint) for t in tolerations):
            return taint
    return None


def pod_tolerations(spec: ServiceSpec) -> tuple[Toleration, ...]:
    """The service's own tolerations, and the GPU taints' when its pods request a GPU."""
    own = tuple(spec.tolerations)
    if spec.resources.gpu <= 0:
        return own
    return own + tuple(t for t in GPU_TOLERATIONS if t not in own)


def describe(taint: Taint) -> str:
    """As kubectl writes a taint: key[=value]:effect."""
    value = f"={taint.value}" if taint.value else ""
    return f"{taint.key}{value}:{taint.effect}"
