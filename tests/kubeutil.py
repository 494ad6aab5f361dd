"""Helpers for tests of the `kubernetes` backend: a fake cluster on loopback (kmock-based API
server, a kubeconfig that points at it, a kubelet emulator running bound pods as local
processes) and a stand-in coordinator that records node registrations. No real cluster can
run here; these are what the backend talks to instead."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmock
import yaml
from nats.aio.msg import Msg

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import (
    Empty,
    NameRequest,
    NodeInfo,
    NodeRegistration,
    PodEvent,
    SpecUpdated,
)
from partitions.agents.kubernetes.agent import KubernetesConfig
from tests.fakekube import FakeKubernetes
from tests.kubelet import KubeletEmulator
from tests.stackutil import REPO, sample_spec

NAMESPACE = "fnplane"


@dataclass
class Cluster:
    fake: FakeKubernetes
    url: str
    kubeconfig: Path
    kubelet: KubeletEmulator
    namespace: str = NAMESPACE

    def config(self, **overrides: Any) -> KubernetesConfig:
        """What the tests run the backend with: short watches (the server ends them every
        few seconds, so re-watching is exercised too) and a port per pod on loopback."""
        base: dict[str, Any] = dict(kubeconfig=str(self.kubeconfig), pod_port=0,
                                    watch_timeout_s=5, request_timeout_s=5, sync_timeout_s=10,
                                    stop_grace_s=2)
        return KubernetesConfig(**{**base, **overrides})

    def pods(self) -> list[dict[str, Any]]:
        return self.fake.objects("", "pods")


def write_kubeconfig(path: Path, server: str, namespace: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester",
                                                   "namespace": namespace}}],
    }))
    return path


@asynccontextmanager
async def fake_cluster(tmp_path: Path, nodes: list[dict[str, Any]]) -> AsyncIterator[Cluster]:
    async with FakeKubernetes() as fake, kmock.Server(fake) as server:
        for n in nodes:
            fake.put("", "nodes", n)
        url = str(server.url).rstrip("/")
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url, NAMESPACE)
        names = {n["metadata"]["name"] for n in nodes}
        async with KubeletEmulator(fake, url, names, namespace=NAMESPACE,
                                   workdir=REPO) as kubelet:
            yield Cluster(fake, url, kubeconfig, kubelet)


@dataclass
class Witness:
    """Stands in for the coordinator and the registry on NATS, and hears every pod event."""

    registered: list[NodeInfo] = field(default_factory=list)
    events: list[PodEvent] = field(default_factory=list)
    services: set[str] = field(default_factory=set)  # what admin.spec knows

    def nodes(self) -> dict[str, NodeInfo]:
        return {n.name: n for n in self.registered}

    def states(self, pod: str) -> list[str]:
        return [e.state for e in self.events if e.pod == pod]

    def last(self, pod: str) -> PodEvent:
        return [e for e in self.events if e.pod == pod][-1]


@asynccontextmanager
async def witness(nats_url: str, *, services: set[str] | None = None
                  ) -> AsyncIterator[Witness]:
    w = Witness(services=set(services or ()))
    bus = await Bus.connect(nats_url, "test-witness")

    async def on_register(msg: NodeRegistration, _raw: Msg) -> Empty:
        w.registered.extend(msg.infos)
        return Empty()

    async def on_event(msg: PodEvent, _raw: Msg) -> None:
        w.events.append(msg)

    async def on_spec(msg: NameRequest, _raw: Msg) -> SpecUpdated:
        if msg.name in w.services:
            return SpecUpdated(spec=sample_spec(msg.name))
        raise RemoteError(ErrorCode.NOT_FOUND, "service not found")

    await bus.serve(ep.NODE_REGISTER, on_register)
    await bus.serve(ep.POD_EVENTS, on_event)
    await bus.serve(ep.ADMIN_SPEC, on_spec)
    try:
        yield w
    finally:
        await bus.close()
