"""The pure decisions behind "a silent node leaves its partition", with no network: which
nodes expire when (the coordinator's `NodeLiveness`), and what `route` and `scale` drop when
the coordinator reports nodes lost."""

from __future__ import annotations

import pytest

from functions.route.core import EndpointTable
from functions.scale.core import ServiceScaler
from kernel.messages import PodEvent, Resources, ScalingSpec, ServiceSpec
from partitions.liveness import NodeLiveness

TIMEOUT = 5.0


@pytest.mark.parametrize(
    ("beats", "now", "expired"),
    [
        # node → times it was named in a heartbeat (or registered)
        ({"a": [0.0]}, 5.0, []),  # exactly the timeout: not yet
        ({"a": [0.0]}, 5.01, ["a"]),
        ({"a": [0.0, 3.0], "b": [0.0]}, 7.0, ["b"]),  # a spoke again at 3 s
        ({"a": [0.0], "b": [1.0], "c": [9.0]}, 10.0, ["a", "b"]),  # sorted, c fresh
        ({}, 100.0, []),
    ],
)
def test_nodes_silent_past_the_timeout_expire(
    beats: dict[str, list[float]], now: float, expired: list[str]
) -> None:
    live = NodeLiveness(TIMEOUT)
    for name, times in beats.items():
        for t in times:
            live.alive([name], t)

    assert live.expire(now) == expired
    assert sorted(live.heard) == sorted(set(beats) - set(expired))


def test_an_expired_node_is_reported_once_and_then_no_longer_tracked() -> None:
    live = NodeLiveness(TIMEOUT)
    live.alive(["a", "b"], 0.0)

    first = live.expire(6.0)
    second = live.expire(60.0)

    assert (first, second) == (["a", "b"], [])


def test_the_coordinators_own_silence_is_forgiven() -> None:
    """After a stall of its own loop or its NATS connection being down, every node gets a
    fresh timeout from the moment the coordinator hears again, not from its last beat."""
    live = NodeLiveness(TIMEOUT)
    live.alive(["a"], 0.0)
    live.alive(["b"], 4.0)

    live.forgive(20.0)

    assert live.expire(24.0) == []
    assert live.expire(25.5) == ["a", "b"]


def test_a_forgotten_node_does_not_expire() -> None:
    live = NodeLiveness(TIMEOUT)
    live.alive(["a", "b"], 0.0)
    live.forget("a")

    assert live.expire(10.0) == ["b"]


def _ready(pod: str, node: str, service: str = "svc") -> PodEvent:
    return PodEvent(pod=pod, service=service, node=node, state="ready",
                    url=f"http://127.0.0.1/{pod}", container_concurrency=0,
                    resources=Resources(cpu=1, memory_mb=64), ts=0.0)


def test_route_drops_every_endpoint_on_lost_nodes_and_publishes_the_changed_services() -> None:
    table = EndpointTable()
    for ev in [_ready("a1", "n1"), _ready("a2", "n2"), _ready("b1", "n2", "other"),
               _ready("c1", "n3", "third")]:
        table.apply(ev)
    version = table.snapshot("svc").version

    changed = table.drop_nodes({"n2"})

    assert [(e.service, [x.pod for x in e.endpoints]) for e in changed] == [
        ("other", []), ("svc", ["a1"])]
    assert table.snapshot("svc").version == version + 1
    assert [e.pod for e in table.snapshot("third").endpoints] == ["c1"]  # untouched
    assert table.drop_nodes({"n2"}) == []  # nothing left there: no new version


def test_scale_forgets_pods_on_lost_nodes_without_backing_off_and_places_replacements() -> None:
    spec = ServiceSpec(name="svc", command=["x"], resources=Resources(cpu=1, memory_mb=64),
                       scaling=ScalingSpec(min_scale=3))
    scaler = ServiceScaler.for_spec(spec, 0.0)
    scaler.on_pod_event(_ready("p1", "n1"), 0.0)
    scaler.on_pod_event(_ready("p2", "n2"), 0.0)
    scaler.placing("p3", 0.0)  # not placed yet: no node, stays

    gone = scaler.nodes_lost({"n2"})
    plan = scaler.plan(1.0, 1.0)

    assert gone == ["p2"]
    assert sorted(scaler.pods) == ["p1", "p3"]
    assert scaler.backoff_until == 0.0 and scaler.last_error == ""
    assert (plan.desired, plan.start) == (3, 1)  # p2 is replaced; p3 is on its way
