"""The micro-batcher's codec (issue 4): how a KServe v1 or OIP v2 request is seen as rows,
how several such requests become one, and how the pod's answer is cut back per request. Pure
functions over JSON values, so `activator/batcher.py` keeps only the timing and the futures.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

_V2_REQUEST_KEYS = frozenset({"id", "inputs", "parameters", "outputs"})
_V2_TENSOR_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})


class SplitError(ValueError):
    """A 2xx answer from the pod that cannot be cut back into one answer per request."""


# ---- what the batcher understands of a request ------------------------------------------


@dataclass(frozen=True, eq=False)
class Rows:
    """A request seen as rows: requests merge only when their `key`s are equal, `parts`
    holds its rows ready to concatenate (v1: the instances; v2: each input's flat data)."""

    key: tuple
    count: int
    parts: tuple[list, ...]
    request_id: str | None = None


def parse(protocol: str, payload: object) -> Rows | None:
    """The request's rows, or None when it is not plainly batchable (extra fields, ragged or
    inconsistent tensors): such a request goes to the pod alone and as is, so the pod, not
    a neighbour's batch, answers for what is wrong with it."""
    try:
        return _parse_v1(payload) if protocol == "v1" else _parse_v2(payload)
    except RecursionError:  # absurdly deep nesting: let the pod refuse it
        return None


def _parse_v1(payload: object) -> Rows | None:
    if not isinstance(payload, dict) or set(payload) != {"instances"}:
        return None
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        return None
    sig = _signature(instances)
    if sig is None:
        return None
    return Rows(("v1", sig[2]), len(instances), (instances,))


def _parse_v2(payload: object) -> Rows | None:
    if not isinstance(payload, dict) or not set(payload) <= _V2_REQUEST_KEYS:
        return None
    request_id, inputs = payload.get("id"), payload.get("inputs")
    if request_id is not None and not isinstance(request_id, str):
        return None
    if not isinstance(inputs, list) or not inputs:
        return None
    sigs, parts, rows = [], [], None
    for tensor in inputs:
        if not isinstance(tensor, dict) or not set(tensor) <= _V2_TENSOR_KEYS:
            return None
        name, dtype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not (isinstance(name, str) and isinstance(dtype, str) and _is_shape(shape)):
            return None
        if not shape or shape[0] < 1 or (rows is not None and shape[0] != rows):
            return None  # no batch dimension, or inputs disagree on the row count
        rows = shape[0]
        flat = _flatten(tensor.get("data"), shape)
        if flat is None:
            return None
        sigs.append((name, dtype, tuple(shape[1:]), _canonical(tensor.get("parameters"))))
        parts.append(flat)
    if len({s[0] for s in sigs}) != len(sigs):
        return None
    extras = (_canonical(payload.get("parameters")), _canonical(payload.get("outputs")))
    return Rows(("v2", tuple(sigs), extras), rows or 0, tuple(parts), request_id)


def _signature(value: object) -> object:
    """The structure of a JSON value (list lengths, dict keys, leaf kinds); None if ragged."""
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        inner = _signature(value[0]) if value else ()
        if inner is None or any(_signature(v) != inner for v in value[1:]):
            return None
        return ("list", len(value), inner)
    if isinstance(value, dict):
        items = tuple(sorted((k, _signature(v)) for k, v in value.items()))
        return None if any(s is None for _, s in items) else ("dict", items)
    return None


def _is_shape(shape: object) -> bool:
    return isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )


def _flatten(data: object, shape: list[int]) -> list | None:
    """Tensor data in row-major order, from flat or nested lists; None if it does not match
    the shape (a ragged nesting must not be silently 'repaired' by flattening)."""
    if not isinstance(data, list):
        return None
    if not any(isinstance(v, list) for v in data):
        return data if len(data) == math.prod(shape) else None
    flat: list = []

    def walk(node: object, dims: list[int]) -> bool:
        if not dims:
            flat.append(node)
            return not isinstance(node, list)
        if not isinstance(node, list) or len(node) != dims[0]:
            return False
        return all(walk(v, dims[1:]) for v in node)

    return flat if walk(data, shape) else None


def _canonical(value: object) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=repr)


# ---- one merged request, and its answer cut back ----------------------------------------


def merge(protocol: str, members: list[Rows], template: dict) -> dict:
    """One request carrying every member's rows in order; `template` is the first member's
    payload (all members share its key, hence its names, types and parameters)."""
    if protocol == "v1":
        return {"instances": list(itertools.chain.from_iterable(m.parts[0] for m in members))}
    total = sum(m.count for m in members)
    body = {k: v for k, v in template.items() if k != "id"}  # ids come back per member
    body["inputs"] = [
        {
            **tensor,
            "shape": [total, *tensor["shape"][1:]],
            "data": list(itertools.chain.from_iterable(m.parts[i] for m in members)),
        }
        for i, tensor in enumerate(template["inputs"])
    ]
    return body


def split(protocol: str, body: object, members: list[Rows]) -> list[dict]:
    """Each member's answer from the batch's answer, cut by row counts (row-major)."""
    total = sum(m.count for m in members)
    cuts = list(itertools.pairwise(itertools.accumulate((m.count for m in members), initial=0)))
    if not isinstance(body, dict):
        raise SplitError("the answer is not a JSON object")
    if protocol == "v1":
        preds = body.get("predictions")
        if not isinstance(preds, list) or len(preds) != total:
            got = len(preds) if isinstance(preds, list) else "no"
            raise SplitError(f"{got} predictions for a batch of {total} rows")
        return [{**body, "predictions": preds[a:b]} for a, b in cuts]
    outputs = body.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        raise SplitError("the answer has no 'outputs'")
    tensors = []
    for t in outputs:
        shape = t.get("shape") if isinstance(t, dict) else None
        if not _is_shape(shape) or not shape or shape[0] != total:
            raise SplitError(f"output shape {shape!r} is not batched over {total} rows")
        flat = _flatten(t.get("data"), shape)
        if flat is None:
            raise SplitError(f"output data does not match its shape {shape}")
        tensors.append((t, shape[1:], flat, math.prod(shape[1:])))
    head = {k: body[k] for k in ("model_name", "model_version") if k in body}
    answers = []
    for m, (a, b) in zip(members, cuts, strict=True):
        answer = dict(head)
        if m.request_id is not None:
            answer["id"] = m.request_id  # the pod's id was for the merged request: dropped
        if "parameters" in body:
            answer["parameters"] = body["parameters"]
        answer["outputs"] = [
            {**t, "shape": [b - a, *trail], "data": flat[a * size : b * size]}
            for t, trail, flat, size in tensors
        ]
        answers.append(answer)
    return answers
