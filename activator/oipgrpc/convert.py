"""The protocol's gRPC messages as its REST JSON and back, so a gRPC call goes to the pod as
the HTTP request it stands for (pods speak the REST protocol; the pod contract has no gRPC).
Pure: no I/O, no server.

Tensors arrive either in `contents` (typed repeated fields) or as `raw_input_contents`
(little-endian bytes, what tritonclient sends); the answer uses the form the request used, as
KServe's server does, since tritonclient reads only raw output contents."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from activator.oipgrpc import messages as m

# datatype → (numpy dtype of its raw bytes, the `InferTensorContents` field of its values)
DTYPES: dict[str, tuple[str | None, str | None]] = {
    "BOOL": ("?", "bool_contents"),
    "UINT8": ("<u1", "uint_contents"),
    "UINT16": ("<u2", "uint_contents"),
    "UINT32": ("<u4", "uint_contents"),
    "UINT64": ("<u8", "uint64_contents"),
    "INT8": ("<i1", "int_contents"),
    "INT16": ("<i2", "int_contents"),
    "INT32": ("<i4", "int_contents"),
    "INT64": ("<i8", "int64_contents"),
    "FP16": ("<f2", None),  # raw only: the protocol has no 16-bit contents field
    "FP32": ("<f4", "fp32_contents"),
    "FP64": ("<f8", "fp64_contents"),
    "BYTES": (None, "bytes_contents"),
}


class InvalidTensor(ValueError):
    """A request the REST protocol could not express: the caller's INVALID_ARGUMENT."""


def parameters_json(params: Any) -> dict[str, Any]:
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in params.items()
            if v.WhichOneof("parameter_choice")}


def set_parameters(target: Any, params: dict[str, Any]) -> None:
    for key, value in params.items():
        if isinstance(value, bool):  # before int: a bool is an int in Python
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, str):
            target[key].string_param = value
        # other JSON values have no InferParameter form: left out


def _split_bytes(raw: bytes) -> list[bytes]:
    """Triton's serialized BYTES tensor: each element a 4-byte little-endian length, then it."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidTensor("BYTES raw contents truncated")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise InvalidTensor("BYTES raw contents truncated")
        out.append(raw[at:at + size])
        at += size
    return out


def _text(values: list[bytes]) -> list[str]:
    try:
        return [v.decode() for v in values]
    except UnicodeDecodeError:
        raise InvalidTensor("BYTES elements must be UTF-8 text to travel as JSON") from None


def _input_data(tensor: Any, raw: bytes | None) -> list[Any]:
    dtype, field = DTYPES.get(tensor.datatype, (None, None))
    if tensor.datatype not in DTYPES:
        raise InvalidTensor(f"input {tensor.name!r}: unsupported datatype {tensor.datatype!r}")
    if raw is not None:
        if dtype is None:  # BYTES
            return _text(_split_bytes(raw))
        item = np.dtype(dtype).itemsize
        if len(raw) % item:
            raise InvalidTensor(f"input {tensor.name!r}: {len(raw)} raw bytes are not whole "
                                f"{tensor.datatype} elements")
        return np.frombuffer(raw, dtype=dtype).tolist()
    if field is None:
        raise InvalidTensor(f"input {tensor.name!r}: {tensor.datatype} travels as raw contents")
    values = list(getattr(tensor.contents, field))
    return _text(values) if tensor.datatype == "BYTES" else values


def infer_json(req: Any) -> dict[str, Any]:
    """A `ModelInferRequest` as the REST protocol's inference request body."""
    raws = list(req.raw_input_contents)
    if raws and len(raws) != len(req.inputs):
        raise InvalidTensor(f"{len(raws)} raw input contents for {len(req.inputs)} inputs")
    inputs = []
    for i, tensor in enumerate(req.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape),
                                 "datatype": tensor.datatype,
                                 "data": _input_data(tensor, raws[i] if raws else None)}
        if tensor.parameters:
            entry["parameters"] = parameters_json(tensor.parameters)
        inputs.append(entry)
    body: dict[str, Any] = {"inputs": inputs}
    if req.id:
        body["id"] = req.id
    if req.parameters:
        body["parameters"] = parameters_json(req.parameters)
    if req.outputs:
        body["outputs"] = [
            {"name": o.name, **({"parameters": parameters_json(o.parameters)}
                                if o.parameters else {})}
            for o in req.outputs
        ]
    return body


def _flat(data: Any) -> list[Any]:
    """The REST protocol allows row-major nested lists as well as flat ones."""
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [x for row in data for x in _flat(row)]
    return data if isinstance(data, list) else [data]


def infer_response(doc: dict[str, Any], *, raw: bool) -> Any:
    """The pod's JSON inference response as a `ModelInferResponse`, its tensors raw or typed."""
    resp = m.ModelInferResponse(model_name=str(doc.get("model_name", "")),
                                model_version=str(doc.get("model_version") or ""),
                                id=str(doc.get("id") or ""))
    set_parameters(resp.parameters, doc.get("parameters") or {})
    for out in doc.get("outputs") or []:
        datatype = str(out.get("datatype", ""))
        tensor = resp.outputs.add(name=str(out.get("name", "")), datatype=datatype,
                                  shape=[int(d) for d in out.get("shape", [])])
        set_parameters(tensor.parameters, out.get("parameters") or {})
        dtype, field = DTYPES.get(datatype, (None, None))
        values = _flat(out.get("data", []))
        if datatype == "BYTES":
            elements = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
            if raw:
                resp.raw_output_contents.append(
                    b"".join(struct.pack("<I", len(e)) + e for e in elements))
            else:
                tensor.contents.bytes_contents.extend(elements)
        elif dtype is None:
            raise InvalidTensor(f"the model answered output {tensor.name!r} of unsupported "
                                f"datatype {datatype!r}")
        elif raw or field is None:
            resp.raw_output_contents.append(np.asarray(values, dtype=dtype).tobytes())
        else:
            getattr(tensor.contents, field).extend(values)
    return resp


def metadata_response(doc: dict[str, Any]) -> Any:
    """The pod's JSON model metadata as a `ModelMetadataResponse`."""
    resp = m.ModelMetadataResponse(name=str(doc.get("name", "")),
                                   versions=[str(v) for v in doc.get("versions") or []],
                                   platform=str(doc.get("platform", "")))
    for kind in ("inputs", "outputs"):
        for t in doc.get(kind) or []:
            getattr(resp, kind).add(name=str(t.get("name", "")),
                                    datatype=str(t.get("datatype", "")),
                                    shape=[int(d) for d in t.get("shape", [])])
    return resp
