"""The node model a `schedule` instance keeps for the nodes it owns: capacity, what is
committed to which pod (and which of the node's GPU devices), and the models cached there.
Only the partition's owner writes it."""

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
    devices: dict[str, tuple[int, ...]] = field(default_factory=dict)  # pod → its GPUs

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
        self.take_devices(pod, req.gpu)

    def release(self, pod: str) -> bool:
        req = self.committed.pop(pod, None)
        self.devices.pop(pod, None)
        if req is None:
            return False
        self.used = self.used - req
        return True

    # ---- GPU devices ----------------------------------------------------------------------

    def gpu_ids(self) -> list[int]:
        """The node's GPU device indices: as it registered them, else 0 to gpu-1."""
        return list(self.info.gpu_devices) or list(range(self.info.capacity.gpu))

    def free_devices(self) -> list[int]:
        taken = {d for ds in self.devices.values() for d in ds}
        return [d for d in self.gpu_ids() if d not in taken]

    def take_devices(self, pod: str, count: int, known: tuple[int, ...] = ()) -> None:
        """Give `pod` `count` GPU devices: the lowest free ones, or `known` (what its node
        says it already has, on adoption: the truth, even where it contradicts us)."""
        if count <= 0 or pod in self.devices:
            return
        self.devices[pod] = tuple(known) or tuple(self.free_devices()[:count])

    def over_committed(self) -> bool:
        f = self.free
        return f.cpu < -1e-9 or f.memory_mb < 0 or f.gpu < 0
