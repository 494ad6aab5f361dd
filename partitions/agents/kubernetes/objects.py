"""What the `kubernetes` node backend reads from and writes to Kubernetes objects, as pure
functions over the API's JSON: a Node becomes a `NodeInfo` (or a reason it takes no pods),
a `StartPod` becomes a Pod manifest, and a Pod's status becomes what the pod contract of
DESIGN.md cares about (bound, ready at an IP, failed and why). No I/O here.

Labels and annotations fnplane owns:
- Pods: `app.kubernetes.io/managed-by: fnplane` (what the backend watches and adopts),
  `fnplane.dev/service`, `fnplane.dev/pod`; annotations keep what a restarted control plane
  needs to report an adopted pod exactly as the one that created it did (port, container
  concurrency, cold-start stamps, startup timeout).
- Nodes: the annotation `fnplane.dev/models` lists the model weights a node has cached,
  comma-separated (`kubectl annotate node gpu-1 fnplane.dev/models=sample,llama-3-8b`);
  `schedule` prefers those nodes for cold-start locality.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from kernel.messages import NodeInfo, PodTimeline, Resources, StartPod, Taint, Toleration
from partitions.tolerations import pod_tolerations

SCHEDULER_NAME = "fnplane"
CONTAINER = "predictor"
GPU = "nvidia.com/gpu"

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "fnplane"
LABEL_SERVICE = "fnplane.dev/service"
LABEL_POD = "fnplane.dev/pod"
POD_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"

ANN_MODELS = "fnplane.dev/models"
ANN_PORT = "fnplane.dev/port"
ANN_CC = "fnplane.dev/container-concurrency"
ANN_REQUESTED_AT = "fnplane.dev/requested-at"
ANN_PLACED_AT = "fnplane.dev/placed-at"
ANN_STARTUP_TIMEOUT = "fnplane.dev/startup-timeout-seconds"
ANN_GENERATION = "fnplane.dev/generation"

# Waiting reasons after which a container will not start without a change to its spec or
# image; with restartPolicy Never a crash ends in a terminated state instead.
FATAL_WAITING = frozenset({
    "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
    "CreateContainerError", "RunContainerError", "CrashLoopBackOff",
})
# The kubelet is still getting the image: the pull deadline runs, not the startup one.
# ErrImagePull and ImagePullBackOff are retried by the kubelet (a registry's 429 or 5xx, a
# reset connection pass); fatal at once only when the registry says the image is not there
# or not for us, which no retry changes.
PULLING = frozenset({"ContainerCreating", "ErrImagePull", "ImagePullBackOff"})
_HOPELESS_PULL = re.compile(
    r"not found|manifest unknown|no such image|repository does not exist|pull access denied"
    r"|access to the resource is denied|unauthorized|authentication required"
    r"|authorization failed|401 unauthorized|403 forbidden|invalid reference format",
    re.IGNORECASE)


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


# ---- nodes ---------------------------------------------------------------------------------


def fnplane_node_name(k8s_name: str) -> str:
    """Kubernetes node names may contain dots, which NATS reads as subject separators; they
    never contain '_', so the mapping is reversible."""
    return k8s_name.replace(".", "_")


def node_info(node: dict[str, Any]) -> NodeInfo:
    alloc = (node.get("status") or {}).get("allocatable") or {}
    meta = _meta(node)
    models = (meta.get("annotations") or {}).get(ANN_MODELS, "")
    return NodeInfo(
        name=fnplane_node_name(meta["name"]),
        capacity=Resources(
            cpu=float(_quantity(alloc.get("cpu", "0"))),
            memory_mb=int(_quantity(alloc.get("memory", "0")) / (1024 * 1024)),
            gpu=int(_quantity(alloc.get(GPU, "0"))),
        ),
        labels=dict(meta.get("labels") or {}),
        models=sorted({m.strip() for m in models.split(",") if m.strip()}),
        backend="kubernetes",
        taints=node_taints(node),
    )


def node_taints(node: dict[str, Any]) -> list[Taint]:
    """The Node's taints; `schedule` places on a tainted node only the pods that tolerate
    them (partitions/tolerations.py), as kube-scheduler's TaintToleration filter does."""
    out = []
    for t in (node.get("spec") or {}).get("taints") or []:
        if t.get("effect") in ("NoSchedule", "PreferNoSchedule", "NoExecute") and t.get("key"):
            out.append(Taint(key=str(t["key"]), value=str(t.get("value") or ""),
                             effect=t["effect"]))
    return out


def unschedulable_reason(node: dict[str, Any]) -> str:
    """Why a node must take no new pods at all, or "" when it may (as kube-scheduler's
    filters: cordoned, not Ready). Taints keep off only the pods that do not tolerate them:
    `node_taints`."""
    spec, status = node.get("spec") or {}, node.get("status") or {}
    if spec.get("unschedulable"):
        return "cordoned (unschedulable)"
    ready = _condition(status, "Ready")
    if ready != "True":
        return f"not Ready (Ready={ready or 'Unknown'})"
    return ""


