"""The FnService reconciler against a fake API server on loopback (kmock-based; no real
cluster can run here) and the embedded stack on the real nats-server and Redis: creating
an FnService registers the service, its status (through the status subresource) follows
fnplane, a spec change is a new generation, a bad spec is reported in the Ready condition,
and deletion (held by a finalizer) removes the service."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml

from controlplane.operator import FINALIZER, FnServiceOperator, OperatorConfig
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import NameRequest
from tests.deployutil import assert_least_privilege
from tests.kubelet import node, wait_for
from tests.kubeutil import Cluster, fake_cluster
from tests.stackutil import REPO, admin, describe, running_stack
from tests.test_scale_from_zero import expected, v2_body

SAMPLE = yaml.safe_load((REPO / "examples/sample/fnservice.yaml").read_text())
PATH = "/apis/fnplane.dev/v1alpha1/namespaces/fnplane/fnservices"


@asynccontextmanager
async def operator_on(cluster: Cluster, nats_url: str) -> AsyncIterator[FnServiceOperator]:
    op = FnServiceOperator(await Bus.connect(nats_url, "operator"), OperatorConfig(
        kubeconfig=str(cluster.kubeconfig), status_interval_s=0.3, watch_timeout_s=5,
        request_timeout_s=5))
    await op.start()
    try:
        yield op
    finally:
        await op.stop()
        assert_least_privilege("operator", cluster.fake.calls("fnplane-operator"))


def fnservice(cluster: Cluster) -> dict[str, Any]:
    return cluster.fake.get("fnplane.dev", "fnservices", "sample", "fnplane")


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "Ready"), {})


async def kubectl(cluster: Cluster, method: str, path: str, body: Any = None,
                  content_type: str = "application/json") -> dict[str, Any]:
    """What `kubectl apply/patch/delete` sends."""
    data = None if body is None else json.dumps(body)
    headers = {"Content-Type": content_type, "User-Agent": "kubectl/v1.37"}
    async with aiohttp.ClientSession() as http, \
            http.request(method, cluster.url + path, data=data, headers=headers) as r:
        out = await r.json()
        assert r.status < 300, out
        return out


async def until(cluster: Cluster, pred: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = 10) -> dict[str, Any]:
    await wait_for(lambda: pred(fnservice(cluster)), timeout=timeout, what=what)
    return fnservice(cluster)


async def test_an_fnservice_is_registered_served_updated_and_deleted(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with fake_cluster(tmp_path, [node("n1")]) as cluster, \
            running_stack(nats_url, redis_url, tmp_path / "state") as stack, \
            operator_on(cluster, nats_url):
        await kubectl(cluster, "POST", PATH, copy.deepcopy(SAMPLE))
        obj = await until(cluster, lambda o: ready(o).get("reason") == "ScaledToZero",
                          "the service registered, at zero pods")
        assert FINALIZER in obj["metadata"]["finalizers"]
        assert obj["status"]["observedGeneration"] == 1
        assert obj["status"]["url"].endswith("/v2/models/sample/infer")
        st = await describe(nats_url, "sample")
        assert st.spec.scaling.max_scale == 4 and st.spec.container_concurrency == 4

        async with aiohttp.ClientSession() as http, \
                http.post(f"{stack.url}/v2/models/sample/infer", json=v2_body()) as r:
            assert r.status == 200
            out = (await r.json())["outputs"][0]
        assert np.allclose(np.asarray(out["data"]).reshape(out["shape"]), expected(), atol=1e-6)
        obj = await until(cluster, lambda o: (o.get("status") or {}).get("readyReplicas") == 1
                          and "lastColdStart" in o["status"], "status from fnplane")
        assert ready(obj)["reason"] == "PodsReady"
        assert obj["status"]["lastColdStart"]["totalMs"] > 0

        # A new generation is registered again.
        await kubectl(cluster, "PATCH", f"{PATH}/sample",
                      {"spec": {"predictor": {"maxReplicas": 2}}},
                      "application/merge-patch+json")
        await until(cluster, lambda o: o["status"]["observedGeneration"] == 2,
                    "generation 2 observed")
        assert (await describe(nats_url, "sample")).spec.scaling.max_scale == 2

        # A spec fnplane refuses (the API server's CEL rule would refuse it first; this
        # fake does not run CEL) is reported, and the registered spec stays as it was.
        await kubectl(cluster, "PATCH", f"{PATH}/sample",
                      {"spec": {"predictor": {"minReplicas": 3}}},
                      "application/merge-patch+json")
        obj = await until(cluster, lambda o: ready(o).get("reason") == "InvalidSpec",
                          "the invalid spec reported")
        assert "min-scale 3 > max-scale 2" in ready(obj)["message"]
        assert (await describe(nats_url, "sample")).spec.scaling.min_scale == 0

        # Deletion waits for the registry, then the finalizer goes and the object with it.
        await kubectl(cluster, "DELETE", f"{PATH}/sample")
        await wait_for(lambda: fnservice(cluster) == {}, timeout=10, what="the FnService gone")
        async with admin(nats_url) as bus:
            with pytest.raises(RemoteError) as err:
                await bus.call(ep.ADMIN_DESCRIBE, NameRequest(name="sample"), timeout=5)
        assert err.value.code == ErrorCode.NOT_FOUND


async def test_each_create_deploys_once_and_finalizers_never_overwrite_another_controllers(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The operator reconciles from the object as it is now, not from the event that
    announced it: its own finalizer patch raises a MODIFIED event whose object carries no
    status yet, and reconciling that stale object registered the service a second time
    (generation 2 for one create). Its finalizer is written with the resourceVersion it was
    computed from (409 on a stale one, then read again), so another controller's finalizer
    added meanwhile survives."""
    async with fake_cluster(tmp_path, [node("n1")]) as cluster, \
            running_stack(nats_url, redis_url, tmp_path / "state"), \
            operator_on(cluster, nats_url) as op:
        await kubectl(cluster, "POST", PATH, copy.deepcopy(SAMPLE))
        await until(cluster, lambda o: (o.get("status") or {}).get("url"), "registered")
        # A later change the operator must see last: every earlier event was handled by then.
        await kubectl(cluster, "PATCH", f"{PATH}/sample",
                      {"metadata": {"annotations": {"seen": "1"}}},
                      "application/merge-patch+json")
        await wait_for(lambda: (op.objects.get("sample", {}).get("metadata", {})
                                .get("annotations") or {}).get("seen") == "1",
                       timeout=10, what="the operator caught up")
        assert (await describe(nats_url, "sample")).spec.generation == 1

        # A stale copy (no finalizers) while the server's object has another controller's.
        cluster.fake.pause_watches()
        other = {**copy.deepcopy(SAMPLE), "metadata": {"name": "other", "finalizers": [
            "example.com/keep"]}}
        stale = copy.deepcopy(await kubectl(cluster, "POST", PATH, other))
        stale["metadata"]["finalizers"] = []
        await kubectl(cluster, "PATCH", f"{PATH}/other",
                      {"metadata": {"labels": {"touched": "yes"}}},
                      "application/merge-patch+json")
        await op.reconcile(stale)
        got = cluster.fake.get("fnplane.dev", "fnservices", "other", "fnplane")
        assert got["metadata"]["finalizers"] == ["example.com/keep", FINALIZER]
        # Read-modify-write from the stale copy: refused (409), read again, kept both.
        stale["metadata"]["finalizers"] = ["example.com/keep", FINALIZER]
        out = await op._set_finalizers(stale, remove=True)
        assert out is not None and out["metadata"]["finalizers"] == ["example.com/keep"]
        patches = [c for c in cluster.fake.calls("fnplane-operator")
                   if c.verb == "patch" and c.name == "other"]
        assert len(patches) >= 3  # ours added, a refused removal, the removal again
