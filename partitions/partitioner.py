"""Splitting nodes into partitions, one per `schedule` instance: pure, so the coordinator's
choices can be checked by property tests (disjoint, covering, balanced, few moves).

Rules: a partition whose owner is alive keeps its nodes; a dead owner's partition goes whole
to an instance without one (a new epoch, same nodes: its accounting is rebuilt from pod
events); when the number of owners changes, nodes move from partitions above the capacity
target to those below, smallest nodes first, so as few pods' nodes change owner as possible.
Every change of owner or of node set bumps that partition's epoch, which fences the old owner.
"""

from __future__ import annotations

from controlplane.schemas import NodeInfo, Partition


def weight(info: NodeInfo) -> float:
    """Capacity used to balance partitions: cpu, with a GPU worth 8 cores."""
    return info.capacity.cpu + 8.0 * info.capacity.gpu


def rebalance(
    nodes: dict[str, NodeInfo], owners: list[str], previous: list[Partition]
) -> list[Partition]:
    owners = sorted(set(owners))
    if not nodes:
        return [Partition(i, 1, o, []) for i, o in enumerate(owners)]
    if not owners:
        # Nobody to own anything: keep node sets (so accounting can resume) but unowned.
        kept = [p for p in previous if p.nodes] or [Partition(0, 0, "", sorted(nodes))]
        return [Partition(p.id, p.epoch + (p.owner != ""), "", p.nodes) for p in kept]

    live = set(owners)
    assigned: dict[str, int] = {}  # node → partition id
    sets: dict[int, list[str]] = {}
    owner_of: dict[int, str] = {}
    epochs: dict[int, int] = {p.id: p.epoch for p in previous}

    # 1. Partitions of live owners keep their (still existing) nodes.
    for p in sorted(previous, key=lambda p: p.id):
        if p.owner in live and p.owner not in owner_of.values():
            owner_of[p.id] = p.owner
            sets[p.id] = [n for n in p.nodes if n in nodes and n not in assigned]
            assigned.update((n, p.id) for n in sets[p.id])
    # 2. Orphaned partitions go whole to owners without one, while both remain.
    free_owners = [o for o in owners if o not in owner_of.values()]
    for p in sorted(previous, key=lambda p: p.id):
        if p.id in owner_of or not free_owners:
            continue
        owner_of[p.id] = free_owners.pop(0)
        sets[p.id] = [n for n in p.nodes if n in nodes and n not in assigned]
        assigned.update((n, p.id) for n in sets[p.id])
    # 3. Owners still without a partition get a new, empty one.
    next_id = max([p.id for p in previous] + [-1]) + 1
    for o in free_owners:
        owner_of[next_id], sets[next_id] = o, []
        next_id += 1

    # 4. Balance by capacity: overfull partitions give up their smallest nodes.
    pool = [n for n in nodes if n not in assigned]
    total = sum(weight(nodes[n]) for n in nodes)
    target = total / len(owner_of)
    for pid in sorted(sets):
        load = sum(weight(nodes[n]) for n in sets[pid])
        for n in sorted(sets[pid], key=lambda n: (weight(nodes[n]), n)):
            # Give a node up only while that brings the load nearer the target.
            if load - weight(nodes[n]) / 2 <= target + 1e-9:
                break
            sets[pid].remove(n)
            pool.append(n)
            load -= weight(nodes[n])
    # 5. The pool goes largest-first to the lightest partition.
    loads = {pid: sum(weight(nodes[n]) for n in s) for pid, s in sets.items()}
    for n in sorted(pool, key=lambda n: (-weight(nodes[n]), n)):
        pid = min(loads, key=lambda p: (loads[p], p))
        sets[pid].append(n)
        loads[pid] += weight(nodes[n])

    before = {p.id: (p.owner, sorted(p.nodes)) for p in previous}
    out: list[Partition] = []
    for pid in sorted(sets):
        members = sorted(sets[pid])
        epoch = epochs.get(pid, 0)
        if before.get(pid) != (owner_of[pid], members):
            epoch += 1
        out.append(Partition(pid, epoch, owner_of[pid], members))
    return out
