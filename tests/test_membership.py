"""When a `schedule` instance leaves and rejoins the placement queue group: pure decisions."""

from __future__ import annotations

from kernel.messages import Resources
from partitions.membership import Membership

POD = Resources(cpu=1.0, memory_mb=4096)
ROOM = Resources(cpu=2.0, memory_mb=8192)
FULL = Resources(cpu=0.5, memory_mb=1024)


def test_a_full_partition_steps_aside_only_while_a_peer_has_room() -> None:
    m = Membership()
    assert m.leave_after_refusal(POD, peer_has_room=False) is False
    assert m.serving
    assert m.leave_after_refusal(POD, peer_has_room=True) is True
    assert not m.serving
    # already aside: not asked to leave twice
    assert m.leave_after_refusal(POD, peer_has_room=True) is False


def test_it_rejoins_when_what_it_refused_fits_again() -> None:
    m = Membership()
    m.leave_after_refusal(POD, peer_has_room=True)
    assert m.rejoin(FULL, peer_has_room_for_it=True) is False
    assert not m.serving
    assert m.rejoin(ROOM, peer_has_room_for_it=True) is True
    assert m.serving


def test_it_rejoins_when_no_peer_has_room_any_more() -> None:
    """An empty queue group would leave `scale` waiting: when nobody has room, every
    instance is as good a place to ask as any."""
    m = Membership()
    m.leave_after_refusal(POD, peer_has_room=True)
    assert m.rejoin(FULL, peer_has_room_for_it=False) is True
    assert m.serving


def test_a_new_partition_forgets_what_the_old_one_refused() -> None:
    m = Membership()
    m.leave_after_refusal(POD, peer_has_room=True)
    m.reset()
    assert m.serving
    assert m.rejoin(FULL, peer_has_room_for_it=True) is False  # serving: nothing to rejoin


def test_only_a_serving_peer_is_one_to_step_aside_for() -> None:
    """A peer that stepped aside itself still takes reserves (a probe may go there), but
    stepping aside for it could leave the queue group empty."""
    from kernel.messages import PartitionSummary
    from partitions.probecache import ProbeCache

    cache = ProbeCache(clock=lambda: 0.0)
    cache.update(PartitionSummary(partition=1, epoch=1, owner="b", free=ROOM, largest_free=ROOM,
                                  serving=False))
    assert [s.partition for s in cache.candidates(POD, exclude=0)] == [1]
    assert cache.candidates(POD, exclude=0, serving=True) == []


def test_a_partition_the_cache_knows_nothing_of_is_probed_last_not_taken_for_full() -> None:
    """An instance that just started (or whose peer's summaries were lost) has an empty
    cache: the partitions the map says are owned are still worth one probe each."""
    from kernel.messages import PartitionSummary
    from partitions.probecache import ProbeCache

    now = [0.0]
    cache = ProbeCache(ttl_s=2.0, clock=lambda: now[0])
    owned = {0: 3, 1: 5, 2: 1}  # partition → epoch, ours is 0
    assert cache.unknown(owned, exclude=0) == [(1, 5), (2, 1)]
    cache.update(PartitionSummary(partition=1, epoch=5, owner="b", free=FULL,
                                  largest_free=FULL))
    assert cache.unknown(owned, exclude=0) == [(2, 1)]  # known full: not probed blind
    now[0] = 3.0  # the summary is stale: knowing nothing again
    assert cache.unknown(owned, exclude=0) == [(1, 5), (2, 1)]
