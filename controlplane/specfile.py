"""Service specs from users: `fnplane deploy -f spec.yaml` in a KServe-like shape (the same
shape the FnService custom resource has), and Kubernetes quantity strings for resources.
Unknown fields are errors: a typo must not silently deploy defaults.

Where KServe (`pkg/apis/serving/v1beta1`) has a field of the same meaning, its name and its
default are fnplane's: `minReplicas` defaults to 1, `predictor.model` is a ModelSpec object
(`modelFormat`, and the container fields `image`, `command`, `args`, `env`, `resources`).
`storageUri` (in the predictor or its `model`, as KServe has both) names the weights a
node fetches into its cache. KServe fields fnplane does not implement (`runtime`,
`protocolVersion`...) are refused by name, never accepted and ignored. Quantities are read
as the API server reads them (k8s.io/apimachinery `resource.Quantity`): a bare number of
memory is bytes."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from kernel.messages import (
    BatchingSpec,
    Resources,
    ScalingSpec,
    ServiceSpec,
    SpecError,
    Toleration,
    TrafficTarget,
)

DEFAULT_COMMAND = ["python", "-m", "examples.sample.server"]

# <signedNumber><suffix>, suffix binary SI, decimal SI (lower-case k, m for milli) or a
# decimal exponent; as resource.ParseQuantity, which refuses "K", "Gb" and spaces.
_QUANTITY_RE = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE]|[eE][+-]?\d+)?$")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
MIB = 1024 * 1024


def parse_quantity(value: str | float | int) -> Decimal:
    """A Kubernetes quantity ('500m', '1Gi', '1G', '1e3', '128974848') as a number, exactly;
    a YAML number is taken as it is, as the API server takes an int-or-string."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int | float):
        return Decimal(str(value))
    m = _QUANTITY_RE.match(str(value).strip())
    if not m:
        raise ValueError(f"{value!r} is not a quantity")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a quantity") from None
    suffix = m.group(2) or ""
    if suffix in _BINARY:
        return number * (1024 ** _BINARY[suffix])
    if suffix[:1] in ("e", "E") and suffix not in _DECIMAL:
        return number.scaleb(int(suffix[1:]))
    return number.scaleb(_DECIMAL[suffix])


def parse_cpu(value: str | float | int) -> float:
    """Cores; a bare number is cores, '500m' is half of one."""
    try:
        cores = parse_quantity(value)
    except ValueError:
        cores = Decimal(-1)
    if cores < 0:
        raise SpecError(f"cpu {value!r}: expected cores ('0.5', '2') or millicores ('500m')")
    return float(cores)


def parse_memory_mb(value: str | float | int) -> int:
    """Memory in MiB, rounded up (a pod never gets less than it asked for). A bare number is
    bytes, as Kubernetes reads it; under 1Mi is refused, since `memory: 256` meaning 256
    bytes is always a mistake, and a silent one on a real cluster (the pod is OOM-killed)."""
    try:
        n = parse_quantity(value)
    except ValueError:
        n = Decimal(-1)
    if n < 0:
        raise SpecError(f"memory {value!r}: expected a quantity such as '256Mi' or '1Gi'")
    if n < MIB:
        hint = (f"; a bare number is bytes, as in Kubernetes: did you mean '{value}Mi'?"
                if re.fullmatch(r"\d+", str(value).strip()) else "")
        raise SpecError(f"memory {value!r}: less than 1Mi{hint}")
    return math.ceil(n / MIB)


