"""The gateway against its own OpenAPI document: schemathesis generates requests for every
documented operation — the Open Inference Protocol's paths, versioned and not, KServe v1's and
fnplane's own — (valid ones, and ones that break the schema) against the live embedded stack
with the sample model deployed, and checks each answer: no 5xx but a 503 the document declares
(a 500 never is), a status, content type, headers and body the document declares
(`response_schema_conformance`, `content_type_conformance` among the checks, named below), no
hung connection (a client timeout fails the test).

schemathesis' own pytest plugin wants the schema at collection time and a synchronous test;
the stack lives on pytest-asyncio's loop. So the test is async, and the synchronous
schemathesis/hypothesis run goes to a worker thread while the loop keeps serving."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from kernel.messages import ScalingSpec
from tests.stackutil import deploy, running_stack, sample_spec

SERVICE = "fuzzed"
UNKNOWN = "no-such-model"
VERSION = "3"  # the deployed service's model version; "1" (everyone's default) is unknown
EXAMPLES_PER_OPERATION = 60  # 14 operations: the whole run stays near a minute
CLIENT_TIMEOUT_S = 20.0  # longer than a cold start of the sample model; a hang is far longer


def narrowed(document: dict[str, Any]) -> dict[str, Any]:
    """The served document with `{name}` narrowed to the deployed service or an unknown one,
    `{version}` to its version or another: random DNS labels would all be 404s and never
    reach a pod."""
    for item in document["paths"].values():
        for op in item.values():
            for param in op.get("parameters", []):
                if param["name"] == "name":
                    param["schema"] = {"type": "string", "enum": [SERVICE, UNKNOWN]}
                if param["name"] == "version":
                    param["schema"] = {"type": "string", "enum": [VERSION, "1"]}
    return document


def documented_503s_only(_ctx: object, response: Any, case: Any) -> None:
    """No 5xx but a 503 where the document declares it (buffer full, start failed, waited
    too long): nothing here makes a pod unreachable (502) or slow (504), and a 500 is always
    a bug."""
    status = response.status_code
    if status >= 500 and (status != 503
                          or "503" not in case.operation.definition.raw["responses"]):
        raise AssertionError(f"undocumented {status} from {case.operation.label}: "
                             f"{response.text[:300]}")


# Named, not left to schemathesis' defaults, so that conformance is sure to be checked. Its
# stock `not_a_server_error` refuses every 5xx, even a documented 503: the check above
# replaces it. `positive_data_acceptance` is left out: it expects any schema-valid tensor to be
# accepted, but the protocol's schema cannot say which tensors a model takes, and the model
# refuses the others with a 400, as the protocol says it should.
CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, missing_required_header,
          unsupported_method, allow_header_conformance, documented_503s_only]


def fuzz(document: dict[str, Any], base_url: str) -> dict[str, set[int]]:
    """Every operation, positive and negative cases; the statuses seen, per operation."""
    schema = schemathesis.openapi.from_dict(document)
    seen: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        cases = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                          operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate, Phase.shrink],
                  suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(base_url=base_url, timeout=CLIENT_TIMEOUT_S,
                                              checks=CHECKS)
            seen.setdefault(case.operation.label, set()).add(response.status_code)

        check()
    return seen


async def test_the_gateway_answers_as_its_openapi_document_says(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        # At zero until the first request; a long grace keeps it warm for the rest of the run.
        await deploy(nats_url, sample_spec(name=SERVICE, model_version=VERSION,
                                           scaling=ScalingSpec(min_scale=0, stable_window_s=6.0,
                                                               scale_to_zero_grace_s=120.0)))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{stack.url}/openapi.json") as r:
                assert r.status == 200
                document = await r.json()
        seen = await asyncio.to_thread(fuzz, narrowed(document), stack.url)

    assert len(seen) == sum(len(item) for item in document["paths"].values()), seen
    # The fuzzing reached the pod (metadata comes from it, after a cold start), met unknown
    # models, and had bodies refused.
    assert 200 in seen["GET /v2/models/{name}"], seen
    assert 200 in seen["GET /v2/models/{name}/versions/{version}"], seen
    assert {200, 404} <= seen["GET /v2/models/{name}/versions/{version}/ready"], seen
    for infer in ("POST /v2/models/{name}/infer", "POST /v2/models/{name}/versions/{version}/infer",
                  "POST /v1/models/{name}:predict"):
        assert {400, 404} <= seen[infer], seen
