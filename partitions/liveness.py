"""Which nodes are still vouched for: the coordinator's pure record of when each node was
last named in a heartbeat (`NodesAlive`), by its own clock, and which have been silent past
the timeout and so leave the partition map. No I/O; time is passed in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class NodeLiveness:
    timeout_s: float
    heard: dict[str, float] = field(default_factory=dict)  # node → when we last heard of it

    def alive(self, nodes: Iterable[str], now: float) -> None:
        for name in nodes:
            self.heard[name] = now

    def forget(self, name: str) -> None:
        self.heard.pop(name, None)

    def forgive(self, now: float) -> None:
        """Our own silence (a stalled loop, our NATS connection down) is nobody's fault:
        every node starts a fresh timeout from `now`."""
        for name in self.heard:
            self.heard[name] = now

    def expire(self, now: float) -> list[str]:
        """Nodes silent for longer than the timeout, sorted; they are forgotten here (a node
        that speaks again must register again before it is tracked)."""
        gone = sorted(n for n, t in self.heard.items() if now - t > self.timeout_s)
        for name in gone:
            del self.heard[name]
        return gone
