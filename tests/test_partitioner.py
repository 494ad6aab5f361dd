"""The partitioner's promises, checked over random clusters and random histories of `schedule`
instances joining, leaving and crashing: partitions are disjoint and cover every node, each
live owner owns exactly one, epochs only grow and grow on every change (they fence stale
owners), a rebalance with nothing changed changes nothing, and partitions stay balanced."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.messages import NodeInfo, Partition, Resources
from partitions.partitioner import rebalance, weight

# ---- building clusters ---------------------------------------------------------------------


def node(name: str, cpu: float = 4.0, gpu: int = 0) -> NodeInfo:
    return NodeInfo(name=name, capacity=Resources(cpu=cpu, memory_mb=int(cpu * 4096), gpu=gpu))


def uniform(n: int) -> dict[str, NodeInfo]:
    return {f"n{i:03d}": node(f"n{i:03d}") for i in range(n)}


node_caps = st.tuples(st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0]), st.integers(0, 4))


@st.composite
def clusters(draw: st.DrawFn, min_size: int = 0, max_size: int = 30) -> dict[str, NodeInfo]:
    caps = draw(st.lists(node_caps, min_size=min_size, max_size=max_size))
    return {f"n{i:03d}": node(f"n{i:03d}", cpu, gpu) for i, (cpu, gpu) in enumerate(caps)}


# One step of a coordinator's life: instances come and go (a crash and a clean leave look the
# same to the partitioner: the owner is no longer live), nodes register or disappear, or a
# tick passes with nothing new. Several changes may land in one rebalance.
Step = tuple[str, int]
steps = st.lists(
    st.tuples(
        st.sampled_from(["join", "leave", "crash", "replace", "add-node", "drop-node", "tick"]),
        st.integers(0, 1000),
    ),
    max_size=25,
)


@dataclass
class History:
    """Everything the coordinator would have published, checked as it goes."""

    nodes: dict[str, NodeInfo]
    owners: list[str] = field(default_factory=list)
    parts: list[Partition] = field(default_factory=list)
    seen: dict[int, Partition] = field(default_factory=dict)  # latest version of every id
    next_owner: int = 0
    next_node: int = 1000

    def new_owner(self) -> str:
        self.next_owner += 1
        return f"schedule-{self.next_owner:03d}"

    def apply(self, kind: str, k: int) -> None:
        if kind == "join":
            self.owners.append(self.new_owner())
        elif kind in ("leave", "crash") and self.owners:
            self.owners.pop(k % len(self.owners))
        elif kind == "replace" and self.owners:  # a crash noticed in the same tick as a join
            self.owners[k % len(self.owners)] = self.new_owner()
        elif kind == "add-node":
            name = f"n{self.next_node:04d}"
            self.next_node += 1
            self.nodes[name] = node(name, 1.0 + k % 16, k % 3)
        elif kind == "drop-node" and self.nodes:
            del self.nodes[sorted(self.nodes)[k % len(self.nodes)]]

    def rebalance(self) -> list[Partition]:
        out = rebalance(dict(self.nodes), list(self.owners), self.parts)
        check_map(out, self.nodes, self.owners)
        check_epochs(self.seen, out)
        self.parts = out
        for p in out:
            self.seen[p.id] = p
        return out


# ---- the properties ------------------------------------------------------------------------


def load(nodes: dict[str, NodeInfo], names: list[str]) -> float:
    return sum(weight(nodes[n]) for n in names)


def check_map(parts: list[Partition], nodes: dict[str, NodeInfo], owners: list[str]) -> None:
    ids = [p.id for p in parts]
    assert len(ids) == len(set(ids)), f"partition ids repeat: {ids}"
    members = [n for p in parts for n in p.nodes]
    assert len(members) == len(set(members)), f"a node is in two partitions: {parts}"
    owned = [p.owner for p in parts if p.owner]
    assert sorted(owned) == sorted(set(owners)), f"owners {owners} but partitions {parts}"
    if owners:
        covered = {n for p in parts if p.owner for n in p.nodes}
        assert covered == set(nodes), f"nodes {sorted(set(nodes) - covered)} have no owner"
        assert not [p for p in parts if not p.owner and p.nodes], "unowned nodes beside owners"


def check_epochs(seen: dict[int, Partition], parts: list[Partition]) -> None:
    """Per partition id, over the whole history (an id that vanished and came back too)."""
    for p in parts:
        old = seen.get(p.id)
        if old is None:
            continue
        assert p.epoch >= old.epoch, f"epoch of partition {p.id} went back: {old} -> {p}"
        if (p.owner, p.nodes) != (old.owner, old.nodes):
            assert p.epoch > old.epoch, (
                f"partition {p.id} changed without a new epoch: {old} -> {p}"
            )


def check_balance(parts: list[Partition], nodes: dict[str, NodeInfo]) -> None:
    """No owned partition is more than one node away from the fair share."""
    owned = [p for p in parts if p.owner]
    if not owned or not nodes:
        return
    target = load(nodes, list(nodes)) / len(owned)
    biggest = max(weight(n) for n in nodes.values())
    for p in owned:
        assert load(nodes, p.nodes) <= target + biggest + 1e-6, f"{p} is overfull"
        assert load(nodes, p.nodes) >= target - biggest - 1e-6, f"{p} is starved"


# ---- properties over random histories ------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(nodes=clusters(), history=steps)
def test_every_map_in_a_history_is_disjoint_covering_fenced_and_stable(
    nodes: dict[str, NodeInfo], history: list[Step]
) -> None:
    h = History(dict(nodes))
    h.owners = [h.new_owner()]
    h.rebalance()
    for kind, k in history:
        h.apply(kind, k)
        parts = h.rebalance()
        check_balance(parts, h.nodes)
        # Nothing changed since: the coordinator re-runs rebalance on every tick, and it must
        # then neither move a node nor bump an epoch (that would fence a healthy owner).
        assert rebalance(dict(h.nodes), list(h.owners), parts) == parts


def join_one(h: History) -> tuple[dict[str, Partition], dict[str, Partition]]:
    """One more instance joins, nothing else changes: each old owner's partition before and
    after, and the newcomer's under its own name."""
    before = {p.owner: p for p in h.parts if p.owner}
    h.owners.append(h.new_owner())
    return before, {p.owner: p for p in h.rebalance() if p.owner}