def node_down(node: dict[str, Any]) -> str:
    """Why the pods on a node must get no traffic, or "" when they may: its Ready condition
    is False (the kubelet says so) or Unknown (the node controller heard nothing from the
    kubelet: a spot machine reclaimed, a partition). Cordons and taints do not count: they
    keep new pods off, while the running ones serve on (NoExecute evicts them by deletion)."""
    ready = _condition(node.get("status") or {}, "Ready")
    if ready == "True":
        return ""
    return f"node {_meta(node).get('name', '?')} is not Ready (Ready={ready or 'Unknown'})"


def _quantity(value: object) -> Decimal:
    try:
        return parse_quantity(value)
    except ValueError:
        return Decimal(0)


def _condition(status: dict[str, Any], kind: str) -> str:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return str(cond.get("status", ""))
    return ""


# ---- pods we create --------------------------------------------------------------------------


def label_value(text: str) -> str:
    """Label values are at most 63 characters; long pod names keep a recognisable prefix."""
    if len(text) <= 63:
        return text
    return f"{text[:54]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def cpu_quantity(cores: float) -> str:
    return f"{round(cores * 1000)}m"


def pod_manifest(
    start: StartPod,
    *,
    namespace: str,
    image: str,
    port: int,
    image_pull_policy: str = "IfNotPresent",
    grace_s: int = 10,
    run_as_user: int = 10001,
    run_as_group: int = 10001,
) -> dict[str, Any]:
    """The Pod for one StartPod: the pod contract of DESIGN.md in Kubernetes terms.

    No nodeName: the Pod waits for our Binding, as pods of any custom scheduler do. Limits
    equal requests (Guaranteed QoS), so what `schedule` accounts is what the pod may use.
    restartPolicy Never: a pod that exits is reported failed and replaced by `scale` with
    backoff, instead of crash-looping where nobody sees it.
    """
    spec = start.spec
    res = spec.resources
    quantities: dict[str, str] = {"cpu": cpu_quantity(res.cpu), "memory": f"{res.memory_mb}Mi"}
    if res.gpu:
        quantities[GPU] = str(res.gpu)
    env = {
        **spec.env,
        "PORT": str(port),
        "HOST": "0.0.0.0",  # the pod's own network namespace: listen where the kubelet probes
        "MODEL_NAME": spec.env.get("MODEL_NAME", spec.name),
        "MODEL_VERSION": spec.env.get("MODEL_VERSION", spec.model_version),
        # Knative's K_SERVICE and K_REVISION: the service clients call, the revision running.
        "FNPLANE_SERVICE": spec.revision_of or spec.name,
        **({"FNPLANE_REVISION": spec.name} if spec.revision_of else {}),
        "FNPLANE_POD": start.pod,
        "FNPLANE_NODE": start.node,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": start.pod,
            "namespace": namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_SERVICE: spec.name,
                LABEL_POD: label_value(start.pod),
            },
            "annotations": {
                ANN_PORT: str(port),
                ANN_CC: str(spec.container_concurrency),
                ANN_REQUESTED_AT: repr(start.requested_at),
                ANN_PLACED_AT: repr(start.placed_at),
                ANN_STARTUP_TIMEOUT: repr(spec.startup_timeout_s),
                ANN_GENERATION: str(spec.generation),
            },
        },
        "spec": {
            "schedulerName": SCHEDULER_NAME,
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": grace_s,
            "securityContext": security_context(run_as_user, run_as_group),
            "containers": [
                {
                    "name": CONTAINER,
                    "image": image,
                    "imagePullPolicy": image_pull_policy,
                    "command": list(spec.command),
                    "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
                    "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
                    "resources": {"requests": dict(quantities), "limits": dict(quantities)},
                    "readinessProbe": {
                        "httpGet": {"path": spec.readiness_path, "port": port},
                        # Whole seconds, at least 1, as the API validates them.
                        "periodSeconds": max(1, math.ceil(spec.readiness_period_s)),
                        "timeoutSeconds": 1,
                        "successThreshold": 1,
                        "failureThreshold": spec.readiness_failure_threshold,
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
            **tolerations_field(pod_tolerations(spec)),
        },
    }


def security_context(uid: int, gid: int) -> dict[str, Any]:
    """The pod's user, always numeric: with runAsNonRoot and no runAsUser the kubelet takes
    the image's USER and refuses root or a name (CreateContainerConfigError), which is what
    most inference images have. uid 0 is root asked for explicitly: runAsNonRoot goes, and
    a namespace at Pod Security `restricted` refuses the pod with its reason."""
    return {"runAsNonRoot": uid != 0, "runAsUser": uid, "runAsGroup": gid,
            "seccompProfile": {"type": "RuntimeDefault"}}
def tolerations_field(tolerations: tuple[Toleration, ...]) -> dict[str, Any]:
    """`spec.tolerations` as the API writes them (empty fields omitted), or nothing."""
    if not tolerations:
        return {}
    out = []
    for t in tolerations:
        item: dict[str, Any] = {"key": t.key, "operator": t.operator, "value": t.value,
                                "effect": t.effect, "tolerationSeconds": t.toleration_seconds}
        out.append({k: v for k, v in item.items() if v not in ("", None)})
    return {"tolerations": out}


def binding(pod: str, namespace: str, k8s_node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": pod, "namespace": namespace},
        "target": {"apiVersion": "v1", "kind": "Node", "name": k8s_node},
    }


# ---- pods we watch ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PodView:
    """A Pod as the pod contract sees it."""

    name: str
    service: str
    k8s_node: str  # "" until bound
    ip: str
    ready: bool
    terminating: bool
    failed: str  # why it can never become (or stay) ready; "" while it can


def observe_pod(pod: dict[str, Any]) -> PodView:
    meta, spec, status = _meta(pod), pod.get("spec") or {}, pod.get("status") or {}
    return PodView(
        name=meta.get("name", ""),
        service=(meta.get("labels") or {}).get(LABEL_SERVICE, ""),
        k8s_node=spec.get("nodeName") or "",
        ip=status.get("podIP") or "",
        ready=_condition(status, "Ready") == "True" and bool(status.get("podIP")),
        terminating=bool(meta.get("deletionTimestamp")),
        failed=_failure(status),
    )


def _failure(status: dict[str, Any]) -> str:
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "terminated" in state:
            term = state["terminated"] or {}
            why = f" ({term['reason']})" if term.get("reason") not in (None, "", "Error",
                                                                         "Completed") else ""
            return f"pod exited with code {term.get('exitCode', '?')}{why}"
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING or (
                waiting.get("reason") in PULLING and hopeless_pull(waiting.get("message"))):
            msg = f": {waiting['message']}" if waiting.get("message") else ""
            return f"{waiting['reason']}{msg}"
    phase = status.get("phase")
    if phase in ("Failed", "Succeeded"):
        # Evicted, OutOfcpu, NodeAffinity...: the kubelet refused or dropped the pod.
        reason = status.get("reason") or phase
        return f"{reason}: {status['message']}" if status.get("message") else str(reason)
    return ""


def hopeless_pull(message: str | None) -> bool:
    """An image pull error no retry fixes (not found, denied). Quoted parts are the image's
    own name, which may contain any word."""
    return bool(message) and bool(_HOPELESS_PULL.search(re.sub(r'"[^"]*"', '""', message)))


def container_state(pod: dict[str, Any]) -> tuple[str, str, bool]:
    """The container's waiting reason and message ("" when not waiting), and whether it
    runs."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        waiting = state.get("waiting") or {}
        return (str(waiting.get("reason") or ""), str(waiting.get("message") or ""),
                "running" in state)
    return "", "", False


def container_started_at(pod: dict[str, Any]) -> float:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        running = (cs.get("state") or {}).get("running") or {}
        return _timestamp(running.get("startedAt"))
    return 0.0


@dataclass(frozen=True)
class PodRecord:
    """What a control plane that did not create a pod needs to report it (adoption)."""

    service: str
    port: int
    container_concurrency: int
    resources: Resources
    timeline: PodTimeline
    startup_timeout_s: float


def pod_record(pod: dict[str, Any]) -> PodRecord:
    meta = _meta(pod)
    ann = meta.get("annotations") or {}
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    requests = (containers[0].get("resources") or {}).get("requests") or {}
    created = _timestamp(meta.get("creationTimestamp"))
    return PodRecord(
        service=(meta.get("labels") or {}).get(LABEL_SERVICE, ""),
        port=int(ann.get(ANN_PORT, "8080")),
        container_concurrency=int(ann.get(ANN_CC, "0")),
        resources=Resources(
            cpu=float(_quantity(requests.get("cpu", "0"))),
            memory_mb=int(_quantity(requests.get("memory", "0")) / (1024 * 1024)),
            gpu=int(_quantity(requests.get(GPU, "0"))),
        ),
        timeline=PodTimeline(
            requested_at=_float(ann.get(ANN_REQUESTED_AT), created),
            placed_at=_float(ann.get(ANN_PLACED_AT), created),
            # The bind time is not stored (that would need a patch right on the hot path);
            # creation is within milliseconds of it.
            spawned_at=created,
        ),
        startup_timeout_s=_float(ann.get(ANN_STARTUP_TIMEOUT), 60.0),
    )


def _float(text: str | None, default: float) -> float:
    try:
        return float(text) if text else default
    except ValueError:
        return default


def _timestamp(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
