"""The endpoint table `route` keeps, event by event: which pods of a service are ready, when a
service has none because its pods fail to start, and a version that moves exactly when what
activators are told changes (they drop any version they have already passed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from functions.route.core import EndpointTable
from kernel.messages import Endpoint, Endpoints, PodEvent, PodsAnnounced, PodState


def event(
    pod: str, state: PodState, service: str = "svc", *, reason: str = "", log_tail: str = "",
    cc: int = 4,
) -> PodEvent:
    return PodEvent(
        pod=pod,
        service=service,
        node="node-1",
        state=state,
        url=f"http://10.0.0.1:80{pod[-1]}",
        container_concurrency=cc,
        reason=reason,
        log_tail=log_tail,
    )


def endpoint(pod: str, cc: int = 4) -> Endpoint:
    return Endpoint(
        pod=pod, url=f"http://10.0.0.1:80{pod[-1]}", node="node-1", container_concurrency=cc
    )


def test_a_ready_pod_becomes_an_endpoint() -> None:
    table = EndpointTable()

    eps = table.apply(event("pod-1", "ready", cc=8))

    assert eps == Endpoints(
        service="svc", version=1, endpoints=[endpoint("pod-1", 8)], mode="proxy", error=""
    )
    assert table.snapshot("svc") == eps


# (event, what apply returns: None, or (version, ready pods, error))
LIFE: list[tuple[PodEvent, tuple[int, list[str], str] | None]] = [
    (event("pod-1", "starting"), None),
    (event("pod-1", "ready"), (1, ["pod-1"], "")),
    (event("pod-1", "ready"), None),  # said twice: no change
    (event("pod-2", "ready"), (2, ["pod-1", "pod-2"], "")),
    (event("pod-1", "terminating"), (3, ["pod-2"], "")),
    (event("pod-1", "stopped"), None),  # already gone
    (event("pod-3", "failed", reason="exit 1"), None),  # another pod still serves
    # A serving pod that dies (killed, OOM) is replaced: no error, so requests wait for the
    # replacement (issue 10: the first release failed them all at once).
    (event("pod-2", "failed", reason="exit -9", log_tail="Killed"), (4, [], "")),
    (event("pod-4", "starting"), None),
    (event("pod-4", "failed"), (5, [], "pod failed")),  # each failure is announced again
    (event("pod-4", "ready"), (6, ["pod-4"], "")),  # a ready pod clears the error
    (event("pod-4", "stopped"), (7, [], "")),  # scaled to zero: no pod, and no error
]


def test_a_service_lifetime_event_by_event() -> None:
    table = EndpointTable()
    for n, (ev, expected) in enumerate(LIFE):
        eps = table.apply(ev)
        if expected is None:
            assert eps is None, f"step {n}: {ev.pod} {ev.state} announced a non-change"
        else:
            assert eps is not None, f"step {n}: {ev.pod} {ev.state} changed nothing"
            assert (eps.version, [e.pod for e in eps.endpoints], eps.error) == expected, n
            assert eps == table.snapshot("svc")


@pytest.mark.parametrize("state", ["terminating", "stopped", "failed"])
def test_a_pod_leaving_in_any_way_is_removed(state: str) -> None:
    table = EndpointTable()
    table.apply(event("pod-1", "ready"))
    table.apply(event("pod-2", "ready"))

    eps = table.apply(event("pod-1", state))

    assert eps is not None
    assert ([e.pod for e in eps.endpoints], eps.version, eps.error) == (["pod-2"], 3, "")


def test_the_error_keeps_only_the_end_of_the_output() -> None:
    table = EndpointTable()

    eps = table.apply(event("pod-1", "failed", reason="exit 1", log_tail="x" * 900 + "END"))

    assert eps is not None
    assert eps.error == "exit 1; last output: " + ("x" * 900 + "END")[-500:]


def test_services_are_versioned_apart() -> None:
    table = EndpointTable()
    table.apply(event("pod-1", "ready", service="a"))
    table.apply(event("pod-2", "ready", service="a"))

    eps = table.apply(event("pod-1", "ready", service="b"))

    assert eps is not None and eps.version == 1
    assert [(e.service, e.version, len(e.endpoints)) for e in table.all()] == [
        ("a", 2, 2),
        ("b", 1, 1),
    ]


def test_drop_announces_an_empty_set_and_a_redeploy_goes_on_from_it() -> None:
    table = EndpointTable()
    table.apply(event("pod-1", "ready"))
    table.apply(event("pod-2", "ready"))

    dropped = table.drop("svc")
    again = table.apply(event("pod-3", "ready"))  # deployed again under the same name

    assert dropped == Endpoints(service="svc", version=3, endpoints=[], mode="proxy", error="")
    assert again is not None
    assert again.version > dropped.version, "activators would ignore the redeployed pods"
    assert [e.pod for e in again.endpoints] == ["pod-3"]


def test_drop_of_an_unknown_service_is_version_one() -> None:
    assert EndpointTable().drop("ghost") == Endpoints(
        service="ghost", version=1, endpoints=[], mode="proxy", error=""
    )


def test_restore_picks_up_where_the_snapshot_was() -> None:
    saved = Endpoints(
        service="svc",
        version=7,
        endpoints=[endpoint("pod-1"), endpoint("pod-2")],
        mode="proxy",
        error="",
    )
    table = EndpointTable()

    table.restore(saved)

    assert table.snapshot("svc") == saved
    assert table.apply(event("pod-1", "ready")) is None
    eps = table.apply(event("pod-2", "terminating"))
    assert eps is not None and (eps.version, [e.pod for e in eps.endpoints]) == (8, ["pod-1"])


def test_restore_keeps_an_error() -> None:
    table = EndpointTable()
    table.restore(Endpoints(service="svc", version=3, endpoints=[], mode="proxy", error="exit 1"))

    eps = table.apply(event("pod-1", "ready"))

    assert eps is not None and (eps.version, eps.error) == (4, "")


# ---- versions over random histories --------------------------------------------------------

events = st.lists(
    st.tuples(
        st.sampled_from(["pod-1", "pod-2", "pod-3"]),
        st.sampled_from(["starting", "ready", "unready", "terminating", "stopped", "failed"]),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(history=events)
def test_the_version_moves_by_one_exactly_when_the_announcement_changes(
    history: list[tuple[str, str]],
) -> None:
    table = EndpointTable()
    ready: set[str] = set()
    withdrawn: set[str] = set()  # unready: alive, no traffic, and it had served
    failing = False  # the service has no pod because the last one failed
    for pod, state in history:
        before = table.snapshot("svc")
        eps = table.apply(event(pod, state, reason="boom"))
        was_serving = pod in ready or pod in withdrawn
        if state == "unready":
            ready.discard(pod)
            withdrawn.add(pod)
        else:
            withdrawn.discard(pod)
        if state == "ready":
            ready.add(pod)
            failing = False
        elif state in ("terminating", "stopped", "failed"):
            ready.discard(pod)
            # Only a pod that never served says the service cannot start.
            failing = failing or (state == "failed" and not ready and not was_serving)

        after = table.snapshot("svc")
        assert ({e.pod for e in after.endpoints}, bool(after.error)) == (ready, failing)
        if eps is None:
            assert after == before
        else:
            assert eps == after and eps.version == before.version + 1
            assert (eps.endpoints, eps.error) != (before.endpoints, before.error) or (
                state == "failed"  # a failure is announced again, to fail new waiters
            )


# ---- ready ↔ unready (issue 14: a pod whose readiness flips, or whose node is NotReady) --

# (event, what apply returns: None, or (version, ready pods, error))
FLAP: list[tuple[PodEvent, tuple[int, list[str], str] | None]] = [
    (event("pod-1", "ready"), (1, ["pod-1"], "")),
    (event("pod-2", "ready"), (2, ["pod-1", "pod-2"], "")),
    (event("pod-1", "unready"), (3, ["pod-2"], "")),  # alive, but withdrawn
    (event("pod-1", "unready"), None),  # said again: no change
    (event("pod-1", "ready"), (4, ["pod-1", "pod-2"], "")),  # back
    (event("pod-1", "unready"), (5, ["pod-2"], "")),
    (event("pod-2", "unready"), (6, [], "")),  # none ready: requests wait, no error
    # An unready pod that dies had served: it is replaced, its failure is no start error.
    (event("pod-2", "failed", reason="exit -9"), None),
    (event("pod-1", "terminating"), None),  # already out of the set
    (event("pod-3", "unready"), None),  # announced unready (a new owner's rebuild)
    (event("pod-3", "ready"), (7, ["pod-3"], "")),
]


def test_an_unready_pod_is_withdrawn_and_restored_when_ready_again() -> None:
    table = EndpointTable()
    for n, (ev, expected) in enumerate(FLAP):
        eps = table.apply(ev)
        if expected is None:
            assert eps is None, f"step {n}: {ev.pod} {ev.state} announced a non-change"
        else:
            assert eps is not None, f"step {n}: {ev.pod} {ev.state} changed nothing"
            assert (eps.version, [e.pod for e in eps.endpoints], eps.error) == expected, n
            assert eps == table.snapshot("svc")


def test_an_unready_pod_comes_back_at_its_own_address() -> None:
    table = EndpointTable()
    table.apply(event("pod-1", "ready", cc=8))
    table.apply(event("pod-1", "unready", cc=8))

    eps = table.apply(event("pod-1", "ready", cc=8))

    assert eps is not None and eps.endpoints == [endpoint("pod-1", 8)]


def test_a_new_owner_does_not_route_to_a_pod_announced_unready() -> None:
    """The stored snapshot still lists the pod (saved while it was ready); its node's
    announcement says it is unready now: the rebuilt set leaves it out."""
    stored = Endpoints(service="svc", version=4, endpoints=[endpoint("pod-1"), endpoint("pod-2")])
    answer = PodsAnnounced(nodes=["node-1"], events=[event("pod-1", "unready"),
                                                      event("pod-2", "ready")])

    [eps] = EndpointTable().rebuild({0}, 1, [stored], [answer])

    assert [e.pod for e in eps.endpoints] == ["pod-2"] and eps.version > 4
