"""The node model a `schedule` instance keeps for the nodes it owns: capacity, what is
committed to which pod, and the models cached there. Only the partition's owner writes it."""

from __future__ import annotations

from dataclasses import dataclass, field

from kernel.messages import NodeInfo, Resources


class OverCommit(Exception):
    """A commit would exceed a node's capacity: a bug in the caller, never a normal path."""


@dataclass
class NodeState:
    info: NodeInfo
    committed: dict[str, Resources] = field(default_factory=dict)  # pod → its requests
    used: Resources = Resources()
    models: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.models = set(self.info.models)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def free(self) -> Resources:
        return self.info.capacity - self.used

    def fits(self, req: Resources) -> bool:
        return req.fits_in(self.free)

    def commit(self, pod: str, req: Resources) -> None:
        if pod in self.committed:
            return  # idempotent: a retried commit of the same pod changes nothing
        if not self.fits(req):
            raise OverCommit(f"{pod} ({req}) does not fit on {self.name} (free {self.free})")
        self.committed[pod] = req
        self.used = self.used + req

    def release(self, pod: str) -> bool:
        req = self.committed.pop(pod, None)
        if req is None:
            return False
        self.used = self.used - req
        return True

    def over_committed(self) -> bool:
        f = self.free
        return f.cpu < -1e-9 or f.memory_mb < 0 or f.gpu < 0
