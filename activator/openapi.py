"""The gateway's OpenAPI document, served at `GET /openapi.json`: every route of
activator/ingress.py with the Open Inference Protocol's schemas (kserve/open-inference-protocol,
`open_inference_rest.yaml`) and the errors the gateway itself answers, in KServe's shape
`{"error": "..."}`. Third-party clients and the fuzz tests read it; a pure function of the
version and the body limit, so a test can check it without a server.

Each route is one row of `ROUTES` (path, method, operation builder): a new path is one more
row and, if it needs one, one more builder. The protocol's versioned model paths
(`/v2/models/{name}/versions/{version}/...`) are rows beside the unversioned ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

OPENAPI_VERSION = "3.0.3"

# A service name is a DNS label (kernel/messages.py); any other name is simply unknown (404).
NAME_PARAM: dict[str, Any] = {
    "name": "name", "in": "path", "required": True,
    "description": "the service (model) name",
    "schema": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
}
# A service answers to one version (its spec's `model_version`, "1" unless set); any other
# is unknown (404), as the protocol says.
VERSION_PARAM: dict[str, Any] = {
    "name": "version", "in": "path", "required": True,
    "description": "the model version: the one the service's spec names (default \"1\")",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    response = _json(_ref("error"), description)
    if retry_after:
        response["headers"] = {"Retry-After": {
            "description": "seconds to wait before trying again (when the gateway is the cause)",
            "schema": {"type": "integer", "minimum": 0},
        }}
    return response


# The gateway's own error answers (activator/handler.py `_failure`, activator/ingress.py).
ERRORS: dict[str, dict[str, Any]] = {
    "BadRequest": _error("the body is not JSON, or not the protocol's shape (or the model "
                         "refused the input)"),
    "NotFound": _error("no service of that name is deployed, or it does not serve the "
                       "version the path names"),
    "TooLarge": _error("the body is larger than the gateway's limit"),
    "BadGateway": _error("the service's pods were unreachable, even after a retry on another",
                         retry_after=True),
    "Unavailable": _error("the service's buffer is full, the request waited too long for a "
                          "pod, the service failed to start, or the gateway is not connected "
                          "to the control plane; try again after Retry-After", retry_after=True),
    "GatewayTimeout": _error("the pod took the request but did not answer in time"),
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string"}},
        "description": "KServe's error shape",
    },
    "live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "ready": {"type": "object", "required": ["ready"],
              "properties": {"ready": {"type": "boolean"}}},
    "model_ready": {
        "type": "object", "required": ["name", "ready"],
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
    },
    "metadata_server_response": {
        "type": "object", "required": ["name", "version", "extensions"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                       "extensions": {"type": "array", "items": {"type": "string"}}},
    },
    "metadata_tensor": {
        "type": "object", "required": ["name", "datatype", "shape"],
        "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                       "shape": {"type": "array", "items": {"type": "integer"}}},
    },
    "metadata_model_response": {
        "type": "object", "required": ["name", "platform"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("metadata_tensor")},
            "outputs": {"type": "array", "items": _ref("metadata_tensor")},
        },
    },
    "parameters": {"type": "object", "description": "free-form, per the protocol"},
    "tensor_data": {
        "type": "array",
        "items": {"anyOf": [_ref("tensor_data"), {"type": "number"}, {"type": "string"},
                            {"type": "boolean"}]},
    },
    "request_input": {
        "type": "object", "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "parameters": _ref("parameters"),
            "data": _ref("tensor_data"),
        },
    },
    "request_output": {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string"}, "parameters": _ref("parameters")},
    },
    "inference_request": {
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _ref("parameters"),
            # The gateway refuses an empty list with a 400 before waking anything.
            "inputs": {"type": "array", "minItems": 1, "items": _ref("request_input")},
            "outputs": {"type": "array", "items": _ref("request_output")},
        },
    },
    "response_output": {
        "type": "object", "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "parameters": _ref("parameters"),
            "data": _ref("tensor_data"),
        },
    },
    "inference_response": {
        "type": "object", "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _ref("parameters"),
            "outputs": {"type": "array", "items": _ref("response_output")},
        },
    },
    "v1_predict_request": {
        "type": "object", "required": ["instances"],
        "properties": {"instances": {"type": "array", "items": {}}},
    },
    "v1_predict_response": {
        "type": "object", "required": ["predictions"],
        "properties": {"predictions": {"type": "array", "items": {}}},
    },
}


def _responses(ok: dict[str, Any], *errors: str) -> dict[str, Any]:
    codes = {"BadRequest": "400", "NotFound": "404", "TooLarge": "413", "BadGateway": "502",
             "Unavailable": "503", "GatewayTimeout": "504"}
    out: dict[str, Any] = {"200": ok}
    for name in errors:
        out[codes[name]] = {"$ref": f"#/components/responses/{name}"}
    return out


# What can go wrong once a request is on its way to a pod (a cold start may come first).
FORWARDED = ("NotFound", "BadGateway", "Unavailable", "GatewayTimeout")
WITH_BODY = ("BadRequest", "TooLarge", *FORWARDED)


def _op(op_id: str, summary: str, responses: dict[str, Any], *, tag: str,
        named: bool = False, versioned: bool = False,
        body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": [tag],
                          "responses": responses}
    if named or versioned:
        op["parameters"] = [NAME_PARAM, VERSION_PARAM] if versioned else [NAME_PARAM]
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body}}}
    return op


Builder = Callable[[], dict[str, Any]]


def _server_metadata(op_id: str) -> dict[str, Any]:
    return _op(op_id, "the gateway's name and version",
               _responses(_json(_ref("metadata_server_response"), "server metadata")), tag="v2")


def _model_metadata(op_id: str, *, versioned: bool) -> dict[str, Any]:
    return _op(op_id, "the model's metadata, from one of its pods (may start one)",
               _responses(_json(_ref("metadata_model_response"), "model metadata"), *FORWARDED),
               tag="v2", named=True, versioned=versioned)


def _model_ready(op_id: str, *, versioned: bool) -> dict[str, Any]:
    return _op(op_id, "a deployed service is ready: it serves, after a cold start if at zero",
               _responses(_json(_ref("model_ready"), "deployed"), "NotFound", "Unavailable"),
               tag="v2",
               named=True, versioned=versioned)


def _infer(op_id: str, *, versioned: bool) -> dict[str, Any]:
    return _op(op_id, "Open Inference Protocol v2 inference (may start a pod)",
               _responses(_json(_ref("inference_response"), "the model's answer"), *WITH_BODY),
               tag="v2", named=True, versioned=versioned, body=_ref("inference_request"))


ROUTES: tuple[tuple[str, str, Builder], ...] = (
    ("/v2/health/live", "get", lambda: _op(
        "server-live", "the gateway process answers", _responses(_json(_ref("live"), "live")),
        tag="v2")),
    ("/v2/health/ready", "get", lambda: _op(
        "server-ready", "ready while connected to the control plane",
        {**_responses(_json(_ref("ready"), "ready")),
         "503": {"$ref": "#/components/responses/Unavailable"}}, tag="v2")),
    ("/v2", "get", lambda: _server_metadata("server-metadata")),
    ("/v2/", "get", lambda: _server_metadata("server-metadata-slash")),
    ("/v2/models/{name}", "get", lambda: _model_metadata("model-metadata", versioned=False)),
    ("/v2/models/{name}/ready", "get", lambda: _model_ready("model-ready", versioned=False)),
    ("/v2/models/{name}/infer", "post", lambda: _infer("model-infer", versioned=False)),
    ("/v2/models/{name}/versions/{version}", "get",
     lambda: _model_metadata("model-version-metadata", versioned=True)),
    ("/v2/models/{name}/versions/{version}/ready", "get",
     lambda: _model_ready("model-version-ready", versioned=True)),
    ("/v2/models/{name}/versions/{version}/infer", "post",
     lambda: _infer("model-version-infer", versioned=True)),
    ("/v1/models/{name}", "get", lambda: _op(
        "v1-model-ready", "KServe v1 model status",
        _responses(_json(_ref("model_ready"), "deployed"), "NotFound", "Unavailable"), tag="v1",
        named=True)),
    ("/v1/models/{name}:predict", "post", lambda: _op(
        "v1-predict", "KServe v1 prediction (may start a pod)",
        _responses(_json(_ref("v1_predict_response"), "the model's predictions"), *WITH_BODY),
        tag="v1", named=True, body=_ref("v1_predict_request"))),
    ("/metrics", "get", lambda: _op(
        "metrics", "the gateway's metrics, Prometheus text format",
        {"200": {"description": "metrics",
                 "content": {"text/plain": {"schema": {"type": "string"}}}}}, tag="gateway")),
    ("/openapi.json", "get", lambda: _op(
        "openapi", "this document", _responses(_json({"type": "object"}, "OpenAPI 3.0")),
        tag="gateway")),
)


def document(*, version: str, max_body_bytes: int | None = None) -> dict[str, Any]:
    """The OpenAPI 3.0 document of the gateway (a fresh dict: callers may change theirs)."""
    paths: dict[str, dict[str, Any]] = {}
    for path, method, build in ROUTES:
        paths.setdefault(path, {})[method] = build()
    limit = f" Bodies above {max_body_bytes} bytes are refused (413)." if max_body_bytes else ""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "fnplane gateway",
            "version": version,
            "description": "KServe v1 and Open Inference Protocol v2 in front of services that "
                           "scale to zero: a request to a service with no pod waits for one. "
                           "Errors use KServe's shape {\"error\": \"...\"}." + limit,
        },
        "paths": paths,
        "components": {"schemas": copy.deepcopy(SCHEMAS), "responses": copy.deepcopy(ERRORS)},
    }
