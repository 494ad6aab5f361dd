"""A pod with a `storageUri` on Kubernetes, KServe's way: a storage-initializer init container
fills an emptyDir at /mnt/models before the server starts, and the server gets it read-only
in MODEL_DIR. One node agent serves every node, so the fetch runs in the pod, on its node
(`python -m partitions.modelcache.initializer`, fnplane's image), under the same URI policy
as local nodes (passed in its environment)."""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import urlsplit

from kernel.messages import ServiceSpec

MOUNT = "/mnt/models"  # KServe's
VOLUME = "kserve-provision-location"  # KServe's name for the same volume
INIT_CONTAINER = "storage-initializer"


def with_storage_initializer(manifest: dict[str, Any], spec: ServiceSpec, *, image: str,
                             model_hosts: tuple[str, ...] = (),
                             max_bytes: int = 0, timeout_s: float = 0.0) -> dict[str, Any]:
    """The Pod `manifest` with the init container and the volume when the service names
    a storage URI; unchanged otherwise."""
    if not spec.storage_uri:
        return manifest
    out = copy.deepcopy(manifest)
    pod = out["spec"]
    main = pod["containers"][0]
    env = [e for e in main.get("env", []) if e["name"] not in ("MODEL_DIR", "STORAGE_URI")]
    main["env"] = sorted([*env, {"name": "MODEL_DIR", "value": MOUNT},
                          {"name": "STORAGE_URI", "value": spec.storage_uri}],
                         key=lambda e: e["name"])
    main.setdefault("volumeMounts", []).append(
        {"name": VOLUME, "mountPath": MOUNT, "readOnly": True})
    if not model_hosts:
        # The registry checked the URI against `--model-hosts` at deploy; the pod fetches
        # that host and no other.
        parts = urlsplit(spec.storage_uri)
        model_hosts = (parts.netloc.rsplit("@", 1)[-1],) if parts.netloc else ()
    init_env = [{"name": "FNPLANE_MODEL_HOSTS", "value": ",".join(model_hosts)}]
    if max_bytes:
        init_env.append({"name": "FNPLANE_MODEL_MAX_BYTES", "value": str(max_bytes)})
    if timeout_s:
        init_env.append({"name": "FNPLANE_MODEL_FETCH_TIMEOUT_S", "value": f"{timeout_s:g}"})
    if spec.storage_sha256:
        init_env.append({"name": "FNPLANE_MODEL_SHA256", "value": spec.storage_sha256})
    pod.setdefault("initContainers", []).append({
        "name": INIT_CONTAINER,
        "image": image,
        "imagePullPolicy": main.get("imagePullPolicy", "IfNotPresent"),
        "command": ["python", "-m", "partitions.modelcache.initializer"],
        "args": [spec.storage_uri, MOUNT],
        "env": init_env,
        "volumeMounts": [{"name": VOLUME, "mountPath": MOUNT}],
        "resources": {"requests": {"cpu": "100m", "memory": "100Mi"},
                      "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": copy.deepcopy(main.get("securityContext", {})),
    })
    pod.setdefault("volumes", []).append({"name": VOLUME, "emptyDir": {}})
    return out
