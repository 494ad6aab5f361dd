"""A model on KServe's own Python model server (`pip install kserve`: FastAPI and uvicorn), to
show that a real third-party OIP/KServe server is a pod like any other (DESIGN.md, the pod
contract): fnplane gives it its port in `PORT` and the model name in `MODEL_NAME`, and probes
`/v2/health/ready`, which KServe serves.

Run: `PORT=8080 MODEL_NAME=adder python -m examples.kserve_model`. The model sums each row of
its input: KServe v1 `{"instances": [[1, 2], [3, 4]]}` → `{"predictions": [3, 7]}`; OIP v2,
one FP64/FP32/INT tensor [n, k] → one FP64 tensor `sum` [n].

KServe's REST server listens on 0.0.0.0 (its uvicorn host is not configurable); gRPC is off.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class Adder(Model):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ready = True  # nothing to load

    async def predict(self, payload: dict[str, Any] | InferRequest,
                      headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None
                      ) -> dict[str, Any] | InferResponse:
        if isinstance(payload, InferRequest):
            rows = payload.inputs[0].as_numpy().astype(np.float64)
            sums = rows.reshape(rows.shape[0], -1).sum(axis=1)
            return InferResponse(
                response_id=payload.id or "", model_name=self.name,
                infer_outputs=[InferOutput(name="sum", shape=list(sums.shape), datatype="FP64",
                                           data=sums.tolist())])
        rows = np.asarray(payload["instances"], dtype=np.float64)
        return {"predictions": rows.reshape(rows.shape[0], -1).sum(axis=1).tolist()}


def main() -> None:
    model = Adder(os.environ.get("MODEL_NAME", "adder"))
    ModelServer(http_port=int(os.environ["PORT"]), enable_grpc=False, workers=1).start([model])


if __name__ == "__main__":
    main()