def _take(d: dict[str, Any], allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise SpecError(f"{where}: expected a mapping")
    unknown = set(d) - allowed
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return d


def spec_from_manifest(doc: dict[str, Any]) -> ServiceSpec:
    """An FnService document (apiVersion fnplane.dev/v1alpha1) → a validated ServiceSpec."""
    _take(doc, {"apiVersion", "kind", "metadata", "spec", "status"}, "document")
    if doc.get("kind", "FnService") != "FnService":
        raise SpecError(f"kind {doc.get('kind')!r}: expected FnService")
    name = (doc.get("metadata") or {}).get("name")
    if not name:
        raise SpecError("metadata.name is required")
    spec = _take(doc.get("spec") or {}, {"predictor", "traffic"}, "spec")
    pred = _take(
        spec.get("predictor") or {},
        {
            "minReplicas", "maxReplicas", "initialReplicas", "scaleTarget", "scaleMetric",
            "targetUtilizationPercentage", "containerConcurrency", "scaleWindowSeconds",
            "scaleToZeroGracePeriodSeconds", "scaleDownDelaySeconds", "targetBurstCapacity",
            "batching", "container", "model", "modelVersion", "modelId", "tolerations",
            "activationScale", "storageUri", "prefetch", "canaryTrafficPercent",
            "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds",
        },
        "spec.predictor",
    )
    container = _container(pred)
    storage_uri = _storage_uri(pred)
    model_format, model_id = "", str(pred.get("modelId", ""))
    if isinstance(pred.get("model"), dict):
        model_format = _model_format(pred["model"], container)
    elif pred.get("model") is not None:  # fnplane's first shape: the weights' identity
        model_id = model_id or str(pred["model"])
    # Kubernetes' Probe, the two fields fnplane honours after start-up (the path is
    # `readinessPath`); any other is refused rather than silently ignored.
    probe = _take(container.get("readinessProbe") or {}, {"periodSeconds", "failureThreshold"},
                  "spec.predictor.container.readinessProbe")
    command = list(container.get("command") or DEFAULT_COMMAND) + list(container.get("args") or [])
    env = {}
    for item in container.get("env") or []:
        _take(item, {"name", "value"}, "spec.predictor.container.env[]")
        if not item.get("name"):
            raise SpecError("spec.predictor.container.env[]: every variable needs a name")
        env[str(item["name"])] = str(item.get("value", ""))
    security = _take(container.get("securityContext") or {}, {"runAsUser", "runAsGroup"},
                     "spec.predictor.container.securityContext")
    res = _take(container.get("resources") or {}, {"requests", "limits"}, "resources")
    req = res.get("requests") or res.get("limits") or {}
    _take(req, {"cpu", "memory", "nvidia.com/gpu"}, "resources.requests")
    metric = pred.get("scaleMetric", "concurrency")
    if metric not in ("concurrency", "rps"):
        raise SpecError(f"scaleMetric {metric!r}: expected 'concurrency' or 'rps'")
    cc = int(pred.get("containerConcurrency", 0))
    target = pred.get("scaleTarget")
    has_target = target is not None  # 0 is a value to refuse, not a default to fall back on
    scaling = ScalingSpec(
        min_scale=int(pred.get("minReplicas", 1)),  # KServe's default, not Knative's 0
        max_scale=int(pred.get("maxReplicas", 0)),
        initial_scale=int(pred.get("initialReplicas", 1)),
        metric=metric,
        # No scaleTarget: Knative's target follows the container concurrency (kpa.py).
        target_concurrency=float(target) if has_target and metric == "concurrency" else None,
        target_rps=float(target) if has_target and metric == "rps" else 200.0,
        target_utilization=float(pred.get("targetUtilizationPercentage", 70)) / 100.0,
        stable_window_s=float(pred.get("scaleWindowSeconds", 60)),
        scale_to_zero_grace_s=float(pred.get("scaleToZeroGracePeriodSeconds", 30)),
        scale_down_delay_s=float(pred.get("scaleDownDelaySeconds", 0)),
        target_burst_capacity=float(pred.get("targetBurstCapacity", 211)),
        activation_scale=int(pred.get("activationScale", 0)),
    )
    batching = _take(pred.get("batching") or {}, {"maxBatchSize", "maxWaitMs"}, "batching")
    return ServiceSpec(
        name=str(name),
        command=[str(c) for c in command],
        env=env,
        resources=Resources(
            cpu=parse_cpu(req.get("cpu", "500m")),
            memory_mb=parse_memory_mb(req.get("memory", "256Mi")),
            gpu=int(req.get("nvidia.com/gpu", 0)),
        ),
        scaling=scaling,
        container_concurrency=cc,
        readiness_path=str(container.get("readinessPath", "/v2/health/ready")),
        startup_timeout_s=float(container.get("startupTimeoutSeconds", 60)),
        model=model_id,
        model_version=str(pred.get("modelVersion", "1")),
        image=str(container.get("image", "")),
        run_as_user=_uid(security, "runAsUser"),
        run_as_group=_uid(security, "runAsGroup"),
        model_format=model_format,
        tolerations=tolerations_from(pred.get("tolerations") or []),
        readiness_period_s=float(probe.get("periodSeconds", 1)),
        readiness_failure_threshold=int(probe.get("failureThreshold", 3)),
        storage_uri=storage_uri,
        prefetch=_count(pred.get("prefetch", 0), "spec.predictor.prefetch"),
        # Knative's RevisionSpec names, beside containerConcurrency as there.
        timeout_s=float(pred.get("timeoutSeconds", 300)),
        response_start_timeout_s=(None if pred.get("responseStartTimeoutSeconds") is None
                                  else float(pred["responseStartTimeoutSeconds"])),
        idle_timeout_s=float(pred.get("idleTimeoutSeconds", 0)),
        batching=BatchingSpec(
            max_batch_size=int(batching.get("maxBatchSize", 0)),
            max_wait_ms=float(batching.get("maxWaitMs", 5)),
        ),
    ).validate()


CONTAINER_FIELDS = {"command", "args", "env", "resources", "readinessPath",
                    "startupTimeoutSeconds", "image", "securityContext", "readinessProbe"}
# KServe ModelSpec fields with no fnplane meaning yet: refused by name, with the reason.
_NOT_IMPLEMENTED = {
    "storage": "fnplane fetches model weights by storageUri only",
    "runtime": "fnplane has no ServingRuntimes; name the server's image and command",
    "runtimeVersion": "fnplane has no ServingRuntimes; name the server's image",
    "protocolVersion": "the gateway serves KServe v1 and OIP v2 for every pod alike; the "
                       "pod must answer the protocol its clients use",
}


def _container(pred: dict[str, Any]) -> dict[str, Any]:
    """The predictor's container: fnplane's `container`, or the container fields of KServe's
    `model` (which embeds a Container), not both."""
    own = _take(pred.get("container") or {}, CONTAINER_FIELDS, "spec.predictor.container")
    model = pred.get("model")
    if not isinstance(model, dict):
        return own
    for name, why in _NOT_IMPLEMENTED.items():
        if name in model:
            raise SpecError(f"spec.predictor.model.{name}: not supported by fnplane ({why})")
    _take(model, CONTAINER_FIELDS | {"modelFormat", "storageUri"}, "spec.predictor.model")
    fields = {k: v for k, v in model.items() if k not in ("modelFormat", "storageUri")}
    if fields and own:
        raise SpecError("spec.predictor: give the container in `container` or in `model`, "
                        "not both")
    return fields or own


def _storage_uri(pred: dict[str, Any]) -> str:
    """KServe's `predictor.model.storageUri`, or the older top-level `predictor.storageUri`."""
    model = pred.get("model") if isinstance(pred.get("model"), dict) else {}
    top, inner = pred.get("storageUri"), model.get("storageUri")
    if top and inner and top != inner:
        raise SpecError("spec.predictor: storageUri given twice (in the predictor and in "
                        "its model), with different values")
    uri = inner or top or ""
    if not isinstance(uri, str):
        raise SpecError("spec.predictor.model.storageUri: expected a URI string")
    return uri


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"{where} {value!r}: expected a whole number >= 0")
    return value


