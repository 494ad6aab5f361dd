"""Whether a `schedule` instance takes placements from the queue group all instances share.

The queue group hands each placement to a random instance. One whose partition is full can
only forward it (a probe: one more round trip to a peer with room), so when the probe cache
shows a peer with room for what we just refused, we step aside — leave the group, as a
Kubernetes replica that is not ready leaves its Service — and the group sends placements to
the instances that can place them. We rejoin as soon as our partition fits what we refused
(pods ended) or no peer has room any more (then we are as good a place to ask as any, and an
empty group would leave `scale` waiting). Pure: the adapter subscribes and unsubscribes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel.messages import Resources


@dataclass
class Membership:
    aside_for: Resources | None = None  # what we refused when we stepped aside

    @property
    def serving(self) -> bool:
        return self.aside_for is None

    def leave_after_refusal(self, refused: Resources, peer_has_room: bool) -> bool:
        """We had no room for `refused`: True when we should leave the group now."""
        if self.aside_for is None and peer_has_room:
            self.aside_for = refused
            return True
        return False

    def rejoin(self, own_largest_free: Resources, peer_has_room_for_it: bool) -> bool:
        """True when we should take placements again."""
        if self.aside_for is None:
            return False
        if self.aside_for.fits_in(own_largest_free) or not peer_has_room_for_it:
            self.aside_for = None
            return True
        return False

    def reset(self) -> None:
        """A new partition (or none): whatever we refused before says nothing about it."""
        self.aside_for = None
