"""What users send and what crosses the wire: `ServiceSpec.validate` refuses what the control
plane cannot honour, with a message naming the field; every tagged message survives msgpack
and comes back as the same kind; garbage is refused with msgspec's errors; an FnService
manifest becomes exactly the spec it says, and a bad one says what is wrong."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.cli import build_parser, spec_from_flags
from controlplane.specfile import load_spec_file, parse_cpu, parse_memory_mb, spec_from_manifest
from kernel import messages
from kernel.messages import (
    BatchingSpec,
    Demand,
    PartitionMap,
    Resources,
    ScalingSpec,
    ServiceSpec,
    SpecError,
    StopPod,
)

REPO = Path(__file__).resolve().parent.parent

GOOD = ServiceSpec(name="sample", command=["python", "-m", "examples.sample.server"])


# ---- ServiceSpec.validate ------------------------------------------------------------------


def with_scaling(**knobs: Any) -> ServiceSpec:
    return msgspec.structs.replace(GOOD, scaling=ScalingSpec(**knobs))


def with_fields(**fields: Any) -> ServiceSpec:
    return msgspec.structs.replace(GOOD, **fields)


def test_a_good_spec_validates_to_itself() -> None:
    assert GOOD.validate() is GOOD
    assert with_fields(name="a" * 63).validate().name == "a" * 63
    assert with_scaling(min_scale=3, max_scale=0).validate(), "max 0 is unbounded"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (with_fields(name="Bad_Name"), "name 'Bad_Name': must be a DNS label"),
        (with_fields(name=""), "name '': must be a DNS label"),
        (with_fields(name="-lead"), "must be a DNS label"),
        (with_fields(name="a" * 64), "must be a DNS label"),
        (with_fields(command=[]), "command: must be a non-empty list"),
        (with_fields(command=["python", ""]), "command: must be a non-empty list"),
        (
            with_fields(resources=Resources(cpu=0, memory_mb=256)),
            "resources: cpu and memory must be > 0",
        ),
        (
            with_fields(resources=Resources(cpu=1, memory_mb=0)),
            "resources: cpu and memory must be > 0",
        ),
        (with_fields(resources=Resources(cpu=1, memory_mb=256, gpu=-1)), "gpu >= 0"),
        (with_scaling(min_scale=-1), "min-scale and max-scale must be >= 0"),
        (with_scaling(min_scale=3, max_scale=2), "min-scale 3 > max-scale 2"),
        (with_scaling(initial_scale=-1), "initial-scale must be >= 0"),
        (with_scaling(target_concurrency=0), "target concurrency/rps must be > 0"),
        (with_scaling(metric="rps", target_rps=0), "target concurrency/rps must be > 0"),
        (with_scaling(target_utilization=0), "utilization in (0, 1]"),
        (with_scaling(target_utilization=1.5), "utilization in (0, 1]"),
        (with_scaling(stable_window_s=5), "scale window must be between 6s and 1h"),
        (with_scaling(stable_window_s=3601), "scale window must be between 6s and 1h"),
        (with_scaling(scale_to_zero_grace_s=-1), "scale-to-zero grace and scale-down delay"),
        (with_scaling(scale_down_delay_s=-1), "scale-to-zero grace and scale-down delay"),
        (with_scaling(max_scale_up_rate=1.0), "max scale-up/down rates must be > 1"),
        (with_scaling(max_scale_down_rate=0.5), "max scale-up/down rates must be > 1"),
        (with_fields(container_concurrency=-1), "container-concurrency must be >= 0"),
        (with_fields(readiness_path="health"), "readiness path must start with '/'"),
        (with_fields(startup_timeout_s=0), "startup timeout must be > 0"),
        (with_fields(batching=BatchingSpec(max_batch_size=-1)), "batching: max batch size"),
        (with_fields(batching=BatchingSpec(max_wait_ms=-1)), "batching: max batch size"),
        (with_fields(model_version=""), "model version ''"),
        (with_fields(model_version="1/infer"), "model version '1/infer'"),
        (with_fields(model_version="-1"), "model version '-1'"),
        (with_fields(timeout_s=0), "timeoutSeconds must be in (0, 600]"),
        (with_fields(timeout_s=601), "timeoutSeconds must be in (0, 600]"),
        (with_fields(timeout_s=10, response_start_timeout_s=11),
         "responseStartTimeoutSeconds must be > 0 and <= timeoutSeconds"),
        (with_fields(response_start_timeout_s=0), "responseStartTimeoutSeconds must be > 0"),
        (with_fields(idle_timeout_s=-1), "idleTimeoutSeconds must be in"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_validate_refuses_with_a_message_naming_the_field(spec: ServiceSpec, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec.validate()


# ---- the wire ------------------------------------------------------------------------------


def strategy(t: mi.Type) -> st.SearchStrategy[Any]:
    """Any value of a msgspec type, from its own description (so new fields are covered)."""
    match t:
        case mi.IntType():
            return st.integers(-(2**63), 2**64 - 1)  # what msgpack carries
        case mi.FloatType():
            return st.floats(allow_nan=False)
        case mi.StrType():
            return st.text(max_size=12)
        case mi.BoolType():
            return st.booleans()
        case mi.NoneType():
            return st.none()
        case mi.ListType(item_type=item):
            return st.lists(strategy(item), max_size=3)
        case mi.DictType(key_type=key, value_type=value):
            return st.dictionaries(strategy(key), strategy(value), max_size=3)
        case mi.LiteralType(values=values):
            return st.sampled_from(values)
        case mi.EnumType(cls=cls):
            return st.sampled_from(list(cls))
        case mi.UnionType(types=types):
            return st.one_of([strategy(x) for x in types])
        case mi.StructType(cls=cls, fields=fields):
            return st.builds(cls, **{f.name: strategy(f.type) for f in fields})
    raise NotImplementedError(f"no strategy for {t!r}")


TAGGED = messages.TAGGED


@pytest.mark.parametrize("kind", TAGGED, ids=lambda k: k.__name__)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_every_tagged_message_round_trips(kind: type[msgspec.Struct], data: st.DataObject) -> None:
    msg = data.draw(strategy(mi.type_info(kind)))

    out = msgspec.msgpack.decode(messages.encode(msg), type=kind)

    assert type(out) is kind
    assert out == msg


def test_every_message_is_tagged_with_its_own_name() -> None:
    tags = [k.__struct_config__.tag for k in TAGGED]
    assert tags == [k.__name__ for k in TAGGED]


def test_a_record_round_trips_as_its_own_type() -> None:
    pmap = PartitionMap(
        version=3,
        partitions=[messages.Partition(id=0, epoch=2, owner="schedule-1", nodes=["n1"])],
    )

    assert messages.decode_record(messages.encode_record(pmap), PartitionMap) == pmap


def msgpack(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", msgspec.DecodeError),
        (b"\xc1", msgspec.DecodeError),  # a byte msgpack never uses
        (
            msgpack(
                Demand(service="svc", reporter="act", buffered=1, in_flight=0, requests=0, ts=1.0)
            )[:-3],  # truncated
            msgspec.DecodeError,
        ),
        (b'{"type": "Demand"}', msgspec.ValidationError),  # JSON is not msgpack
        (msgpack({"service": "svc"}), msgspec.ValidationError),  # no tag
        (msgpack({"type": "Nope"}), msgspec.ValidationError),  # unknown tag
        (msgpack({"type": "Demand", "service": "svc"}), msgspec.ValidationError),  # fields missing
        (
            msgpack({"type": "StopPod", "pod": 7, "service": "svc"}),  # wrong field type
            msgspec.ValidationError,
        ),
        (msgpack([1, 2, 3]), msgspec.ValidationError),
    ],
    ids=[
        "empty",
        "reserved-byte",
        "truncated",
        "json",
        "untagged",
        "unknown-tag",
        "missing-fields",
        "wrong-type",
        "array",
    ],
)
def test_garbage_is_refused_with_msgspec_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        msgspec.msgpack.Decoder(Demand | StopPod).decode(data)


# ---- quantities ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "cores"),
    [("500m", 0.5), ("2", 2.0), ("0.25", 0.25), (" 4 ", 4.0), ("1500m", 1.5), (3, 3.0), (0.5, 0.5)],
)
def test_parse_cpu(value: str | float, cores: float) -> None:
    assert parse_cpu(value) == pytest.approx(cores)


@pytest.mark.parametrize(
    ("value", "mib"),
    [
        ("256Mi", 256),
        ("1Gi", 1024),
        ("0.5Gi", 512),
        ("2048Ki", 2),
        ("1G", 954),  # 10^9 bytes
        ("500M", 477),
        ("268435456", 256),  # a bare number is bytes, as Kubernetes reads it
        (268435456, 256),
        ("1e9", 954),  # a decimal exponent, 10^9 bytes
        ("1.5Gi", 1536),
        ("1048577", 2),  # rounded up: a pod never gets less than it asked for
        ("1024Ki", 1),
        ("128974848000m", 123),  # milli-bytes, as the API server accepts them
    ],
)
def test_parse_memory_mb(value: str | int, mib: int) -> None:
    assert parse_memory_mb(value) == mib


@pytest.mark.parametrize(
    ("parse", "value", "message"),
    [
        (parse_cpu, "lots", "cpu 'lots': expected cores"),
        (parse_cpu, "-1", "cpu '-1'"),
        (parse_cpu, "2 cores", "cpu '2 cores'"),
        (parse_memory_mb, "1 GB", "memory '1 GB': expected a quantity"),
        (parse_memory_mb, "1Gb", "memory '1Gb'"),
        (parse_memory_mb, "-5Mi", "memory '-5Mi'"),
        (parse_memory_mb, "256", "256 bytes|did you mean '256Mi'"),
        (parse_memory_mb, 512, "less than 1Mi"),
        (parse_memory_mb, "1K", "memory '1K'"),  # kilo is a lower-case k in Kubernetes
        (parse_cpu, "1Gb", "cpu '1Gb'"),
    ],
)
def test_bad_quantities_are_spec_errors(
    parse: Callable[[str], object], value: str, message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        parse(value)


# ---- FnService manifests -------------------------------------------------------------------

MANIFEST: dict[str, Any] = {
    "apiVersion": "fnplane.dev/v1alpha1",
    "kind": "FnService",
    "metadata": {"name": "llama"},
    "spec": {
        "predictor": {
            "minReplicas": 1,
            "maxReplicas": 8,
            "initialReplicas": 2,
            "scaleTarget": 4,
            "targetUtilizationPercentage": 80,
            "containerConcurrency": 6,
            "scaleWindowSeconds": 30,
            "scaleToZeroGracePeriodSeconds": 45,
            "scaleDownDelaySeconds": 10,
            "targetBurstCapacity": -1,
            "model": "llama-3-8b",
            "modelVersion": "2024.1",
            "batching": {"maxBatchSize": 8, "maxWaitMs": 2},
            "timeoutSeconds": 120,
            "responseStartTimeoutSeconds": 30,
            "idleTimeoutSeconds": 5,
            "container": {
                "command": ["python", "-m", "server"],
                "args": ["--port-from-env"],
                "env": [{"name": "MODEL", "value": "llama"}, {"name": "EMPTY"}],
                "resources": {"requests": {"cpu": "1500m", "memory": "2Gi", "nvidia.com/gpu": 1}},
                "readinessPath": "/ready",
                "startupTimeoutSeconds": 120,
            },
        }
    },
}


def test_a_full_manifest_becomes_exactly_its_spec() -> None:
    spec = spec_from_manifest(copy.deepcopy(MANIFEST))

    assert spec == ServiceSpec(
        name="llama",
        command=["python", "-m", "server", "--port-from-env"],
        env={"MODEL": "llama", "EMPTY": ""},
        resources=Resources(cpu=1.5, memory_mb=2048, gpu=1),
        scaling=ScalingSpec(
            min_scale=1,
            max_scale=8,
            initial_scale=2,
            target_concurrency=4.0,
            target_utilization=0.8,
            stable_window_s=30.0,
            scale_to_zero_grace_s=45.0,
            scale_down_delay_s=10.0,
            target_burst_capacity=-1.0,
        ),
        container_concurrency=6,
        readiness_path="/ready",
        startup_timeout_s=120.0,
        model="llama-3-8b",
        model_version="2024.1",
        batching=BatchingSpec(max_batch_size=8, max_wait_ms=2.0),
        timeout_s=120.0,
        response_start_timeout_s=30.0,
        idle_timeout_s=5.0,
    )


def test_a_minimal_manifest_takes_knative_defaults() -> None:
    spec = spec_from_manifest({"metadata": {"name": "tiny"}})

    assert spec == ServiceSpec(name="tiny", command=["python", "-m", "examples.sample.server"],
                               scaling=ScalingSpec(min_scale=1))  # KServe's minReplicas default
    # Knative's request timeouts: 300 s, the first byte within it, no idle limit.
    assert (spec.timeout_s, spec.response_start_timeout_s, spec.idle_timeout_s) == (
        300.0, None, 0.0)


def test_rps_manifest_targets_requests_per_second() -> None:
    doc = copy.deepcopy(MANIFEST)
    doc["spec"]["predictor"].update(scaleMetric="rps", scaleTarget=50)

    sc = spec_from_manifest(doc).scaling

    # No concurrency target declared: Knative's resolution applies if the metric changes.
    assert (sc.metric, sc.target_rps, sc.target_concurrency) == ("rps", 50.0, None)


def test_the_sample_manifest_in_the_repository_loads() -> None:
    spec = load_spec_file(REPO / "examples/sample/fnservice.yaml")

    assert (spec.name, spec.container_concurrency, spec.scaling.max_scale) == ("sample", 4, 4)
    assert (spec.scaling.target_concurrency, spec.resources) == (
        4.0,
        Resources(cpu=0.5, memory_mb=256),
    )


def predictor(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["spec"]["predictor"].update(fields)


def container(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["spec"]["predictor"]["container"].update(fields)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (predictor(minReplica=1), r"spec.predictor: unknown field\(s\) minReplica"),
        (lambda d: d.update(specs={}), r"document: unknown field\(s\) specs"),
        (container(imag="x"), r"spec.predictor.container: unknown field\(s\) imag"),
        (
            container(resources={"requests": {"nvidia.com/gpus": 1}}),
            r"resources.requests: unknown field\(s\) nvidia.com/gpus",
        ),
        (predictor(minReplicas=3, maxReplicas=2), "min-scale 3 > max-scale 2"),
        (predictor(containerConcurrency=-1), "container-concurrency must be >= 0"),
        (lambda d: d["metadata"].update(name="My_Model"), "name 'My_Model': must be a DNS label"),
        (lambda d: d["metadata"].pop("name"), "metadata.name is required"),
        (lambda d: d.update(kind="Service"), "kind 'Service': expected FnService"),
        (predictor(scaleMetric="cpu"), "scaleMetric 'cpu': expected 'concurrency' or 'rps'"),
        (predictor(scaleTarget=0), "target concurrency/rps must be > 0"),
        (predictor(scaleMetric="rps", scaleTarget=0), "target concurrency/rps must be > 0"),
        (predictor(scaleWindowSeconds=1), "scale window must be between 6s and 1h"),
        (container(resources={"requests": {"cpu": "lots"}}), "cpu 'lots'"),
        (container(resources={"requests": {"memory": "1 GB"}}), "memory '1 GB'"),
        (container(env=[{"value": "x"}]), "env\\[\\]: every variable needs a name"),
        (container(readinessPath="ready"), "readiness path must start with '/'"),
        (predictor(modelVersion="v/2"), "model version 'v/2'"),
    ],
    ids=[
        "unknown-predictor-field",
        "unknown-top-field",
        "unknown-container-field",
        "unknown-resource",
        "min-above-max",
        "negative-container-concurrency",
        "bad-name",
        "no-name",
        "wrong-kind",
        "unknown-metric",
        "zero-target",
        "zero-rps-target",
        "short-window",
        "bad-cpu",
        "bad-memory",
        "env-without-name",
        "relative-readiness-path",
        "model-version-with-a-slash",
    ],
)
def test_a_bad_manifest_is_a_spec_error_saying_what_is_wrong(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    doc = copy.deepcopy(MANIFEST)
    mutate(doc)

    with pytest.raises(SpecError, match=message):
        spec_from_manifest(doc)


def test_a_manifest_that_is_not_a_mapping_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="document: expected a mapping"):
        spec_from_manifest(["not", "a", "mapping"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: FnService\nmetadata: {name: [unclosed\n", "bad.yaml"),
        ("metadata: {name: ok}\nspec: {predictor: {containerConcurrency: four}}\n", "four"),
    ],
    ids=["not-yaml", "not-a-number"],
)
def test_a_bad_spec_file_names_itself(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)

    with pytest.raises(SpecError, match=message):
        load_spec_file(path)


def test_a_manifest_may_name_the_container_image() -> None:
    from controlplane.specfile import spec_from_manifest

    spec = spec_from_manifest({
        "apiVersion": "fnplane.dev/v1alpha1", "kind": "FnService", "metadata": {"name": "own"},
        "spec": {"predictor": {"container": {"image": "registry.example/m:1",
                                             "command": ["serve"]}}},
    })
    assert spec.image == "registry.example/m:1" and spec.command == ["serve"]


# ---- KServe's field names where they mean the same (issue 14, item 8) -----------------------


def kserve(model: dict[str, Any], **predictor: Any) -> dict[str, Any]:
    return {"apiVersion": "fnplane.dev/v1alpha1", "kind": "FnService",
            "metadata": {"name": "iris"}, "spec": {"predictor": {"model": model, **predictor}}}


def test_kserve_model_object_names_the_container() -> None:
    """`predictor.model` as KServe's ModelSpec: its container fields are the pod's, its
    modelFormat a description of what the named server loads."""
    spec = spec_from_manifest(kserve({
        "modelFormat": {"name": "sklearn", "version": "1"},
        "image": "registry.example/iris:2", "command": ["serve"], "args": ["--port-from-env"],
        "env": [{"name": "A", "value": "b"}],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": {"runAsUser": 1000, "runAsGroup": 3000},
    }))
    assert (spec.image, spec.command, spec.env) == (
        "registry.example/iris:2", ["serve", "--port-from-env"], {"A": "b"})
    assert spec.resources == Resources(cpu=1.0, memory_mb=1024)
    assert (spec.run_as_user, spec.run_as_group, spec.model_format) == (1000, 3000, "sklearn:1")
    assert spec.scaling.min_scale == 1  # KServe's default


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"modelFormat": {"name": "sklearn"}, "storage": {"key": "x"},
          "image": "x"}, "storage: not supported by fnplane"),
        ({"modelFormat": {"name": "sklearn"}, "runtime": "kserve-sklearnserver"},
         "runtime: not supported"),
        ({"modelFormat": {"name": "sklearn"}, "protocolVersion": "v2", "image": "x"},
         "protocolVersion: not supported"),
        ({"modelFormat": {"name": "sklearn"}}, "picks no serving runtime by model format"),
        ({"modelFormat": {"version": "1"}, "image": "x"}, "modelFormat.name is required"),
        ({"image": "x", "imagePullPolicy": "Always"}, r"unknown field\(s\) imagePullPolicy"),
        ({"image": "x", "securityContext": {"runAsUser": -1}}, "runAsUser -1"),
    ],
    ids=["storage", "runtime", "protocolVersion", "format-without-server", "format-no-name",
         "unknown-field", "negative-uid"],
)
def test_kserve_fields_fnplane_does_not_implement_are_refused_by_name(
    model: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        spec_from_manifest(kserve(model))


def test_the_container_is_given_once() -> None:
    with pytest.raises(SpecError, match="not both"):
        spec_from_manifest(kserve({"image": "x"}, container={"command": ["y"]}))


@pytest.mark.parametrize(
    ("flags", "timeouts"),
    [
        ([], (300.0, None, 0.0)),  # Knative's defaults
        (["--timeout", "60", "--response-start-timeout", "10s", "--idle-timeout", "2s"],
         (60.0, 10.0, 2.0)),
        (["--timeout", "2m"], (120.0, None, 0.0)),
    ],
)
def test_deploy_flags_set_the_knative_timeouts(flags: list[str],
                                               timeouts: tuple[float, float | None, float]
                                               ) -> None:
    spec = spec_from_flags(build_parser().parse_args(["deploy", "svc", *flags])).validate()

    assert (spec.timeout_s, spec.response_start_timeout_s, spec.idle_timeout_s) == timeouts
