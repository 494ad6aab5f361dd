"""Taints and tolerations as Kubernetes matches them (k8s.io/api core/v1
`Toleration.ToleratesTaint`; kube-scheduler's TaintToleration filter), how a service says
them (spec file, CLI), where `schedule` may place a pod because of them, and the GPU devices
a node's accounting gives each GPU pod. Pure, except the last test: a real local node
refusing a start that would share a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.cli import build_parser, spec_from_flags
from controlplane.specfile import parse_toleration, spec_from_manifest
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import (
    Empty,
    Inventory,
    NodeInfo,
    NodeRegistration,
    PodAllocation,
    Resources,
    SpecError,
    StartPod,
    Taint,
    Toleration,
)
from partitions.agents.kubernetes import objects as ko
from partitions.agents.local import LocalNode
from partitions.tolerations import pod_tolerations, tolerates, untolerated
from partitions.view import PartitionView
from tests.stackutil import sample_spec

GKE = Taint(key="nvidia.com/gpu", value="present", effect="NoSchedule")
KEY_ONLY = Taint(key="nvidia.com/gpu", effect="NoSchedule")  # Karpenter's GPU NodePools
DEDICATED = Taint(key="dedicated", value="infra", effect="NoExecute")


def tol(key: str = "", operator: str = "Equal", value: str = "", effect: str = "") -> Toleration:
    return Toleration(key=key, operator=operator, value=value, effect=effect)  # type: ignore[arg-type]


@pytest.mark.parametrize(("toleration", "taint", "expected"), [
    (tol("nvidia.com/gpu", "Equal", "present", "NoSchedule"), GKE, True),
    (tol("nvidia.com/gpu", "Equal", "absent", "NoSchedule"), GKE, False),
    (tol("nvidia.com/gpu", "Equal", "", "NoSchedule"), GKE, False),
    (tol("nvidia.com/gpu", "Equal", "", "NoSchedule"), KEY_ONLY, True),
    (tol("nvidia.com/gpu", "Equal", "present"), GKE, True),
    (tol("nvidia.com/gpu", "Exists"), GKE, True),
    (tol("nvidia.com/gpu", "Exists", effect="NoSchedule"), KEY_ONLY, True),
    (tol("nvidia.com/gpu", "Exists", effect="NoExecute"), GKE, False),
    (tol("nvidia.com/gpu", "Exists", effect="PreferNoSchedule"), GKE, False),
    (tol("amd.com/gpu", "Exists"), GKE, False),
    (tol("", "Exists"), DEDICATED, True),
    (tol("", "Exists", effect="NoSchedule"), DEDICATED, False),
    (tol("dedicated", "Equal", "infra", "NoExecute"), DEDICATED, True),
], ids=[
    "equal-all-three", "equal-other-value", "equal-empty-value-vs-a-value",
    "equal-empty-value-vs-none", "empty-effect-any-effect", "exists-any-value",
    "exists-key-only-taint", "exists-other-effect", "prefer-is-not-noschedule", "other-key",
    "empty-key-exists-everything", "empty-key-but-one-effect", "noexecute-matched",
])
def test_a_toleration_matches_a_taint_as_kubernetes_does(
    toleration: Toleration, taint: Taint, expected: bool
) -> None:
    assert tolerates(toleration, taint) is expected


def test_only_noschedule_and_noexecute_keep_a_pod_off() -> None:
    soft = Taint(key="spot", effect="PreferNoSchedule")
    assert untolerated([soft], []) is None
    assert untolerated([GKE], []) == GKE
    assert untolerated([DEDICATED], []) == DEDICATED
    assert untolerated([GKE, DEDICATED], [tol("dedicated", "Exists")]) == GKE
    assert untolerated([GKE, DEDICATED], [tol("", "Exists")]) is None


def test_gpu_pods_tolerate_the_gpu_taint_without_saying_so() -> None:
    gpu = sample_spec(resources=Resources(cpu=1, memory_mb=128, gpu=1))
    cpu = sample_spec()
    assert untolerated([GKE], pod_tolerations(gpu)) is None
    assert untolerated([KEY_ONLY], pod_tolerations(gpu)) is None
    assert untolerated([GKE], pod_tolerations(cpu)) == GKE
    # A drain (NoExecute) is not tolerated unless the service says so.
    drain = Taint(key="nvidia.com/gpu", effect="NoExecute")
    assert untolerated([drain], pod_tolerations(gpu)) == drain
    own = tol("nvidia.com/gpu", "Exists")
    said = sample_spec(resources=gpu.resources, tolerations=[own])
    assert untolerated([drain], pod_tolerations(said)) is None
    assert pod_tolerations(cpu) == ()


# ---- how a service says them ------------------------------------------------------------------


def manifest(tolerations: object) -> dict:
    return {"apiVersion": "fnplane.dev/v1alpha1", "kind": "FnService",
            "metadata": {"name": "llm"}, "spec": {"predictor": {"tolerations": tolerations}}}


def test_spec_file_tolerations_have_the_pod_shape() -> None:
    spec = spec_from_manifest(manifest([
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 30},
        {"operator": "Exists"},
    ]))
    assert spec.tolerations == [
        tol("dedicated", "Equal", "ml", "NoSchedule"),
        Toleration(key="node.kubernetes.io/unreachable", operator="Exists", effect="NoExecute",
                   toleration_seconds=30),
        tol("", "Exists"),
    ]


@pytest.mark.parametrize(("items", "error"), [
    ([{"key": "k", "operator": "Lt", "value": "5"}], "expected Exists or Equal"),
    ([{"key": "k", "operator": "Exists", "value": "v"}], "Exists takes no value"),
    ([{"value": "v"}], "only with operator Exists"),
    ([{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}], "needs effect NoExecute"),
    ([{"key": "k", "effect": "Sometimes"}], "effect 'Sometimes'"),
    ([{"key": "k", "tolerationSecond": 5}], "unknown field(s) tolerationSecond"),
    ({"key": "k"}, "expected a list"),
    ([{"key": "nvidia.com/gpu:x", "operator": "Exists"}], "expected a label key"),
    ([{"key": "Bad_Prefix/gpu", "operator": "Exists"}], "expected a label key"),
    ([{"key": "k", "value": "has space"}], "expected a label value"),
])
def test_tolerations_kubernetes_would_refuse_are_refused(items: object, error: str) -> None:
    with pytest.raises(SpecError, match=error.replace("(", r"\(").replace(")", r"\)")):
        spec_from_manifest(manifest(items))


@pytest.mark.parametrize(("text", "expected"), [
    ("nvidia.com/gpu=present:NoSchedule", tol("nvidia.com/gpu", "Equal", "present",
                                              "NoSchedule")),
    ("nvidia.com/gpu:NoSchedule", tol("nvidia.com/gpu", "Exists", effect="NoSchedule")),
    ("dedicated", tol("dedicated", "Exists")),
    ("dedicated=ml", tol("dedicated", "Equal", "ml")),
    ("*", tol("", "Exists")),
])
def test_cli_tolerations_are_written_as_kubectl_writes_taints(
    text: str, expected: Toleration
) -> None:
    assert parse_toleration(text) == expected


@pytest.mark.parametrize("text", ["k:Never", ":NoSchedule", "=v"])
def test_cli_tolerations_that_mean_nothing_are_refused(text: str) -> None:
    with pytest.raises(SpecError):
        parse_toleration(text)


def test_fnplane_deploy_takes_gpus_and_tolerations() -> None:
    args = build_parser().parse_args(["deploy", "llm", "--gpu", "1", "--toleration",
                                      "dedicated=ml:NoSchedule", "--toleration", "spot"])
    spec = spec_from_flags(args)
    assert spec.resources.gpu == 1
    assert spec.tolerations == [tol("dedicated", "Equal", "ml", "NoSchedule"),
                                tol("spot", "Exists")]


def test_pods_are_created_with_their_tolerations() -> None:
    spec = sample_spec(resources=Resources(cpu=1, memory_mb=128, gpu=1),
                       tolerations=[Toleration(key="dedicated", operator="Exists",
                                               effect="NoExecute", toleration_seconds=60)])
    pod = ko.pod_manifest(StartPod(pod="p", spec=spec, node="n", requested_at=0, placed_at=0),
                          namespace="ns", image="img", port=8080)
    assert pod["spec"]["tolerations"] == [
        {"key": "dedicated", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 60},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    ]
    plain = ko.pod_manifest(StartPod(pod="q", spec=sample_spec(), node="n", requested_at=0,
                                     placed_at=0), namespace="ns", image="img", port=8080)
    assert "tolerations" not in plain["spec"]


def test_a_node_keeps_its_taints() -> None:
    obj = {"metadata": {"name": "g"}, "spec": {"taints": [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
        {"key": "spot", "effect": "PreferNoSchedule"}]}, "status": {}}
    assert ko.node_info(obj).taints == [GKE, Taint(key="spot", effect="PreferNoSchedule")]


# ---- where `schedule` places --------------------------------------------------------------------


def view(*infos: NodeInfo, indexed: bool = True) -> PartitionView:
    v = PartitionView(indexed=indexed)
    v.assign(0, 1, list(infos))
    return v


POD = Resources(cpu=1.0, memory_mb=512)
GPU_POD = Resources(cpu=1.0, memory_mb=512, gpu=1)


@pytest.mark.parametrize("indexed", [True, False], ids=["index", "scan"])
def test_a_tainted_node_takes_only_the_pods_that_tolerate_it(indexed: bool) -> None:
    # The tainted node caches the model and fits tightest: it would win otherwise.
    gpu = NodeInfo(name="gpu", capacity=Resources(cpu=2, memory_mb=4096, gpu=1),
                   models=["m"], taints=[GKE])
    cpu = NodeInfo(name="cpu", capacity=Resources(cpu=16, memory_mb=65536))
    v = view(gpu, cpu, indexed=indexed)
    gpu_tolerations = pod_tolerations(sample_spec(resources=GPU_POD))
    assert v.place("plain", POD, "m").name == "cpu"
    assert v.place("gpu-pod", GPU_POD, "m", tolerations=gpu_tolerations).name == "gpu"
    assert v.shut_out(()) == {"gpu": "nvidia.com/gpu=present:NoSchedule"}
    # Only the tainted node has room: a pod that does not tolerate it has nowhere to go.
    only = view(gpu, indexed=indexed)
    assert only.place("plain", POD, "m") is None
    assert only.place("tolerant", POD, "m", tolerations=[tol("", "Exists")]).name == "gpu"


@settings(max_examples=100, deadline=None)
@given(
    nodes=st.lists(st.tuples(st.sampled_from([2.0, 4.0, 8.0]), st.integers(0, 3), st.booleans()),
                   min_size=1, max_size=12),
    ops=st.lists(st.tuples(st.booleans(), st.sampled_from([0.5, 1.0]), st.integers(0, 2),
                           st.booleans(), st.integers(0, 30)), max_size=60),
)
def test_no_pod_on_a_node_it_does_not_tolerate_and_no_gpu_given_twice(nodes, ops) -> None:
    """Whatever placements and releases arrive: the index and the full scan agree with
    taints too, no pod lands on a node whose taints it does not tolerate, and every GPU pod
    holds as many devices as it asked for, none shared."""
    infos = [NodeInfo(name=f"n{i}", capacity=Resources(cpu=c, memory_mb=8192, gpu=g),
                      taints=[GKE] if tainted else [])
             for i, (c, g, tainted) in enumerate(nodes)]
    v = view(*infos)
    placed: list[str] = []
    for i, (place, cpu, gpu, tolerant, pick) in enumerate(ops):
        req = Resources(cpu=cpu, memory_mb=256, gpu=gpu)
        tolerations = [tol("nvidia.com/gpu", "Exists")] if tolerant else []
        chosen = v.choose(req, "m", tolerations=tolerations)
        scanned = v.scan(req, "m", tolerations=tolerations)
        assert (chosen and chosen.name) == (scanned and scanned.name)
        if place and (node := v.place(f"p{i}", req, "m", tolerations=tolerations)):
            assert tolerant or not node.info.taints
            assert len(node.devices.get(f"p{i}", ())) == gpu
            placed.append(f"p{i}")
        elif not place and placed:
            v.release(placed.pop(pick % len(placed)))
        for node in v.nodes.values():
            held = [d for ds in node.devices.values() for d in ds]
            assert len(held) == len(set(held)) == node.used.gpu
            assert set(held) <= set(node.gpu_ids())


# ---- GPU devices --------------------------------------------------------------------------------


def test_each_gpu_pod_gets_its_own_devices_until_it_ends() -> None:
    v = view(NodeInfo(name="n", capacity=Resources(cpu=8, memory_mb=8192, gpu=2)))
    node = v.nodes["n"]
    v.place("a", GPU_POD, "m")
    v.place("b", GPU_POD, "m")
    v.place("cpu", POD, "m")
    assert (node.devices["a"], node.devices["b"]) == ((0,), (1,))
    assert "cpu" not in node.devices
    assert v.place("c", GPU_POD, "m") is None
    v.release("a")
    v.place("c", GPU_POD, "m")
    assert node.devices["c"] == (0,)
    assert node.free_devices() == []


def test_a_node_numbers_its_own_devices_and_a_pod_may_take_several() -> None:
    v = view(NodeInfo(name="n", capacity=Resources(cpu=8, memory_mb=8192, gpu=3),
                      gpu_devices=[4, 5, 6]))
    v.place("two", Resources(cpu=1, memory_mb=256, gpu=2), "m")
    v.place("one", GPU_POD, "m")
    assert v.nodes["n"].devices == {"two": (4, 5), "one": (6,)}


def test_adopted_pods_keep_the_devices_their_node_reports() -> None:
    """A new partition owner learns from the inventory which devices are taken, so the
    next pod is given the other one."""
    v = view(NodeInfo(name="n", capacity=Resources(cpu=8, memory_mb=8192, gpu=2)))
    v.record_inventory(Inventory(pods={"n": [
        PodAllocation(pod="old", service="s", resources=GPU_POD, gpu_devices=[0])]}))
    # Kubernetes reports no devices (its device plugin chose them): counted all the same.
    v.place("new", GPU_POD, "m")
    assert v.nodes["n"].devices == {"old": (0,), "new": (1,)}


async def test_a_local_node_refuses_to_give_a_gpu_twice(nats_url: str, tmp_path: Path) -> None:
    """`schedule` keeps devices disjoint; the node checks anyway, since a mistake there
    would put two models on one GPU. A real node with a real pod process."""
    node = LocalNode(await Bus.connect(nats_url, "node-gpus"),
                     NodeInfo(name="gpus-n0", capacity=Resources(cpu=4, memory_mb=4096, gpu=2)),
                     workdir=tmp_path, log_dir=tmp_path / "pods")
    spec = sample_spec("g", command=["sh", "-c", "sleep 30"],
                       resources=Resources(cpu=0.1, memory_mb=16, gpu=1))
    caller = await Bus.connect(nats_url, "test-gpus")

    async def registered(_msg: NodeRegistration, _raw: object) -> Empty:
        return Empty()  # as the coordinator answers a node agent's registration

    def start(pod: str, devices: list[int]) -> StartPod:
        return StartPod(pod=pod, spec=spec, node="gpus-n0", requested_at=0, placed_at=0,
                        partition=0, epoch=1, gpu_devices=devices)

    try:
        await caller.serve(ep.NODE_REGISTER, registered)
        async with node:
            await caller.call(ep.NODE_START, start("g-1", [1]), node="gpus-n0", timeout=10)
            for pod, devices in (("g-2", [1]), ("g-3", [7]), ("g-4", [])):
                with pytest.raises(RemoteError) as err:
                    await caller.call(ep.NODE_START, start(pod, devices), node="gpus-n0",
                                      timeout=10)
                assert err.value.code is ErrorCode.CONFLICT, pod
            await caller.call(ep.NODE_START, start("g-5", [0]), node="gpus-n0", timeout=10)
            assert set(node.pods) == {"g-1", "g-5"}
    finally:
        await caller.close()
