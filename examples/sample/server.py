"""The sample pod: an HTTP server speaking KServe v1 and the Open Inference Protocol v2.

This is what the `local` backend spawns for a service by default, so it follows the Knative
runtime contract (port from `PORT`, readiness on `/v2/health/ready`, drain on SIGTERM) and
counts requests in flight so tests can prove the activator never exceeds container concurrency.

Run: `PORT=8080 python -m examples.sample.server`. Environment:

- `PORT` (required), `HOST` (default 127.0.0.1), `MODEL_NAME` (default "sample"),
  `MODEL_VERSION` (default "1": the one version the versioned OIP paths accept; fnplane sets
  both from the service's spec).
- `SAMPLE_LATENCY_MS`: extra latency per infer/predict request (not per row), a knob for tests
  and benchmarks that makes concurrency observable.
- `SAMPLE_STARTUP_DELAY_MS`: sleep before listening, simulating the load of big weights.
- `SAMPLE_FAIL_ON_START`: if non-empty, exit 3 at once (the "pod failed to start" path).
- `SAMPLE_UNREADY_FILE`: while this file exists, readiness answers 503 though the pod still
  serves (a model reloading, a wedged GPU): readiness flips without the process dying.
  `{pod}` in it stands for `FNPLANE_POD`, so each pod of a service has its own switch.
- `MODEL_DIR`: a directory of weights (fnplane's node cache hands it to the pod read-only when
  the service has a `storageUri`): the model is loaded from its `weights.npz` (or its one
  `.npz` file), and every file in it is read once, as a server loading big weights would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiohttp import web

from examples.sample.model import Model, load_model
from examples.sample.protocol import (
    INPUT_NAME,
    OUTPUT_NAME,
    HttpError,
    InferenceError,
    InvalidInput,
    ModelNotFound,
    decode_v1_request,
    decode_v2_request,
)

SERVER_NAME = "fnplane-sample"
SERVER_VERSION = "0.1.0"
DEFAULT_MODEL_VERSION = "1"
# Long enough for any in-flight request (even with a large SAMPLE_LATENCY_MS in tests) to
# finish, short enough that a stuck pod does not hold up scale-down.
SHUTDOWN_TIMEOUT_S = 5.0
# Micro-batches from the activator can be large; aiohttp's 1 MiB default would cut them off.
MAX_BODY_BYTES = 16 * 1024 * 1024
EXIT_BAD_CONFIG = 2
EXIT_FAIL_ON_START = 3

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Everything the pod reads from its environment, validated once at start."""

    port: int
    host: str = "127.0.0.1"
    model_name: str = "sample"
    model_version: str = DEFAULT_MODEL_VERSION
    latency_s: float = 0.0
    startup_delay_s: float = 0.0
    unready_file: str = ""
    model_dir: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServerSettings:
        """Build settings from `env`; raise ValueError naming the bad variable."""
        raw_port = env.get("PORT", "").strip()
        if not raw_port:
            raise ValueError("PORT is not set; the backend must give each pod its port in PORT")
        try:
            port = int(raw_port)
        except ValueError:
            raise ValueError(f"PORT must be an integer, got {raw_port!r}") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"PORT must be in 1..65535, got {port}")
        model_name = env.get("MODEL_NAME", "") or "sample"
        if "/" in model_name or ":" in model_name:
            raise ValueError(f"MODEL_NAME must not contain '/' or ':', got {model_name!r}")
        model_version = env.get("MODEL_VERSION", "") or DEFAULT_MODEL_VERSION
        if "/" in model_version:
            raise ValueError(f"MODEL_VERSION must not contain '/', got {model_version!r}")
        return cls(
            port=port,
            host=env.get("HOST", "") or "127.0.0.1",
            model_name=model_name,
            model_version=model_version,
            latency_s=_milliseconds(env, "SAMPLE_LATENCY_MS") / 1000.0,
            startup_delay_s=_milliseconds(env, "SAMPLE_STARTUP_DELAY_MS") / 1000.0,
            unready_file=env.get("SAMPLE_UNREADY_FILE", "").replace(
                "{pod}", env.get("FNPLANE_POD", "")),
            model_dir=env.get("MODEL_DIR", ""),
        )


