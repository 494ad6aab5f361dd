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
    """The path names a model this pod does not serve (404)."""

    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"Model with name {name} does not exist.")


class InferenceError(HttpError):
    """The model failed on a well-formed request (500)."""

    status = 500


def decode_v2_request(body: object, n_features: int) -> tuple[np.ndarray, str | None]:
    """Turn an OIP v2 infer body into a batch [n, n_features] and the request id, if any."""
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("request must have a non-empty 'inputs' list")
    if len(inputs) != 1:
        raise InvalidInput(f"model takes exactly 1 input tensor ({INPUT_NAME}), got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise InvalidInput("each input must be a JSON object")
    datatype = tensor.get("datatype")
    if datatype not in _DTYPES:
        raise InvalidInput(f"input datatype must be one of {sorted(_DTYPES)}, got {datatype!r}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(dim, int) and not isinstance(dim, bool) for dim in shape)
    ):
        raise InvalidInput(f"input shape must be [n, {n_features}], got {shape!r}")
    if shape[1] != n_features or shape[0] < 1:
        raise InvalidInput(f"input shape must be [n, {n_features}] with n >= 1, got {shape}")
    if "data" not in tensor:
        raise InvalidInput("input has no 'data'")
    data = _numeric_array(tensor["data"], _DTYPES[datatype], "input data")
    if data.size != shape[0] * shape[1]:
        raise InvalidInput(
            f"input data has {data.size} elements but shape {shape} needs {shape[0] * shape[1]}"
        )
    return data.reshape(shape), request_id


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
