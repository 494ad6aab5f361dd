"""Reclaiming idle capacity, beyond Knative: when a service has requests waiting and no node
has room for its pod, idle pods of other services make room. Pure: `scale` gathers the
candidates from its bookkeeping and stops the pods this returns.

A candidate is a ready pod of a service with no request in flight or waiting and more pods
than its min-scale. Victims all come from one node (room split across nodes does not fit a
pod): the node where the fewest pods free enough, and among those the pods idle longest
first, so the warmest caches stay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kernel.messages import Resources


@dataclass(frozen=True)
class Candidate:
    pod: str
    service: str
    node: str
    resources: Resources
    idle_since: float  # when its service last had a request


def _covers(have: Resources, need: Resources) -> bool:
    return (have.cpu >= need.cpu - 1e-9 and have.memory_mb >= need.memory_mb
            and have.gpu >= need.gpu)


def _plus(a: Resources, b: Resources) -> Resources:
    return Resources(cpu=a.cpu + b.cpu, memory_mb=a.memory_mb + b.memory_mb, gpu=a.gpu + b.gpu)


def pick(need: Resources, candidates: Iterable[Candidate]) -> list[Candidate]:
    """The pods to stop so that `need` fits on one node, or [] when no node can free it."""
    by_node: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_node.setdefault(c.node, []).append(c)
    best: list[Candidate] = []
    for node in sorted(by_node):
        freed = Resources(cpu=0, memory_mb=0, gpu=0)
        chosen: list[Candidate] = []
        for c in sorted(by_node[node], key=lambda c: (c.idle_since, c.pod)):
            chosen.append(c)
            freed = _plus(freed, c.resources)
            if _covers(freed, need):
                break
        else:
            continue  # even all of this node's idle pods do not make room
        if not best or len(chosen) < len(best):
            best = chosen
    return best