@settings(max_examples=100, deadline=None)
@given(nodes=clusters(min_size=1), owners=st.integers(1, 6), history=steps)
def test_a_join_strips_no_owner_below_the_fair_share_by_more_than_a_node(
    nodes: dict[str, NodeInfo], owners: int, history: list[Step]
) -> None:
    h = History(dict(nodes))
    h.owners = [h.new_owner() for _ in range(owners)]
    h.rebalance()
    for kind, k in history:  # arrive at some state reached by a history...
        h.apply(kind, k)
        h.rebalance()
    if not h.nodes:
        return
    before, after = join_one(h)  # ...then one more instance joins

    target = load(h.nodes, list(h.nodes)) / len(h.owners)
    biggest = max(weight(n) for n in h.nodes.values())
    for owner, old in before.items():
        kept = sorted(set(old.nodes) & set(after[owner].nodes))
        assert load(h.nodes, kept) >= min(load(h.nodes, old.nodes), target - biggest) - 1e-6


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 150), owners=st.integers(1, 10), history=steps)
def test_with_equal_nodes_a_join_moves_nodes_only_to_the_newcomer(
    n: int, owners: int, history: list[Step]
) -> None:
    h = History(uniform(n))
    h.owners = [h.new_owner() for _ in range(owners)]
    h.rebalance()
    for kind, k in history:
        if kind not in ("add-node", "drop-node"):  # keep every node the same size
            h.apply(kind, k)
            h.rebalance()
    if not h.owners:
        return  # the newcomer takes a whole unowned partition: nothing moves
    before, after = join_one(h)

    newcomer = h.owners[-1]
    for owner, old in before.items():
        assert set(after[owner].nodes) <= set(old.nodes), f"{owner} got nodes of another owner"
    moved = sum(len(set(old.nodes) - set(after[o].nodes)) for o, old in before.items())
    assert moved == len(after[newcomer].nodes) >= n // len(h.owners)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 200), owners=st.integers(1, 12))
def test_equal_nodes_from_scratch_split_within_one_node(n: int, owners: int) -> None:
    nodes = uniform(n)
    parts = rebalance(nodes, [f"s{i}" for i in range(owners)], [])

    sizes = [len(p.nodes) for p in parts]
    assert len(sizes) == owners
    assert max(sizes) - min(sizes) <= 1, sizes
    check_map(parts, nodes, [f"s{i}" for i in range(owners)])


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 200), owners=st.integers(1, 12), history=steps)
def test_equal_nodes_stay_within_one_node_through_joins_and_leaves(
    n: int, owners: int, history: list[Step]
) -> None:
    h = History(uniform(n))
    h.owners = [h.new_owner() for _ in range(owners)]
    h.rebalance()
    for kind, k in history:
        if kind in ("add-node", "drop-node"):
            continue  # keep every node the same size
        h.apply(kind, k)
        sizes = [len(p.nodes) for p in h.rebalance() if p.owner]
        if sizes:
            assert max(sizes) - min(sizes) <= 1, sizes


