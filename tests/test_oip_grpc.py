"""The Open Inference Protocol over gRPC (issue 19), seen by an official client: Triton's
gRPC client (tritonclient[grpc], from PyPI) gets server and model metadata, readiness and an
inference from a service at zero pods through the gateway's gRPC port; an unknown model is
NOT_FOUND with KServe's message. And the conversion between the protocol's messages and the
REST JSON pods speak, both tensor forms (raw bytes, as tritonclient sends, and typed
contents)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from activator.oipgrpc import convert
from activator.oipgrpc import messages as m
from tests.stackutil import deploy, describe, running_stack, sample_spec

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


def session(address: str) -> dict[str, Any]:
    """One synchronous client's conversation with the gateway; what it saw."""
    client = triton.InferenceServerClient(url=address)
    try:
        seen: dict[str, Any] = {"live": client.is_server_live(),
                                "ready": client.is_server_ready(),
                                "server": client.get_server_metadata(as_json=True)}
        tensor = triton.InferInput("input-0", list(ROWS.shape), "FP32")
        tensor.set_data_from_numpy(ROWS)
        # Inference first: the service is at zero, this call wakes it.
        result = client.infer("grpc-sample", [tensor], request_id="g1",
                              outputs=[triton.InferRequestedOutput("output-0")],
                              client_timeout=60.0)
        seen["infer"] = result.get_response(as_json=True)
        seen["probs"] = result.as_numpy("output-0")
        seen["metadata"] = client.get_model_metadata("grpc-sample", as_json=True)
        seen["model-ready"] = client.is_model_ready("grpc-sample")
        seen["unknown-ready"] = client.is_model_ready("no-such-model")
        try:
            client.infer("no-such-model", [tensor])
        except InferenceServerException as exc:
            seen["unknown-infer"] = (exc.status(), exc.message())
    finally:
        client.close()
    return seen


async def test_tritons_grpc_client_gets_an_inference_from_zero(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path, grpc_port=0) as stack:
        assert stack.activator is not None and stack.activator.grpc_address
        await deploy(nats_url, sample_spec(name="grpc-sample"))
        assert (await describe(nats_url, "grpc-sample")).desired_pods == 0
        seen = await asyncio.to_thread(session, stack.activator.grpc_address)
        assert (await describe(nats_url, "grpc-sample")).ready_pods >= 1  # woken by gRPC

    assert seen["live"] and seen["ready"]
    assert seen["server"]["name"] == "fnplane"
    assert seen["infer"]["model_name"] == "grpc-sample" and seen["infer"]["id"] == "g1"
    probs = seen["probs"]
    assert probs.shape == (2, 3) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert seen["metadata"]["name"] == "grpc-sample"
    assert seen["metadata"]["inputs"][0]["name"] == "input-0"
    assert seen["model-ready"] is True and seen["unknown-ready"] is False
    assert seen["unknown-infer"][0] == "StatusCode.NOT_FOUND"
    assert "Model with name no-such-model does not exist." in seen["unknown-infer"][1]


# ---- conversion, pure ------------------------------------------------------------------------


def test_raw_inputs_become_rest_json_and_the_answer_comes_back_raw() -> None:
    req = m.ModelInferRequest(model_name="s", id="r", outputs=[{"name": "y"}])
    req.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    req.inputs.add(name="t", datatype="BYTES", shape=[2])
    req.parameters["top_k"].int64_param = 3
    req.raw_input_contents.append(np.array([1, 2, 3, 4], dtype="<f4").tobytes())
    req.raw_input_contents.append(b"\x02\x00\x00\x00hi\x03\x00\x00\x00you")
    body = convert.infer_json(req)
    assert body == {"id": "r", "parameters": {"top_k": 3}, "outputs": [{"name": "y"}],
                    "inputs": [
                        {"name": "x", "shape": [2, 2], "datatype": "FP32",
                         "data": [1.0, 2.0, 3.0, 4.0]},
                        {"name": "t", "shape": [2], "datatype": "BYTES", "data": ["hi", "you"]}]}

    resp = convert.infer_response({"model_name": "s", "id": "r", "outputs": [
        {"name": "y", "shape": [2, 1], "datatype": "INT64", "data": [[7], [8]]}]}, raw=True)
    assert resp.outputs[0].shape == [2, 1]
    assert np.frombuffer(resp.raw_output_contents[0], dtype="<i8").tolist() == [7, 8]


def test_typed_contents_in_typed_contents_out() -> None:
    req = m.ModelInferRequest(model_name="s")
    x = req.inputs.add(name="x", datatype="INT32", shape=[3])
    x.contents.int_contents.extend([1, -2, 3])
    assert convert.infer_json(req)["inputs"][0]["data"] == [1, -2, 3]
    resp = convert.infer_response({"outputs": [
        {"name": "y", "shape": [2], "datatype": "FP64", "data": [0.5, 1.5]}]}, raw=False)
    assert list(resp.outputs[0].contents.fp64_contents) == [0.5, 1.5]
    assert not resp.raw_output_contents


@pytest.mark.parametrize(("datatype", "raw", "why"), [
    ("FP32", b"\x00\x00\x80", "not whole FP32 elements"),
    ("BF16", b"\x00\x00", "unsupported datatype"),
    ("BYTES", b"\x05\x00\x00\x00ab", "truncated"),
])
def test_inputs_the_rest_protocol_cannot_carry_are_invalid(datatype: str, raw: bytes,
                                                           why: str) -> None:
    req = m.ModelInferRequest(model_name="s")
    req.inputs.add(name="x", datatype=datatype, shape=[1])
    req.raw_input_contents.append(raw)
    with pytest.raises(convert.InvalidTensor, match=why):
        convert.infer_json(req)
