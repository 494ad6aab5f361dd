"""Splitting nodes into partitions, one per `schedule` instance: pure, so the coordinator's
choices can be checked by property tests (disjoint, covering, balanced, few moves).

Rules: a partition whose owner is alive keeps its nodes; a dead owner's partition goes whole
to an instance without one (a new epoch, same nodes: its accounting is rebuilt from pod
events), or stays, unowned and empty, until one comes (an id is never reissued, so its epoch
never repeats); when the number of owners changes, nodes move from the heaviest partition to
the lightest, smallest nodes first, only while that narrows the gap, so as few pods' nodes
change owner as possible. Every change of owner or of node set bumps that partition's epoch,
which fences the old owner.
"""

from __future__ import annotations

from kernel.messages import NodeInfo, Partition


def weight(info: NodeInfo) -> float:
    """Capacity used to balance partitions: cpu, with a GPU worth 8 cores."""
    return info.capacity.cpu + 8.0 * info.capacity.gpu


def rebalance(
    nodes: dict[str, NodeInfo], owners: list[str], previous: list[Partition]
) -> list[Partition]:
    owners = sorted(set(owners))
    if not owners:
        # Nobody to own anything: keep node sets (so accounting can resume) but unowned, and
        # keep empty partitions too: a dropped id could come back with an epoch it had.
        kept = list(previous) or [Partition(id=0, epoch=0, owner="", nodes=sorted(nodes))]
        return [
            Partition(id=p.id, epoch=p.epoch + (p.owner != ""), owner="", nodes=p.nodes)
            for p in kept
        ]

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
        if p.id in owner_of:
            continue
        if not free_owners:
            # Kept unowned and empty (its nodes go to the pool), never dropped: a new owner
            # must get this id with a higher epoch, or the old owner could still write.
            owner_of[p.id], sets[p.id] = "", []
            continue
        owner_of[p.id] = free_owners.pop(0)
        sets[p.id] = [n for n in p.nodes if n in nodes and n not in assigned]
        assigned.update((n, p.id) for n in sets[p.id])
    # 3. Owners still without a partition get a new, empty one.
    next_id = max([p.id for p in previous] + [-1]) + 1
    for o in free_owners:
        owner_of[next_id], sets[next_id] = o, []
        next_id += 1

    # 4. Balance by capacity. A balanced map stays as it is: the coordinator rebalances on
    #    every tick, and a needless move would fence a healthy owner.
    pool = [n for n in nodes if n not in assigned]
    _balance(nodes, {pid: s for pid, s in sets.items() if owner_of[pid]}, pool)

    before = {p.id: (p.owner, sorted(p.nodes)) for p in previous}
    out: list[Partition] = []
    for pid in sorted(sets):
        members = sorted(sets[pid])
        epoch = epochs.get(pid, 0)
        if before.get(pid) != (owner_of[pid], members):
            epoch += 1
        out.append(Partition(id=pid, epoch=epoch, owner=owner_of[pid], nodes=members))
    return out


def _load(nodes: dict[str, NodeInfo], members: list[str]) -> float:
    return sum(weight(nodes[n]) for n in members)


def _move(
    nodes: dict[str, NodeInfo],
    sets: dict[int, list[str]],
    loads: dict[int, float],
    origin: dict[str, int],
    fresh: set[int],
) -> tuple[str, int, int] | None:
    """A node whose move from the heaviest partition to the lightest (a new one, on a tie)
    narrows their gap: one that arrived there in this rebalance if any (it has moved
    anyway), else the smallest; None once the map is balanced."""
    heavy = max(loads, key=lambda p: (loads[p], -p))
    light = min(loads, key=lambda p: (loads[p], p not in fresh, p))
    gap = loads[heavy] - loads[light]
    movable = [n for n in sets[heavy] if 0 < weight(nodes[n]) < gap - 1e-9]
    if not movable:
        return None
    n = min(movable, key=lambda n: (origin.get(n) == heavy, weight(nodes[n]), n))
    return n, heavy, light


def _balance(nodes: dict[str, NodeInfo], sets: dict[int, list[str]], pool: list[str]) -> None:
    origin = {n: pid for pid, s in sets.items() for n in s}
    fresh = {pid for pid, s in sets.items() if not s}
    loads = {pid: _load(nodes, s) for pid, s in sets.items()}
    # Nodes without a partition go largest-first to the lightest one...
    for n in sorted(pool, key=lambda n: (-weight(nodes[n]), n)):
        pid = min(loads, key=lambda p: (loads[p], p))
        sets[pid].append(n)
        loads[pid] += weight(nodes[n])
    # ...then, while a node of the heaviest partition would narrow its gap to the lightest,
    # it moves: nodes leave only a partition above the target, smallest first, and only
    # as many as balance needs.
    while (move := _move(nodes, sets, loads, origin, fresh)) is not None:
        n, heavy, light = move
        sets[heavy].remove(n)
        sets[light].append(n)
        loads[heavy] -= weight(nodes[n])
        loads[light] += weight(nodes[n])