def _model_format(model: dict[str, Any], container: dict[str, Any]) -> str:
    """KServe picks a serving runtime by `modelFormat`; fnplane has none to pick, so the
    format is kept as a description only when the server is named (image or command)."""
    fmt = _take(model.get("modelFormat") or {}, {"name", "version"},
                "spec.predictor.model.modelFormat")
    if not fmt:
        return ""
    if not fmt.get("name"):
        raise SpecError("spec.predictor.model.modelFormat.name is required")
    if not (container.get("image") or container.get("command")):
        raise SpecError(f"spec.predictor.model.modelFormat {fmt['name']!r}: fnplane picks no "
                        "serving runtime by model format; name the server's image or command")
    return f"{fmt['name']}:{fmt['version']}" if fmt.get("version") else str(fmt["name"])


def _uid(security: dict[str, Any], key: str) -> int | None:
    value = security.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"securityContext.{key} {value!r}: expected a user/group id >= 0")
    return value
_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")


def tolerations_from(items: object) -> list[Toleration]:
    """`spec.predictor.tolerations`, in the shape of a Pod's (and KServe's predictor's):
    key, operator (Exists or Equal, default Equal), value, effect, tolerationSeconds."""
    if not isinstance(items, list):
        raise SpecError("spec.predictor.tolerations: expected a list")
    out = []
    for i, item in enumerate(items):
        where = f"spec.predictor.tolerations[{i}]"
        _take(item, {"key", "operator", "value", "effect", "tolerationSeconds"}, where)
        operator = item.get("operator") or "Equal"
        if operator not in ("Exists", "Equal"):
            # Lt/Gt are alpha in Kubernetes (TaintTolerationComparisonOperators).
            raise SpecError(f"{where}: operator {operator!r}: expected Exists or Equal")
        effect = item.get("effect") or ""
        if effect not in _EFFECTS:
            raise SpecError(f"{where}: effect {effect!r}: expected NoSchedule, "
                            "PreferNoSchedule or NoExecute")
        seconds = item.get("tolerationSeconds")
        if seconds is not None and (not isinstance(seconds, int) or isinstance(seconds, bool)):
            raise SpecError(f"{where}: tolerationSeconds: expected an integer")
        toleration = Toleration(key=str(item.get("key") or ""), operator=operator,
                                value=str(item.get("value") or ""), effect=effect,
                                toleration_seconds=seconds)
        toleration.check(where)
        out.append(toleration)
    return out


