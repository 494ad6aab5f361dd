"""`fnplane up --backend kubernetes --kubeconfig PATH`, as a developer runs it out of cluster,
against a fake API server on loopback (no real cluster can run here): the cluster's
schedulable Nodes are fnplane's nodes, and Ctrl-C stops the control plane."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from kernel.procs import free_port
from tests.kubelet import node
from tests.kubeutil import fake_cluster
from tests.stackutil import REPO

FNPLANE = [sys.executable, "-m", "controlplane.cli"]


async def test_up_with_the_kubernetes_backend_uses_the_clusters_nodes(tmp_path: Path) -> None:
    nodes = [node("k8s-a", cpu="8", memory="16Gi", models="sample"), node("k8s-b", ready=False)]
    async with fake_cluster(tmp_path, nodes) as cluster:
        port, nats_port = free_port(), free_port()
        env = {**os.environ, "FNPLANE_NATS_URL": f"nats://127.0.0.1:{nats_port}",
               "FNPLANE_STATE_DIR": str(tmp_path / "state")}
        up = await asyncio.create_subprocess_exec(
            *FNPLANE, "up", "--backend", "kubernetes", "--kubeconfig", str(cluster.kubeconfig),
            "--port", str(port), "--nats-port", str(nats_port), "--grpc-port", "0",
            "--state-dir", str(tmp_path / "state"), cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert up.stdout is not None
        banner = []
        try:
            async with asyncio.timeout(90):  # a loaded machine starts Python slowly
                while line := (await up.stdout.readline()).decode():
                    banner.append(line)
                    if "Ctrl-C" in line:
                        break
            assert any("the cluster of" in b for b in banner), banner
            status = await asyncio.create_subprocess_exec(
                *FNPLANE, "status", "--json", cwd=REPO, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(status.communicate(), timeout=30)
            assert status.returncode == 0, err.decode()
            got = json.loads(out)["partitions"]["nodes"]
            assert set(got) == {"k8s-a"}
            assert got["k8s-a"]["backend"] == "kubernetes"
            assert got["k8s-a"]["models"] == ["sample"]
        finally:
            if up.returncode is None:
                up.send_signal(signal.SIGINT)
            code = await asyncio.wait_for(up.wait(), timeout=30)
        assert code == 0, "".join(banner)
        assert {c.resource for c in cluster.fake.calls("fnplane-node")} == {"nodes", "pods"}
