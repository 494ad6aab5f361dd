"""Service specs from users: `fnplane deploy -f spec.yaml` in a KServe-like shape (the same
shape the FnService custom resource has), and Kubernetes quantity strings for resources.
Unknown fields are errors: a typo must not silently deploy defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kernel.messages import BatchingSpec, Resources, ScalingSpec, ServiceSpec, SpecError

DEFAULT_COMMAND = ["python", "-m", "examples.sample.server"]

_CPU_RE = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_MEM_FACTOR_MIB = {
    None: 1, "Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024,
    "K": 1000 / 1024 / 1024, "M": 1e6 / 1024 / 1024, "G": 1e9 / 1024 / 1024,
    "T": 1e12 / 1024 / 1024,
}


def parse_cpu(value: str | float | int) -> float:
    if isinstance(value, int | float):
        return float(value)
    m = _CPU_RE.match(str(value).strip())
    if not m:
        raise SpecError(f"cpu {value!r}: expected cores ('0.5', '2') or millicores ('500m')")
    n = float(m.group(1))
    return n / 1000 if m.group(2) else n


def parse_memory_mb(value: str | float | int) -> int:
    """Memory in MiB; a bare number is taken as MiB, as the CLI's `--memory 256`."""
    if isinstance(value, int | float):
        return int(value)
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    m = _MEM_RE.match(text)
    if not m:
        raise SpecError(f"memory {value!r}: expected a quantity such as '256Mi' or '1Gi'")
    return max(1, round(float(m.group(1)) * _MEM_FACTOR_MIB[m.group(2)]))


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
    spec = _take(doc.get("spec") or {}, {"predictor"}, "spec")
    pred = _take(
        spec.get("predictor") or {},
        {
            "minReplicas", "maxReplicas", "initialReplicas", "scaleTarget", "scaleMetric",
            "targetUtilizationPercentage", "containerConcurrency", "scaleWindowSeconds",
            "scaleToZeroGracePeriodSeconds", "scaleDownDelaySeconds", "targetBurstCapacity",
            "batching", "container", "model", "modelVersion",
        },
        "spec.predictor",
    )
    container = _take(
        pred.get("container") or {},
        {"command", "args", "env", "resources", "readinessPath", "startupTimeoutSeconds",
         "image", "readinessProbe"},
        "spec.predictor.container",
    )
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
        min_scale=int(pred.get("minReplicas", 0)),
        max_scale=int(pred.get("maxReplicas", 0)),
        initial_scale=int(pred.get("initialReplicas", 1)),
        metric=metric,
        target_concurrency=float(target) if has_target and metric == "concurrency" else 100.0,
        target_rps=float(target) if has_target and metric == "rps" else 200.0,
        target_utilization=float(pred.get("targetUtilizationPercentage", 70)) / 100.0,
        stable_window_s=float(pred.get("scaleWindowSeconds", 60)),
        scale_to_zero_grace_s=float(pred.get("scaleToZeroGracePeriodSeconds", 30)),
        scale_down_delay_s=float(pred.get("scaleDownDelaySeconds", 0)),
        target_burst_capacity=float(pred.get("targetBurstCapacity", 211)),
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
        model=str(pred.get("model", "")),
        model_version=str(pred.get("modelVersion", "1")),
        image=str(container.get("image", "")),
        readiness_period_s=float(probe.get("periodSeconds", 1)),
        readiness_failure_threshold=int(probe.get("failureThreshold", 3)),
        batching=BatchingSpec(
            max_batch_size=int(batching.get("maxBatchSize", 0)),
            max_wait_ms=float(batching.get("maxWaitMs", 5)),
        ),
    ).validate()


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
