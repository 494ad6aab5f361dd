"""The revision rules of kernel/revisions.py, table by table: which deploy makes a revision,
what split a `--traffic`, `--canary-percent`, `--tag` or rollback gives (and which it
refuses, with which code), what retires, and how the per-request pick draws."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise

import msgspec
import pytest

from kernel import revisions as rv
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import ScalingSpec, ServiceSpec, TrafficTarget
from kernel.metrics import Metrics

T = TrafficTarget
REVS = ["svc-00001", "svc-00002", "svc-00003"]


def spec(**kw: object) -> ServiceSpec:
    kw.setdefault("command", ["serve"])
    return ServiceSpec(name="svc", **kw)  # type: ignore[arg-type]


def deployed(**kw: object) -> ServiceSpec:
    return spec(revisions=["svc-00001"], latest_revision="svc-00001", **kw)


@pytest.mark.parametrize(("change", "creates"), [
    ({"scaling": ScalingSpec(min_scale=2, max_scale=5, target_concurrency=3)}, False),
    ({"prefetch": 0, "generation": 7}, False),
    ({"command": ["serve", "--v2"]}, True),
    ({"env": {"A": "1"}}, True),
    ({"image": "repo/model:2"}, True),
    ({"storage_uri": "file:///m"}, True),
    ({"container_concurrency": 4}, True),
])
def test_only_a_pod_template_change_makes_a_revision(change: dict, creates: bool) -> None:
    assert rv.creates_revision(deployed(), spec(**change)) is creates
    assert rv.creates_revision(None, spec())  # the first deploy always does


def test_a_revision_is_named_and_numbered_as_knatives() -> None:
    rev = rv.revision_spec(spec(env={"K": "v"}), 3)
    assert rev.name == "svc-00003" and rev.revision_of == "svc" and rev.generation == 3
    assert rev.env == {"MODEL_NAME": "svc", "K": "v"}  # its pods answer to the service
    assert rv.revision_number("svc-00003") == 3 and rv.parent_of("svc-00003") == "svc"
    assert rv.revision_number("svc") == 0 and rv.parent_of("svc-3") == ""


def test_split_resolves_latest_numbers_and_tags() -> None:
    current = [T(revision="svc-00001", percent=100, tag="stable")]
    got = rv.split("svc", [T(revision="@latest", percent=10), T(revision="stable", percent=90)],
                   revisions=REVS, latest="svc-00003", current=current)
    assert got == [T(revision="svc-00003", percent=10, latest=True),
                   T(revision="svc-00001", percent=90, tag="stable")]
    got = rv.split("svc", [T(revision="2", percent=100)], revisions=REVS, latest="svc-00003",
                   current=[])
    assert got == [T(revision="svc-00002", percent=100)]


@pytest.mark.parametrize(("targets", "code"), [
    ([("svc-00001", 50), ("svc-00002", 40)], ErrorCode.INVALID),  # sums to 90
    ([("svc-00001", 110), ("svc-00002", -10)], ErrorCode.INVALID),
    ([("svc-00001", 50), ("svc-00001", 50)], ErrorCode.INVALID),  # named twice
    ([("svc-00009", 100)], ErrorCode.NOT_FOUND),
    ([("nosuchtag", 100)], ErrorCode.NOT_FOUND),
])
def test_a_bad_split_is_refused_with_its_code(targets: list, code: ErrorCode) -> None:
    with pytest.raises(RemoteError) as err:
        rv.split("svc", [T(revision=r, percent=p) for r, p in targets], revisions=REVS,
                 latest="svc-00003", current=[])
    assert err.value.code is code


def test_canary_gives_the_new_revision_its_share_and_the_stable_one_the_rest() -> None:
    current = [T(revision="svc-00002", percent=100, latest=True)]
    got = rv.canary("svc", 10, revisions=REVS, latest="svc-00003", current=current)
    assert rv.percents(got) == {"svc-00003": 10, "svc-00002": 90}
    # a later canary step keeps the same stable revision
    got = rv.canary("svc", 50, revisions=REVS, latest="svc-00003", current=got)
    assert rv.percents(got) == {"svc-00003": 50, "svc-00002": 50}
    # one revision: no canary, it takes everything
    assert rv.percents(rv.canary("svc", 10, revisions=["svc-00001"], latest="svc-00001",
                                 current=[])) == {"svc-00001": 100}


def test_tags_name_one_revision_and_never_collide() -> None:
    traffic = [T(revision="svc-00002", percent=100)]
    got = rv.retag("svc", traffic, {"svc-00001": "old", "@latest": "next"}, revisions=REVS,
                   latest="svc-00003")
    assert rv.tags_of(got) == {"old": "svc-00001", "next": "svc-00003"}
    assert rv.percents(got) == {"svc-00002": 100, "svc-00001": 0, "svc-00003": 0}
    assert rv.reachable(got) == set(REVS)
    for tags, code in [({"svc-00002": "old"}, ErrorCode.CONFLICT),
                       ({"svc-00002": "svc-00001"}, ErrorCode.CONFLICT),
                       ({"svc-00002": "Bad_Tag"}, ErrorCode.INVALID),
                       ({"svc-00007": "x"}, ErrorCode.NOT_FOUND)]:
        with pytest.raises(RemoteError) as err:
            rv.retag("svc", got, tags, revisions=REVS, latest="svc-00003")
        assert err.value.code is code, tags


def test_a_deploy_without_flags_moves_latest_targets_and_keeps_pinned_ones() -> None:
    assert rv.follow_latest([], "svc-00001") == [T(revision="svc-00001", percent=100,
                                                   latest=True)]
    got = rv.follow_latest([T(revision="svc-00001", percent=100, latest=True, tag="a")],
                           "svc-00002")
    assert got == [T(revision="svc-00002", percent=100, latest=True),
                   T(revision="svc-00001", tag="a")]
    pinned = [T(revision="svc-00001", percent=100)]
    assert rv.follow_latest(pinned, "svc-00002") == pinned


def test_rollback_returns_to_the_previous_revision_that_took_everything() -> None:
    promoted = rv.promote([], [T(revision="svc-00001", percent=100)], keep=10)
    canary = [T(revision="svc-00002", percent=10), T(revision="svc-00001", percent=90)]
    assert rv.promote(promoted, canary, keep=10) == ["svc-00001"]
    assert rv.rollback("svc", canary, promoted, REVS) == [T(revision="svc-00001",
                                                            percent=100)]
    promoted = rv.promote(promoted, [T(revision="svc-00002", percent=100)], keep=10)
    assert rv.percents(rv.rollback("svc", [T(revision="svc-00002", percent=100)], promoted,
                                   REVS)) == {"svc-00001": 100}
    with pytest.raises(RemoteError) as err:  # nothing older took everything
        rv.rollback("svc", [T(revision="svc-00001", percent=100)], promoted, REVS)
    assert err.value.code is ErrorCode.CONFLICT


def test_history_retires_the_oldest_unrouted_revisions_only() -> None:
    revs = [f"svc-{n:05d}" for n in range(1, 7)]
    traffic = [T(revision="svc-00001", percent=50), T(revision="svc-00006", percent=50),
               T(revision="svc-00002", tag="keep")]
    assert rv.retire(revs, traffic, latest="svc-00006", keep=3) == ["svc-00003", "svc-00004",
                                                                     "svc-00005"]
    assert rv.retire(revs, traffic, latest="svc-00006", keep=10) == []


def test_an_unrouted_revision_is_reserve() -> None:
    service = spec(scaling=ScalingSpec(min_scale=3), traffic=[T(revision="svc-00002",
                                                                 percent=100)])
    old = rv.revision_spec(spec(), 1)
    assert rv.effective(old, service).routing_state == "reserve"
    assert rv.effective(old, service).scaling.min_scale == 3  # scale ignores it when reserve
    assert rv.effective(rv.revision_spec(spec(), 2), service).routing_state == "active"


def test_pick_is_a_weighted_random_draw_not_round_robin() -> None:
    split = [T(revision="a", percent=90), T(revision="b", percent=10)]
    rng = random.Random(7)
    picks = [rv.pick(split, rng.random()) for _ in range(2000)]
    counts = Counter(picks)
    assert abs(counts["b"] / 2000 - 0.10) < 0.03
    # a round robin would put each `b` exactly every 10th request; a draw does not
    at = [k for k, p in enumerate(picks) if p == "b"]
    gaps = {j - i for i, j in pairwise(at)}
    runs = [i for i in range(1, 2000) if picks[i] == picks[i - 1] == "b"]
    assert runs, "two `b` in a row happen by chance with a draw, never with 90/10 round robin"
    assert len(gaps) > 1
    assert rv.pick(split, 0.0) == "a" and rv.pick(split, 0.95) == "b"
    assert rv.pick(split, 0.999999999) == "b"


def test_pick_skips_revisions_that_fail_to_start_and_sticks_per_request_id() -> None:
    split = [T(revision="a", percent=90), T(revision="b", percent=10)]
    assert {rv.pick(split, d / 100, unavailable={"a"}) for d in range(100)} == {"b"}
    assert rv.pick(split, 0.5, unavailable={"a", "b"}) is None
    assert rv.pick([T(revision="a", tag="t")], 0.5) is None  # a tag alone takes no share
    draws = {rv.sticky_draw("req-42") for _ in range(5)}
    assert len(draws) == 1 and 0 <= draws.pop() < 1
    assert rv.sticky_draw("req-42") != rv.sticky_draw("req-43")


def test_a_reserve_revision_keeps_no_pods_whatever_its_min_scale() -> None:
    """Knative's reachability, in `scale`: the same revision holds its min-scale while a
    target names it, and drops to zero once none does (after its grace, no delay)."""
    from functions.scale.core import ServiceScaler, reachable_scaling
    from kernel.messages import PodEvent

    sc = ScalingSpec(min_scale=2, initial_scale=2, scale_to_zero_grace_s=1.0,
                     scale_down_delay_s=30.0)
    active = rv.revision_spec(spec(scaling=sc), 1)
    reserve = reachable_scaling(msgspec.structs.replace(active, routing_state="reserve"))
    assert reachable_scaling(active) == active
    assert (reserve.scaling.min_scale, reserve.scaling.scale_down_delay_s) == (0, 0.0)
    s = ServiceScaler.for_spec(reachable_scaling(active), 0.0)
    assert s.plan(0.0, 0.5).start == 2
    for i in range(2):
        s.placing(f"p{i}", 0.0)
        s.on_pod_event(PodEvent(pod=f"p{i}", service=active.name, node="n", state="ready"),
                       0.1)
    assert s.plan(10.0, 0.5).desired == 2  # active: min-scale holds with no demand
    s.update_spec(reserve)
    assert s.plan(20.0, 0.5).desired == 0  # reserve: to zero, min-scale and delay ignored


# ---- the activator's side: which revision a request reaches --------------------------------


@pytest.fixture
def test_metrics() -> Iterator[Metrics]:
    m = Metrics("activator-test")
    yield m
    m.close()


def picker_for(service: ServiceSpec, draws: list[float],  # type: ignore[no-untyped-def]
               metrics: Metrics):
    """The activator's service table as sync.py fills it (revisions, then the service), and
    its picker with a scripted draw."""
    from activator.direct import DirectPath
    from activator.revisions import RevisionPicker
    from activator.services import ServiceTable

    table = ServiceTable(buffer_size=10, direct=DirectPath())
    for rev in service.revisions:
        table.upsert(rv.revision_spec(spec(), rv.revision_number(rev)))
    table.upsert(service)
    it = iter(draws)
    return table, RevisionPicker(table, metrics, log_id="t", draw=lambda: next(it))


def test_the_activator_reaches_a_revision_by_tag_version_or_draw(test_metrics: Metrics) -> None:
    from kernel.messages import Endpoints

    two = spec(revisions=["svc-00001", "svc-00002"], latest_revision="svc-00002",
               traffic=[T(revision="svc-00002", percent=10, tag="canary"),
                        T(revision="svc-00001", percent=90)])
    table, picker = picker_for(two, [0.05, 0.5, 0.95, 0.5], test_metrics)
    assert [picker.choose(two, {}, None).revision for _ in range(3)] == [
        "svc-00002", "svc-00001", "svc-00001"]  # the draw decides, by weight, in block order
    assert picker.choose(two, {"X-Fnplane-Tag": "canary"}, None).revision == "svc-00002"
    assert picker.choose(two, {"x-fnplane-tag": "nope"}, None).status == 404
    assert picker.choose(two, {}, "2").revision == "svc-00002"  # version = revision number
    assert picker.choose(two, {}, "7").status == 404
    sticky = {picker.choose(two, {"X-Request-Id": "abc"}, None).revision for _ in range(5)}
    assert len(sticky) == 1
    # the canary's pods fail to start: it gets no share, every draw goes to the other
    table.apply_endpoints(Endpoints(service="svc-00002", version=1, endpoints=[],
                                    error="pod failed"))
    assert picker.choose(two, {}, None).revision == "svc-00001"  # draw 0.5
    assert picker.choose(two, {"X-Request-Id": "abc"}, None).revision == "svc-00001"
    # one revision: the service answers to its model version only, as before revisions
    one = spec(revisions=["svc-00001"], latest_revision="svc-00001", model_version="5",
               traffic=[T(revision="svc-00001", percent=100)])
    _, picker = picker_for(one, [0.5], test_metrics)
    assert picker.choose(one, {}, "1").status == 404
    assert picker.choose(one, {}, "5").revision == "svc-00001"