def _milliseconds(env: Mapping[str, str], key: str) -> float:
    """Read a non-negative duration in milliseconds; unset or empty means 0."""
    raw = env.get(key, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number of milliseconds, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be a finite number >= 0, got {raw!r}")
    return value


class InFlightStats:
    """Counts infer/predict requests in flight, the peak, and the total answered.

    The peak is the evidence control-plane tests use that container concurrency was never
    exceeded, so it is updated on entry, before any await, and released in `finally`.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.total = 0

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Hold one in-flight slot for the duration of a request, whatever its outcome."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.total += 1

    def snapshot(self) -> dict[str, int]:
        """The `/stats` body."""
        return {
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "total": self.total,
            "pid": os.getpid(),
        }


class SampleServer:
    """The pod's HTTP handlers around one loaded model."""

    def __init__(self, model: Model, settings: ServerSettings) -> None:
        self.model = model
        self.settings = settings
        self.stats = InFlightStats()
        # Goes false when draining, so readiness probes stop sending new traffic our way.
        self.ready = True

    def build_app(self) -> web.Application:
        """The aiohttp application with every route of the pod."""
        app = web.Application(middlewares=[_json_errors], client_max_size=MAX_BODY_BYTES)
        # `[^/:]+` keeps ":predict" out of the model name, so both v1 routes can coexist.
        # The versioned OIP paths are the protocol's own (its OpenAPI document has only
        # those for a model): a client that pins a version calls them.
        app.add_routes(
            [
                web.get("/v2/health/live", self.live),
                web.get("/v2/health/ready", self.server_ready),
                web.get("/v2", self.server_metadata),
                web.get("/v2/", self.server_metadata),
                web.get("/v2/models/{name}", self.model_metadata),
                web.get("/v2/models/{name}/ready", self.model_ready),
                web.post("/v2/models/{name}/infer", self.infer),
                web.get("/v2/models/{name}/versions/{version}", self.model_metadata),
                web.get("/v2/models/{name}/versions/{version}/ready", self.model_ready),
                web.post("/v2/models/{name}/versions/{version}/infer", self.infer),
                web.get("/v1/models/{name:[^/:]+}", self.v1_model),
                web.post("/v1/models/{name:[^/:]+}:predict", self.predict),
                web.get("/stats", self.stats_handler),
            ]
        )
        return app

    async def live(self, request: web.Request) -> web.Response:
        """Liveness: the process answers HTTP."""
        return web.json_response({"live": True})

    def not_ready(self) -> str:
        """Why readiness must say no now, or "" when the pod takes traffic."""
        if not self.ready:
            return "server is shutting down"
        if self.settings.unready_file and os.path.exists(self.settings.unready_file):
            return f"{self.settings.unready_file} exists"
        return ""

    async def server_ready(self, request: web.Request) -> web.Response:
        """Readiness: the model is loaded and we are not draining."""
        if why := self.not_ready():
            return _error(503, why)
        return web.json_response({"ready": True})

    async def server_metadata(self, request: web.Request) -> web.Response:
        """OIP server metadata."""
        return web.json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []})

    async def model_metadata(self, request: web.Request) -> web.Response:
        """OIP model metadata, with tensor shapes taken from the loaded weights."""
        name = self._known_model(request)
        return web.json_response(
            {
                "name": name,
                "versions": [self.settings.model_version],
                "platform": "numpy",
                "inputs": [
                    {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, self.model.n_features]}
                ],
                "outputs": [
                    {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, self.model.n_classes]}
                ],
            }
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        """OIP per-model readiness."""
        name = self._known_model(request)
        if why := self.not_ready():
            return _error(503, f"model {name} is not ready: {why}")
        return web.json_response({"name": name, "ready": True})

    async def v1_model(self, request: web.Request) -> web.Response:
        """KServe v1 model status."""
        name = self._known_model(request)
        return web.json_response({"name": name, "ready": not self.not_ready()})

    async def infer(self, request: web.Request) -> web.Response:
        """OIP v2 inference: one input tensor [n, features] in, probabilities [n, classes] out."""
        with self.stats.track():
            name = self._known_model(request)
            batch, request_id = decode_v2_request(await _json_body(request), self.model.n_features)
            probs = await self._run(batch)
            answer: dict[str, object] = {
                "model_name": name, "model_version": self.settings.model_version,
            }
            if request_id is not None:
                answer["id"] = request_id
            answer["outputs"] = [
                {
                    "name": OUTPUT_NAME,
                    "shape": list(probs.shape),
                    "datatype": "FP32",
                    "data": probs.ravel().tolist(),
                }
            ]
            return web.json_response(answer)

    async def predict(self, request: web.Request) -> web.Response:
        """KServe v1 prediction: `instances` rows in, `predictions` rows out."""
        with self.stats.track():
            self._known_model(request)
            batch = decode_v1_request(await _json_body(request), self.model.n_features)
            probs = await self._run(batch)
            return web.json_response({"predictions": probs.tolist()})

    async def stats_handler(self, request: web.Request) -> web.Response:
        """Concurrency accounting for tests and benchmarks."""
        return web.json_response(self.stats.snapshot())

    def _known_model(self, request: web.Request) -> str:
        """The model name from the path, or 404 if this pod does not serve it (or the
        version the path names)."""
        name = request.match_info["name"]
        if name != self.settings.model_name:
            raise ModelNotFound(name)
        version = request.match_info.get("version")
        if version is not None and version != self.settings.model_version:
            raise ModelNotFound(name, version)
        return name

    async def _run(self, batch: np.ndarray) -> np.ndarray:
        """Apply the artificial latency once, then predict the whole batch in one call.

        The forward pass takes microseconds, so it runs on the event loop: a thread hop
        would cost more than the work.
        """
        if self.settings.latency_s > 0:
            await asyncio.sleep(self.settings.latency_s)
        try:
            return self.model.predict(batch)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        except Exception as exc:
            raise InferenceError(f"inference failed: {exc}") from exc


