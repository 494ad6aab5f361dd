"""One typed configuration, built at the edge (CLI flags, environment) and handed to
constructors. Sections validate themselves once, so a bad value fails at start with a clear
message rather than deep in a request path."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.schemas import Resources


class ConfigError(ValueError):
    pass


def default_state_dir() -> Path:
    return Path(os.environ.get("FNPLANE_STATE_DIR", Path.home() / ".fnplane"))


DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@dataclass(frozen=True)
class ActivatorConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Bounded per-service buffer (Knative's activator capacity is per pod; an unbounded
    # buffer is knative/serving#13583). Beyond it: 503 with Retry-After.
    buffer_size: int = 1000
    # How long a buffered request may wait for a pod before it gets a 503.
    request_timeout_s: float = 60.0
    # How long a proxied request may take on the pod.
    pod_timeout_s: float = 300.0
    max_body_bytes: int = 16 * 1024 * 1024
    metrics_interval_s: float = 1.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"activator port {self.port} out of range")
        if self.buffer_size < 1:
            raise ConfigError("activator buffer size must be >= 1")
        if self.request_timeout_s <= 0 or self.pod_timeout_s <= 0:
            raise ConfigError("activator timeouts must be > 0")


@dataclass(frozen=True)
class ScaleConfig:
    # How often the autoscaler re-evaluates every service (Knative ticks every 2 s; demand
    # from the activator triggers an immediate evaluation regardless).
    tick_s: float = 0.5
    place_timeout_s: float = 5.0


@dataclass(frozen=True)
class ScheduleConfig:
    probe_cache_ttl_s: float = 2.0
    max_probes: int = 3
    reserve_timeout_s: float = 1.0


@dataclass(frozen=True)
class NodesConfig:
    count: int = 2
    capacity: Resources = Resources(cpu=4.0, memory_mb=8192, gpu=0)
    backend: str = "local"
    # Where pods are started from: the sample's `python -m examples.sample.server` resolves
    # against this directory.
    workdir: Path = field(default_factory=lambda: Path.cwd())

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError("need at least one node")


@dataclass(frozen=True)
class CoordinatorConfig:
    heartbeat_interval_s: float = 0.5
    # An instance silent for this long is declared dead and its partition reassigned.
    heartbeat_timeout_s: float = 1.5
    schedule_instances: int = 1
    scale_instances: int = 1
    route_instances: int = 1


@dataclass(frozen=True)
class Config:
    nats_url: str = DEFAULT_NATS_URL
    redis_url: str = "redis://127.0.0.1:6379/0"
    state_dir: Path = field(default_factory=default_state_dir)
    activator: ActivatorConfig = field(default_factory=ActivatorConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    nodes: NodesConfig = field(default_factory=NodesConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    trace_file: Path | None = None
