"""What the sample pod accepts: a KServe v1 predict or OIP v2 infer body checked and turned
into a batch for the model, and the errors that become KServe-style `{"error": ...}` answers.
No HTTP here, so `examples/sample/server.py` keeps only the aiohttp app around it.
"""

from __future__ import annotations

import numpy as np

INPUT_NAME = "input-0"
OUTPUT_NAME = "output-0"
_DTYPES = {"FP32": np.float32, "FP64": np.float64}


class HttpError(Exception):
    """An error that becomes a KServe-style `{"error": msg}` answer with `status`."""

    status = 500


class InvalidInput(HttpError):
    """The request is malformed; the client must change it (400)."""

    status = 400


class ModelNotFound(HttpError):
    """The path names a model (or a version of it) this pod does not serve (404)."""

    status = 404

    def __init__(self, name: str, version: str | None = None) -> None:
        of = f" and version {version}" if version is not None else ""
        super().__init__(f"Model with name {name}{of} does not exist.")


class InferenceError(HttpError):
    """The model failed on a well-formed request (500)."""

    status = 500


def decode_v2_request(body: object, n_features: int) -> tuple[np.ndarray, str | None]:
    """Turn an OIP v2 infer body into a batch [n, n_features] and the request id, if any.

    The body is checked against the protocol's types first (any model refuses those with a
    400), then against what this model takes: a wrong type must never reach the model, where
    it would fail as a 500 (a dict `datatype` once did: "unhashable type")."""
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    _check_parameters(body, "request")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("request must have a non-empty 'inputs' list")
    for i, tensor in enumerate(inputs):
        _check_input(tensor, f"inputs[{i}]")
    outputs = body.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidInput("'outputs' must be a list")
        for i, wanted in enumerate(outputs):
            if not isinstance(wanted, dict) or not isinstance(wanted.get("name"), str):
                raise InvalidInput(f"outputs[{i}] must be an object with a string 'name'")
            _check_parameters(wanted, f"outputs[{i}]")
    if len(inputs) != 1:
        raise InvalidInput(f"model takes exactly 1 input tensor ({INPUT_NAME}), got {len(inputs)}")
    tensor = inputs[0]
    datatype = tensor["datatype"]
    if datatype not in _DTYPES:
        raise InvalidInput(f"input datatype must be one of {sorted(_DTYPES)}, got {datatype!r}")
    shape = tensor["shape"]
    if len(shape) != 2 or shape[1] != n_features or shape[0] < 1:
        raise InvalidInput(f"input shape must be [n, {n_features}] with n >= 1, got {shape}")
    data = _numeric_array(tensor["data"], _DTYPES[datatype], "input data")
    if data.size != shape[0] * shape[1]:
        raise InvalidInput(
            f"input data has {data.size} elements but shape {shape} needs {shape[0] * shape[1]}"
        )
    return data.reshape(shape), request_id


def _check_input(tensor: object, where: str) -> None:
    """One input tensor has the protocol's fields with the protocol's types."""
    if not isinstance(tensor, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    for field in ("name", "shape", "datatype", "data"):
        if field not in tensor:
            raise InvalidInput(f"{where} has no '{field}'")
    if not isinstance(tensor["name"], str):
        raise InvalidInput(f"{where}.name must be a string, got {_kind(tensor['name'])}")
    if not isinstance(tensor["datatype"], str):
        raise InvalidInput(f"{where}.datatype must be a string, got {_kind(tensor['datatype'])}")
    shape = tensor["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise InvalidInput(f"{where}.shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(tensor["data"], list):
        raise InvalidInput(f"{where}.data must be a list, got {_kind(tensor['data'])}")
    _check_parameters(tensor, where)


def _check_parameters(holder: dict, where: str) -> None:
    params = holder.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidInput(f"{where} 'parameters' must be an object, got {_kind(params)}")


def _kind(value: object) -> str:
    """A JSON value's type, as the client wrote it."""
    match value:
        case None:
            return "null"
        case bool():
            return "boolean"
        case int() | float():
            return "number"
        case str():
            return "string"
        case list():
            return "array"
        case _:
            return "object"


def decode_v1_request(body: object, n_features: int) -> np.ndarray:
    """Turn a KServe v1 predict body (`{"instances": [[...], ...]}`) into a batch."""
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("request must have a non-empty 'instances' list")
    batch = _numeric_array(instances, np.float64, "instances")
    if batch.ndim != 2 or batch.shape[1] != n_features:
        raise InvalidInput(
            f"each instance must be a list of {n_features} numbers, got shape {list(batch.shape)}"
        )
    return batch


def _numeric_array(value: object, dtype: type[np.floating], what: str) -> np.ndarray:
    """Convert JSON numbers to an array, refusing strings, booleans, nulls and ragged lists.

    Converting with `dtype=` directly would silently parse strings like "1.5", so the kind
    is checked first.
    """
    try:
        arr = np.asarray(value)
    except ValueError:
        raise InvalidInput(f"{what} must be a rectangular list of numbers") from None
    if arr.dtype.kind not in "fiu":
        raise InvalidInput(f"{what} must contain only numbers")
    return arr.astype(dtype, copy=False)