async def _json_body(request: web.Request) -> object:
    """The parsed JSON body, or 400 with the parser's reason."""
    raw = await request.read()
    if not raw:
        raise InvalidInput("request body is empty; expected JSON")
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # `[[[[...` deeper than the parser goes: the client's fault
        raise InvalidInput("request body is not valid JSON: nested too deeply") from None


def _error(status: int, message: str) -> web.Response:
    """A KServe-style error answer."""
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Make every failure, including aiohttp's own 404/405/413, a JSON `{"error": ...}`."""
    try:
        return await handler(request)
    except HttpError as exc:
        return _error(exc.status, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
        response = _error(exc.status, exc.text or exc.reason)
        response.headers.update(headers)
        return response
    except Exception as exc:  # a pod must answer, never drop the connection
        print(f"sample: unhandled error on {request.path}: {exc!r}", file=sys.stderr, flush=True)
        return _error(500, f"internal error: {exc}")


async def serve(settings: ServerSettings) -> int:
    """Load the model, listen, and serve until SIGTERM/SIGINT; return the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if settings.startup_delay_s > 0:
        # A pod told to stop while still "loading" should exit promptly, not finish loading.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.startup_delay_s)
        if stop.is_set():
            return 0
    try:
        model = load_model(weights_in(settings.model_dir)) if settings.model_dir else load_model()
    except (OSError, ValueError) as exc:
        print(f"sample: cannot load model weights: {exc}", file=sys.stderr, flush=True)
        return 1

    server = SampleServer(model, settings)
    # No access log: the backend keeps the pod's output tail for `fnplane describe`, and a
    # line per request would bury start-up errors and slow benchmarks.
    runner = web.AppRunner(server.build_app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as exc:
        print(
            f"sample: cannot listen on {settings.host}:{settings.port}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        await runner.cleanup()
        return 1
    print(
        f"sample: serving model {settings.model_name!r} on {settings.host}:{settings.port}",
        flush=True,
    )

    await stop.wait()
    server.ready = False
    # cleanup() closes the listening socket, then waits up to SHUTDOWN_TIMEOUT_S for
    # requests in flight to finish before closing their connections.
    await runner.cleanup()
    return 0


def weights_in(model_dir: str) -> Path:
    """The weights file of a model directory, after reading every file in it once (the
    load a real server does; the bytes are not kept)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ValueError(f"MODEL_DIR {model_dir!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        with path.open("rb") as f:
            while f.read(8 * 1024 * 1024):
                pass
    if (root / "weights.npz").is_file():
        return root / "weights.npz"
    npz = [p for p in files if p.suffix == ".npz"]
    if len(npz) != 1:
        raise ValueError(f"MODEL_DIR {model_dir!r}: expected weights.npz or one .npz file, "
                         f"found {len(npz)}")
    return npz[0]


def main(env: Mapping[str, str] | None = None) -> int:
    """Entry point: check the environment, then serve; return the process exit code."""
    env = os.environ if env is None else env
    if env.get("SAMPLE_FAIL_ON_START"):
        print(
            "sample: SAMPLE_FAIL_ON_START is set; exiting as a pod that failed to start",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_FAIL_ON_START
    try:
        settings = ServerSettings.from_env(env)
    except ValueError as exc:
        print(f"sample: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_CONFIG
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
