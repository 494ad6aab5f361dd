"""Handing service shards to the instances of a sharded function (`scale`, `route`): pure, as
the partitioner is, so its rules can be checked without NATS.

Rules: a shard whose owner is alive keeps it; shards without a live owner go to the least
loaded live owners; then, while one owner has two or more shards more than another, one moves
(the highest id of the heaviest to the lightest), so a new instance takes its share and as
few shards as possible change hands. Every change of owner bumps that shard's epoch, which
fences the old owner; with nobody alive, shards go unowned (epoch+1) until one comes.
"""

from __future__ import annotations

from kernel.messages import Shard


def assign(count: int, owners: list[str], previous: list[Shard]) -> list[Shard]:
    live = sorted(set(owners))
    before = {s.id: s for s in previous}
    owner = {i: before[i].owner if i in before and before[i].owner in live else ""
             for i in range(count)}
    if live:
        held: dict[str, list[int]] = {o: [] for o in live}
        for i, o in owner.items():
            if o:
                held[o].append(i)
        for i in sorted(i for i, o in owner.items() if not o):
            o = min(live, key=lambda o: (len(held[o]), o))
            owner[i] = o
            held[o].append(i)
        while True:
            heavy = max(live, key=lambda o: (len(held[o]), o))
            light = min(live, key=lambda o: (len(held[o]), o))
            if len(held[heavy]) - len(held[light]) < 2:
                break
            i = max(held[heavy])
            held[heavy].remove(i)
            held[light].append(i)
            owner[i] = light
    out: list[Shard] = []
    for i in range(count):
        prev = before.get(i)
        epoch = prev.epoch if prev is not None else 0
        # A shard nobody ever owned stays at epoch 0 (nothing to fence yet: senders that
        # own no shard, as the scheduler benchmark, may still act on it).
        if (prev.owner if prev is not None else "") != owner[i]:
            epoch += 1
        out.append(Shard(id=i, epoch=epoch, owner=owner[i]))
    return out