# ---- the rules, case by case ---------------------------------------------------------------


def test_first_map_gives_each_owner_an_epoch_one_partition() -> None:
    parts = rebalance(uniform(4), ["b", "a"], [])

    assert parts == [
        Partition(id=0, epoch=1, owner="a", nodes=["n000", "n002"]),
        Partition(id=1, epoch=1, owner="b", nodes=["n001", "n003"]),
    ]


def test_a_crashed_owners_partition_goes_whole_to_an_owner_without_one() -> None:
    before = rebalance(uniform(6), ["a", "b", "c"], [])
    b_part = next(p for p in before if p.owner == "b")

    after = rebalance(uniform(6), ["a", "c", "d"], before)

    d_part = next(p for p in after if p.owner == "d")
    assert (d_part.id, d_part.nodes) == (b_part.id, b_part.nodes)
    assert d_part.epoch == b_part.epoch + 1, "a new owner must fence the old one"
    untouched = [p for p in after if p.owner in ("a", "c")]
    assert untouched == [p for p in before if p.owner in ("a", "c")]


def test_an_orphaned_partition_waits_unowned_and_comes_back_with_a_new_epoch() -> None:
    nodes = uniform(4)
    two = rebalance(nodes, ["a", "b"], [])
    one = rebalance(nodes, ["a"], two)  # b crashes, and no instance is free to take over

    again = rebalance(nodes, ["a", "c"], one)  # c joins

    assert one == [
        Partition(id=0, epoch=2, owner="a", nodes=sorted(nodes)),
        Partition(id=1, epoch=2, owner="", nodes=[]),
    ]
    # Had id 1 been dropped and reissued at epoch 1, b (if only cut off) could still write.
    assert (again[1].id, again[1].owner, again[1].epoch) == (1, "c", 3)


def test_a_newcomer_gets_its_share_even_when_every_old_partition_rounds_up() -> None:
    nodes = uniform(105)  # 9 owners: 12 or 11 nodes each; 10 owners: 10.5 each
    nine = rebalance(nodes, [f"s{i}" for i in range(9)], [])

    ten = rebalance(nodes, [f"s{i}" for i in range(10)], nine)

    assert sorted(len(p.nodes) for p in ten) == [10] * 5 + [11] * 5
    assert len(next(p for p in ten if p.owner == "s9").nodes) >= 10


def test_with_no_owner_node_sets_are_kept_unowned_and_fenced() -> None:
    nodes = uniform(4)
    owned = rebalance(nodes, ["a", "b"], [])

    orphaned = rebalance(nodes, [], owned)

    assert [(p.id, p.owner, p.nodes) for p in orphaned] == [(p.id, "", p.nodes) for p in owned]
    assert [p.epoch for p in orphaned] == [p.epoch + 1 for p in owned]
    assert rebalance(nodes, [], orphaned) == orphaned


def test_losing_every_node_keeps_epochs_growing() -> None:
    owned = rebalance(uniform(4), ["a", "b"], [])

    empty = rebalance({}, ["a", "b"], owned)

    assert [(p.owner, p.nodes) for p in empty] == [("a", []), ("b", [])]
    for old, new in zip(owned, empty, strict=True):
        assert (new.id, new.epoch) == (old.id, old.epoch + 1)


@pytest.mark.parametrize(
    ("caps", "owners", "expected"),
    [
        # a GPU is worth 8 cores: one 1-GPU node balances eight 1-core nodes
        ([(1.0, 1)] + [(1.0, 0)] * 8, 2, [1, 8]),
        # one big node cannot be split: it is a partition by itself
        ([(64.0, 0)] + [(1.0, 0)] * 4, 2, [1, 4]),
        ([(4.0, 0)] * 6, 3, [2, 2, 2]),
        ([(4.0, 0)] * 2, 3, [0, 1, 1]),
    ],
    ids=["gpu-weighs-eight-cores", "indivisible-big-node", "even-split", "more-owners-than-nodes"],
)
def test_balance_by_capacity(
    caps: list[tuple[float, int]], owners: int, expected: list[int]
) -> None:
    nodes = {f"n{i:03d}": node(f"n{i:03d}", cpu, gpu) for i, (cpu, gpu) in enumerate(caps)}

    parts = rebalance(nodes, [f"s{i}" for i in range(owners)], [])

    assert sorted(len(p.nodes) for p in parts) == expected
