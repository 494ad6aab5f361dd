"""Defence in depth, with no network but a bus where a component needs one. Implausible
versions are refused: one partition map or endpoint set with an absurd version (10^9) would
otherwise make its readers ignore every real update after it, for good (found by forging
them on the bus); readers refuse the jump, log it, and keep taking real updates. And `scale`
re-checks the specs it is given."""

from __future__ import annotations

import pytest

from activator.direct import DirectPath
from activator.services import ServiceTable
from kernel.messages import Endpoint, Endpoints, Partition, PartitionMap, ServiceSpec
from kernel.versions import MAX_JUMP, plausible
from partitions.fencing import EpochFence


@pytest.mark.parametrize(("current", "new", "ok"), [
    (0, 10**9, True),  # nothing seen yet: the first version comes from an answer asked for
    (5, 6, True),
    (5, 5 + MAX_JUMP, True),
    (5, 6 + MAX_JUMP, False),
    (5, 10**9, False),
])
def test_plausible(current: int, new: int, ok: bool) -> None:
    assert plausible(current, new) is ok


def pmap(version: int, owner: str) -> PartitionMap:
    return PartitionMap(version=version, nodes={},
                        partitions=[Partition(id=0, epoch=version, owner=owner, nodes=["n1"])])


def test_a_node_fence_refuses_a_map_from_the_far_future_and_keeps_following() -> None:
    fence = EpochFence()
    fence.apply(pmap(3, "s1"))
    fence.apply(pmap(10**9, "forged"))
    assert fence.version == 3 and fence.owner_of["n1"] == (0, 3)
    fence.apply(pmap(4, "s2"))
    assert fence.version == 4 and fence.owner_of["n1"] == (0, 4)


def eps(version: int, url: str) -> Endpoints:
    return Endpoints(service="svc", version=version, endpoints=[
        Endpoint(pod="p", url=url, node="n1", container_concurrency=0)])


def test_an_activator_refuses_endpoints_from_the_far_future_and_keeps_following() -> None:
    table = ServiceTable(buffer_size=10, direct=DirectPath())
    table.upsert(ServiceSpec(name="svc", command=["serve"]))
    table.apply_endpoints(eps(2, "http://127.0.0.1:1"))
    table.apply_endpoints(eps(10**9, "http://evil.example:80"))
    svc = table.get("svc")
    assert svc is not None and svc.endpoints is not None
    assert svc.endpoints.version == 2
    table.apply_endpoints(eps(3, "http://127.0.0.1:2"))
    assert svc.endpoints.version == 3 and svc.endpoints.endpoints[0].url.endswith(":2")


async def test_scale_refuses_a_spec_the_registry_would_not_have_stored(nats_url: str) -> None:
    """`scale` re-checks what it is told: an invalid spec (here, a negative min-scale) that
    reaches it by a bug or a sender with the registry's credentials drives no pod."""
    import msgspec

    from functions.scale.instance import ScaleInstance
    from kernel.bus import Bus
    from kernel.config import ScaleConfig
    from kernel.messages import ScalingSpec

    bus = await Bus.connect(nats_url, "test-scale")
    try:
        scale = ScaleInstance(bus, ScaleConfig())
        good = ServiceSpec(name="svc", command=["serve"])
        scale._upsert(good)
        bad = msgspec.structs.replace(good, name="bad", scaling=ScalingSpec(min_scale=-5))
        scale._upsert(bad)
        # Every spec is kept (a shard of it may come to this instance), none invalid.
        assert set(scale.specs) == {"svc"}
    finally:
        await scale.stop()  # closes its bus, and its metrics leave the process
