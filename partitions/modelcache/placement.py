"""Where to prefetch a model (deploy --prefetch N): N nodes a pod of the service could be
placed on by `schedule`'s own filters (capacity, taints), those that already cache the model
first (they count, and fetch nothing), then those with the least cached, by name on ties.
Pure: the partition map's nodes in, node names out."""

from __future__ import annotations

from collections.abc import Iterable

from kernel.messages import NodeInfo, ServiceSpec
from partitions.tolerations import untolerated


def prefetch_nodes(nodes: Iterable[NodeInfo], spec: ServiceSpec) -> list[str]:
    model = spec.model_id
    fit = [n for n in nodes if spec.resources.fits_in(n.capacity)
           and (not n.taints or untolerated(n.taints, spec.tolerations) is None)]
    fit.sort(key=lambda n: (model not in n.models, sum(n.model_bytes.values()), n.name))
    return [n.name for n in fit[: spec.prefetch]]
