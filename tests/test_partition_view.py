"""Placement inside one partition, and the node accounting under it: the node that caches the
model wins, then the tightest fit, then the name; nothing is ever over-committed, whatever
sequence of placements and releases arrives; a retried placement changes nothing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.messages import NodeInfo, Resources
from partitions.nodes import NodeState, OverCommit
from partitions.view import PartitionView


def info(name: str, cpu: float, memory_mb: int = 16384, gpu: int = 0, models=()) -> NodeInfo:
    return NodeInfo(
        name=name, capacity=Resources(cpu=cpu, memory_mb=memory_mb, gpu=gpu), models=list(models)
    )


def view(*infos: NodeInfo) -> PartitionView:
    v = PartitionView()
    v.assign(0, 1, list(infos))
    return v


POD = Resources(cpu=1.0, memory_mb=1024)


# ---- choosing a node -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "req", "model", "expected"),
    [
        ([info("big", 16), info("small", 2, models=["llama"])], POD, "llama", "small"),
        ([info("a", 8, models=["llama"]), info("b", 4, models=["llama"])], POD, "llama", "b"),
        ([info("a", 8), info("b", 4), info("c", 6)], POD, "llama", "b"),
        ([info("a", 4, 8192), info("b", 4, 4096)], POD, "llama", "b"),
        ([info("b", 4), info("a", 4)], POD, "llama", "a"),
        ([info("cached", 0.5, models=["llama"]), info("roomy", 8)], POD, "llama", "roomy"),
        (
            [info("cpu", 64), info("gpu", 8, gpu=1)],
            Resources(cpu=1.0, memory_mb=1024, gpu=1),
            "llama",
            "gpu",
        ),
        ([info("a", 64, 512)], POD, "llama", None),
        ([], POD, "llama", None),
    ],
    ids=[
        "locality-beats-fit",
        "best-fit-among-cached",
        "best-fit-on-cpu",
        "then-on-memory",
        "then-by-name",
        "a-cached-node-without-room-is-skipped",
        "gpu-pod-needs-a-gpu-node",
        "no-memory-anywhere",
        "no-nodes",
    ],
)
def test_choice(nodes: list[NodeInfo], req: Resources, model: str, expected: str | None) -> None:
    node = view(*nodes).place("pod-1", req, model)

    assert (node.name if node else None) == expected


def test_best_fit_is_measured_after_what_is_already_placed() -> None:
    v = view(info("a", 8), info("b", 4))
    for i in range(3):
        v.place(f"p{i}", Resources(cpu=1.0, memory_mb=1024), "m")  # fill b down to 1 free cpu

    assert v.place("big", Resources(cpu=2.0, memory_mb=1024), "m").name == "a"
    assert v.place("tiny", Resources(cpu=1.0, memory_mb=1024), "m").name == "b"


def test_a_model_noted_on_a_node_attracts_the_next_pod() -> None:
    v = view(info("a", 4), info("b", 8))
    v.note_model("b", "llama")
    v.note_model("gone", "llama")  # a node we do not own: ignored

    assert v.place("p", POD, "llama").name == "b"


# ---- accounting ----------------------------------------------------------------------------


def test_placing_the_same_pod_again_changes_nothing() -> None:
    v = view(info("a", 4), info("b", 8))
    first = v.place("p", Resources(cpu=2.0, memory_mb=1024), "m")

    again = v.place("p", Resources(cpu=2.0, memory_mb=1024), "m")

    assert again is first
    assert v.free() == {
        "a": Resources(cpu=2.0, memory_mb=15360),
        "b": Resources(cpu=8.0, memory_mb=16384),
    }


def test_release_frees_what_the_pod_held_once() -> None:
    v = view(info("a", 4))
    v.place("p", Resources(cpu=2.5, memory_mb=1000, gpu=0), "m")

    assert v.release("p") is True
    assert v.release("p") is False
    assert v.release("never-placed") is False
    assert v.free() == {"a": Resources(cpu=4.0, memory_mb=16384)}


@pytest.mark.parametrize(
    ("pod", "node", "expected", "free_cpu"),
    [
        ("new", "a", True, {"a": 1.0, "b": 4.0}),
        ("new", "b", True, {"a": 2.0, "b": 3.0}),
        ("new", "nowhere", False, {"a": 2.0, "b": 4.0}),
        ("placed", "a", True, {"a": 2.0, "b": 4.0}),  # already there: nothing to do
        ("placed", "b", False, {"a": 2.0, "b": 4.0}),  # never on two nodes
    ],
    ids=["fits", "other-node", "unknown-node", "same-pod-same-node", "same-pod-other-node"],
)
def test_commit_on_a_named_node(
    pod: str, node: str, expected: bool, free_cpu: dict[str, float]
) -> None:
    v = view(info("a", 4), info("b", 4))
    v.commit_on("placed", "a", Resources(cpu=2.0, memory_mb=1024))

    assert v.commit_on(pod, node, Resources(cpu=1.0, memory_mb=1024)) is expected
    assert {n: f.cpu for n, f in v.free().items()} == free_cpu


def test_commit_on_a_full_node_is_refused() -> None:
    v = view(info("a", 1))

    assert v.commit_on("p", "a", Resources(cpu=2.0, memory_mb=1024)) is False
    assert v.pods == {}


def test_assign_keeps_the_accounting_of_nodes_still_owned() -> None:
    v = view(info("n1", 4), info("n2", 4))
    v.commit_on("p1", "n1", Resources(cpu=2.0, memory_mb=1024))
    v.commit_on("p2", "n2", Resources(cpu=3.0, memory_mb=1024))
    n1 = v.nodes["n1"]

    v.assign(3, 7, [info("n1", 4), info("n3", 8)])

    assert (v.partition, v.epoch) == (3, 7)
    assert v.nodes["n1"] is n1 and n1.committed == {"p1": Resources(cpu=2.0, memory_mb=1024)}
    assert v.pods == {"p1": "n1"}, "pods on a node given away are no longer ours"
    assert {n: f.cpu for n, f in v.free().items()} == {"n1": 2.0, "n3": 8.0}
    assert v.release("p2") is False


def test_node_state_refuses_an_over_commit_and_repeats_nothing() -> None:
    node = NodeState(info("a", 2, 2048, models=["llama"]))
    node.commit("p1", Resources(cpu=1.5, memory_mb=1024))
    node.commit("p1", Resources(cpu=1.5, memory_mb=1024))  # a retried commit

    with pytest.raises(OverCommit):
        node.commit("p2", Resources(cpu=1.0, memory_mb=512))

    assert (node.used, node.free, node.models) == (
        Resources(cpu=1.5, memory_mb=1024),
        Resources(cpu=0.5, memory_mb=1024),
        {"llama"},
    )
    assert not node.over_committed()


# ---- no over-commit, ever ------------------------------------------------------------------

requests = st.builds(
    Resources,
    cpu=st.sampled_from([0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 4.0]),
    memory_mb=st.sampled_from([128, 256, 512, 1024, 4096]),
    gpu=st.sampled_from([0, 0, 0, 1]),
)
actions = st.lists(
    st.one_of(
        st.tuples(st.just("place"), st.integers(0, 8), requests, st.sampled_from(["m1", "m2"])),
        st.tuples(st.just("commit-on"), st.integers(0, 8), requests, st.integers(0, 5)),
        st.tuples(st.just("release"), st.integers(0, 8)),
    ),
    max_size=80,
)
node_infos = st.lists(
    st.tuples(
        st.sampled_from([1.0, 2.0, 4.0, 8.0]),
        st.sampled_from([1024, 4096, 8192]),
        st.integers(0, 2),
        st.sampled_from([(), ("m1",), ("m2",)]),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=120, deadline=None)
@given(nodes=node_infos, steps=actions)
def test_no_sequence_of_placements_and_releases_over_commits_a_node(
    nodes: list[tuple[float, int, int, tuple[str, ...]]], steps: list[tuple]
) -> None:
    v = view(*(info(f"n{i}", c, m, g, ms) for i, (c, m, g, ms) in enumerate(nodes)))
    for step in steps:
        if step[0] == "place":
            _, p, req, model = step
            v.place(f"p{p}", req, model)
        elif step[0] == "commit-on":
            _, p, req, n = step
            v.commit_on(f"p{p}", f"n{n}", req)
        else:
            v.release(f"p{step[1]}")

        for name, node in v.nodes.items():
            assert not node.over_committed(), f"{name}: {node.free}"
            total = Resources()
            for req in node.committed.values():
                total = total + req
            assert total == node.used
            assert node.used + node.free == node.info.capacity
        placed = sorted((pod, n) for n, node in v.nodes.items() for pod in node.committed)
        assert placed == sorted(v.pods.items()), "a pod counted twice, or where it is not"


def test_a_re_registered_node_keeps_its_accounting_with_its_new_capacity() -> None:
    small = NodeInfo(name="n1", capacity=Resources(cpu=2, memory_mb=1024))
    view = PartitionView()
    view.assign(0, 1, [small])
    assert view.place("p1", Resources(cpu=1.5, memory_mb=256), "m") is not None
    assert view.place("p2", Resources(cpu=1.0, memory_mb=256), "m") is None
    view.assign(
        0, 1, [NodeInfo(name="n1", capacity=Resources(cpu=4, memory_mb=1024), models=["m2"])]
    )
    assert view.nodes["n1"].used == Resources(cpu=1.5, memory_mb=256)
    assert "m2" in view.nodes["n1"].models
    assert view.place("p2", Resources(cpu=1.0, memory_mb=256), "m") is not None


@settings(max_examples=150, deadline=None)
@given(
    caps=st.lists(
        st.tuples(st.sampled_from([1.0, 2.0, 4.0, 8.0]), st.sampled_from([512, 1024, 4096]),
                  st.integers(0, 2), st.lists(st.sampled_from(["a", "b"]), max_size=2)),
        min_size=1, max_size=25,
    ),
    ops=st.lists(
        st.tuples(st.sampled_from(["place", "release", "cache"]),
                  st.sampled_from([0.25, 0.5, 1.0, 2.0]), st.sampled_from([128, 512, 1024]),
                  st.integers(0, 1), st.sampled_from(["a", "b", "c"]), st.integers(0, 40)),
        max_size=80,
    ),
)
def test_the_index_chooses_what_scoring_every_node_chooses(caps, ops) -> None:
    """`choose` (bisection over the free-capacity index) and `scan` (filter and score every
    node, the central baseline) agree on every request, whatever happened before."""
    infos = [NodeInfo(name=f"n{i}", capacity=Resources(cpu=c, memory_mb=m, gpu=g), models=list(ms))
             for i, (c, m, g, ms) in enumerate(caps)]
    view = PartitionView()
    view.assign(0, 1, infos)
    placed: list[str] = []
    for i, (op, cpu, mem, gpu, model, pick) in enumerate(ops):
        req = Resources(cpu=cpu, memory_mb=mem, gpu=gpu)
        chosen, scanned = view.choose(req, model), view.scan(req, model)
        assert (chosen and chosen.name) == (scanned and scanned.name)
        if op == "place":
            if view.place(f"p{i}", req, model) is not None:
                placed.append(f"p{i}")
        elif op == "release" and placed:
            view.release(placed.pop(pick % len(placed)))
        elif op == "cache":
            view.note_model(infos[pick % len(infos)].name, model)
        summary = view.summary("me")
        assert summary.free == sum((n.free for n in view.nodes.values()), Resources())
        best = max(view.nodes.values(), key=lambda n: (n.free.cpu, n.free.memory_mb, n.free.gpu))
        assert (summary.largest_free.cpu, summary.largest_free.memory_mb) == (
            best.free.cpu, best.free.memory_mb)