def parse_toleration(text: str) -> Toleration:
    """`--toleration`, written as kubectl writes a taint: KEY=VALUE:EFFECT tolerates that
    taint (Equal); KEY:EFFECT or KEY any value of KEY (Exists); '*' every taint."""
    if text.strip() == "*":
        return Toleration(operator="Exists")
    body, sep, effect = text.rpartition(":")
    if not sep:
        body, effect = text, ""
    key, eq, value = body.partition("=")
    if effect not in _EFFECTS:
        raise SpecError(f"--toleration {text!r}: effect {effect!r}: expected NoSchedule, "
                        "PreferNoSchedule or NoExecute")
    if not key:
        raise SpecError(f"--toleration {text!r}: expected KEY[=VALUE][:EFFECT] or '*'")
    toleration = Toleration(key=key, operator="Equal" if eq else "Exists", value=value,
                            effect=effect)
    toleration.check(f"--toleration {text!r}")
    return toleration


def traffic_from_manifest(doc: dict[str, Any]) -> dict[str, Any]:
    """The split an FnService asks for, as DeployRequest fields: Knative's `spec.traffic`
    (`revisionName` or `latestRevision: true`, `percent`, `tag`) or KServe's
    `spec.predictor.canaryTrafficPercent`; neither: the split stays as it is. The sums and
    names are the registry's to check, as for `fnplane deploy --traffic`."""
    spec = doc.get("spec") or {}
    canary = (spec.get("predictor") or {}).get("canaryTrafficPercent")
    items = spec.get("traffic")
    if items is not None and canary is not None:
        raise SpecError("spec.traffic and spec.predictor.canaryTrafficPercent: give one")
    out: dict[str, Any] = {"traffic": None, "tags": {},
                           "canary_percent": None if canary is None else _count(
                               canary, "spec.predictor.canaryTrafficPercent")}
    if items is None:
        return out
    if not isinstance(items, list):
        raise SpecError("spec.traffic: expected a list")
    traffic = []
    for i, item in enumerate(items):
        where = f"spec.traffic[{i}]"
        t = _take(item, {"revisionName", "latestRevision", "percent", "tag"}, where)
        if bool(t.get("latestRevision")) == bool(t.get("revisionName")):
            raise SpecError(f"{where}: give revisionName or latestRevision: true")
        rev = "@latest" if t.get("latestRevision") else str(t["revisionName"])
        if t.get("tag"):
            out["tags"][rev] = str(t["tag"])
        if t.get("percent") is not None:
            traffic.append(TrafficTarget(revision=rev,
                                         percent=_count(t["percent"], f"{where}.percent")))
    out["traffic"] = traffic or None
    return out


def load_spec_file(path: Path) -> ServiceSpec:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: {exc}") from None
    try:
        return spec_from_manifest(doc)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"{path}: {exc}") from None
