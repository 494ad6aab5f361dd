"""The sample pod as the `local` backend runs it: a real subprocess on a free port.

Every answer is checked against the model computed in-process, and the process-level
contract (readiness, SIGTERM drain, exit codes, in-flight accounting) is exercised for real.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from examples.sample.model import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "examples" / "sample"
READY_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 5.0
# No pytest-timeout here, so every HTTP call carries its own bound: a hung pod fails a test
# instead of hanging the suite.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2)
POD_KNOBS = frozenset(
    {
        "PORT",
        "HOST",
        "MODEL_NAME",
        "MODEL_VERSION",
        "SAMPLE_LATENCY_MS",
        "SAMPLE_STARTUP_DELAY_MS",
        "SAMPLE_FAIL_ON_START",
    }
)


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (racy in theory, fine in practice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Pod:
    """One sample server process and where its output goes."""

    proc: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Both streams, for assertion messages."""
        return f"stdout:\n{self.stdout.read_text()}\nstderr:\n{self.stderr.read_text()}"

    def kill(self) -> None:
        """Make sure the process is gone, whatever state the test left it in."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=EXIT_TIMEOUT_S)


def spawn(tmp_dir: Path, env: dict[str, str], *, with_port: bool = True) -> Pod:
    """Start `python -m examples.sample.server` the way a backend would."""
    port = free_port()
    # The pod's knobs come only from `env`, never from whatever the test runner inherited.
    inherited = {k: v for k, v in os.environ.items() if k not in POD_KNOBS}
    full_env = {**inherited, **env}
    if with_port:
        full_env["PORT"] = str(port)
    stdout, stderr = tmp_dir / f"pod-{port}.out", tmp_dir / f"pod-{port}.err"
    # Output goes to files, never to an undrained pipe that could block the pod.
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "examples.sample.server"],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=out,
            stderr=err,
        )
    return Pod(proc=proc, port=port, stdout=stdout, stderr=stderr)


async def wait_ready(pod: Pod) -> float:
    """Poll readiness like the backend does; return seconds from now until ready."""
    started = time.perf_counter()
    deadline = started + READY_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=PROBE_TIMEOUT) as session:
        while time.perf_counter() < deadline:
            if pod.proc.poll() is not None:
                pytest.fail(f"pod exited with {pod.proc.returncode} before ready\n{pod.output()}")
            try:
                async with session.get(f"{pod.url}/v2/health/ready") as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.02)
    pytest.fail(f"pod not ready within {READY_TIMEOUT_S} s\n{pod.output()}")


async def exit_code(pod: Pod, within: float) -> int:
    """The process's exit code, failing the test if it still runs after `within` seconds."""
    try:
        # Popen.wait in a worker thread: bounded by its own timeout, never blocks the loop.
        return await asyncio.to_thread(pod.proc.wait, within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pod still running {within} s later\n{pod.output()}")


async def wait_in_flight(session: aiohttp.ClientSession, pod: Pod) -> None:
    """Return once the pod reports a request in flight (bounded: about 5 s)."""
    for _ in range(500):
        _, stats = await call(session, "GET", f"{pod.url}/stats")
        if stats["in_flight"] > 0:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"no request ever in flight\n{pod.output()}")


async def wait_refusing_connections(pod: Pod) -> None:
    """Return once a fresh connection is refused, i.e. the pod stopped accepting (about 2 s)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=PROBE_TIMEOUT) as session:
        for _ in range(200):
            try:
                async with session.get(f"{pod.url}/v2/health/ready"):
                    pass
            except aiohttp.ClientConnectionError:
                return
            await asyncio.sleep(0.01)
    pytest.fail(f"pod still accepts connections after SIGTERM\n{pod.output()}")


StartPod = Callable[..., Awaitable[Pod]]


@pytest.fixture
async def start_pod(tmp_path: Path) -> AsyncIterator[StartPod]:
    """Start ready pods with extra env; every one is killed at teardown, pass or fail."""
    pods: list[Pod] = []

    async def start(**env: str) -> Pod:
        pod = spawn(tmp_path, env)
        pods.append(pod)
        await wait_ready(pod)
        return pod

    try:
        yield start
    finally:
        for pod in pods:
            pod.kill()


@pytest.fixture(scope="module")
def shared_pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """One default pod for the tests that only read answers, to keep the suite fast."""
    pod = spawn(tmp_path_factory.mktemp("shared-pod"), {})
    try:
        asyncio.run(wait_ready(pod))
        yield pod
    finally:
        pod.kill()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """The test's HTTP client."""
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        yield session


async def call(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None, *, raw: bytes = b""
) -> tuple[int, Any]:
    """One request; returns the status and the decoded JSON answer."""
    data = raw or (json.dumps(body).encode() if body is not None else None)
    async with session.request(method, url, data=data) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()


def expected(rows: list[list[float]]) -> np.ndarray:
    """What the model computed in this process says the pod must answer."""
    return load_model().predict(np.array(rows, dtype=np.float32))


def v2_body(rows: list[list[float]], **extra: Any) -> dict[str, Any]:
    flat = [value for row in rows for value in row]
    tensor = {"name": "input-0", "shape": [len(rows), 4], "datatype": "FP32", "data": flat}
    return {"inputs": [tensor], **extra}


ROWS_5 = [
    [5.1, 3.5, 1.4, 0.2],
    [4.9, 3.0, 1.4, 0.2],
    [6.0, 2.8, 4.4, 1.3],
    [5.7, 2.6, 3.5, 1.0],
    [6.7, 3.0, 5.6, 2.1],
]


async def test_announces_itself_and_reports_health(
    shared_pod: Pod, client: aiohttp.ClientSession
) -> None:
    url = shared_pod.url

    assert f"serving model 'sample' on 127.0.0.1:{shared_pod.port}" in shared_pod.stdout.read_text()
    assert await call(client, "GET", f"{url}/v2/health/live") == (200, {"live": True})
    assert await call(client, "GET", f"{url}/v2/health/ready") == (200, {"ready": True})
    assert await call(client, "GET", f"{url}/v2/models/sample/ready") == (
        200,
        {"name": "sample", "ready": True},
    )
    assert await call(client, "GET", f"{url}/v1/models/sample") == (
        200,
        {"name": "sample", "ready": True},
    )
    status, server = await call(client, "GET", f"{url}/v2")
    assert status == 200 and server["extensions"] == [] and server["name"] and server["version"]


async def test_model_metadata_describes_tensors(
    shared_pod: Pod, client: aiohttp.ClientSession
) -> None:
    status, meta = await call(client, "GET", f"{shared_pod.url}/v2/models/sample")

    assert status == 200
    assert meta["name"] == "sample" and meta["platform"] == "numpy" and meta["versions"]
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "output-0", "datatype": "FP32", "shape": [-1, 3]}]


async def test_v2_infer_matches_in_process_model(
    shared_pod: Pod, client: aiohttp.ClientSession
) -> None:
    request = json.loads((SAMPLE_DIR / "request_v2.json").read_text())
    rows = np.array(request["inputs"][0]["data"]).reshape(-1, 4).tolist()

    status, answer = await call(client, "POST", f"{shared_pod.url}/v2/models/sample/infer", request)

    assert status == 200, answer
    assert answer["model_name"] == "sample"
    assert answer["id"] == request["id"]
    [output] = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("output-0", "FP32", [2, 3])
    assert np.allclose(np.reshape(output["data"], (2, 3)), expected(rows))


async def test_v1_predict_matches_in_process_model(
    shared_pod: Pod, client: aiohttp.ClientSession
) -> None:
    request = json.loads((SAMPLE_DIR / "request_v1.json").read_text())

    status, answer = await call(
        client, "POST", f"{shared_pod.url}/v1/models/sample:predict", request
    )

    assert status == 200, answer
    assert np.allclose(answer["predictions"], expected(request["instances"]))


async def test_batch_of_five_rows_in_both_protocols(
    shared_pod: Pod, client: aiohttp.ClientSession
) -> None:
    nested = v2_body(ROWS_5)
    nested["inputs"][0]["data"] = ROWS_5  # OIP allows nested data as well as flat
    nested["inputs"][0]["datatype"] = "FP64"

    for body in (v2_body(ROWS_5), nested):
        status, answer = await call(
            client, "POST", f"{shared_pod.url}/v2/models/sample/infer", body
        )
        assert status == 200, answer
        assert "id" not in answer
        assert answer["outputs"][0]["shape"] == [5, 3]
        assert np.allclose(np.reshape(answer["outputs"][0]["data"], (5, 3)), expected(ROWS_5))

    status, answer = await call(
        client, "POST", f"{shared_pod.url}/v1/models/sample:predict", {"instances": ROWS_5}
    )
    assert status == 200, answer
    assert np.allclose(answer["predictions"], expected(ROWS_5))


def _with_tensor(**changes: Any) -> dict[str, Any]:
    body = v2_body(ROWS_5[:2])
    body["inputs"][0].update(changes)
    return body


INVALID_REQUESTS = {
    "v2-bad-json": ("/v2/models/sample/infer", b'{"inputs": ['),
    "v2-empty-body": ("/v2/models/sample/infer", b" "),
    "v2-not-an-object": ("/v2/models/sample/infer", [1, 2]),
    "v2-missing-inputs": ("/v2/models/sample/infer", {"id": "x"}),
    "v2-empty-inputs": ("/v2/models/sample/infer", {"inputs": []}),
    "v2-shape-data-mismatch": ("/v2/models/sample/infer", _with_tensor(shape=[3, 4])),
    "v2-wrong-feature-count": (
        "/v2/models/sample/infer",
        _with_tensor(shape=[2, 3], data=[1.0] * 6),
    ),
    "v2-zero-rows": ("/v2/models/sample/infer", _with_tensor(shape=[0, 4], data=[])),
    "v2-shape-not-2d": ("/v2/models/sample/infer", _with_tensor(shape=[8])),
    "v2-bad-datatype": ("/v2/models/sample/infer", _with_tensor(datatype="BYTES")),
    "v2-string-data": ("/v2/models/sample/infer", _with_tensor(data=["1"] * 8)),
    "v2-missing-data": (
        "/v2/models/sample/infer",
        {"inputs": [{"shape": [1, 4], "datatype": "FP32"}]},
    ),
    "v2-non-string-id": ("/v2/models/sample/infer", v2_body(ROWS_5[:1], id=7)),
    "v2-nan": (
        "/v2/models/sample/infer",
        b'{"inputs": [{"name": "input-0", "shape": [1, 4], '
        b'"datatype": "FP64", "data": [NaN, 1, 1, 1]}]}',
    ),
    # Wrong JSON types in a tensor are the client's fault, never a 500 (a dict datatype was
    # "internal error: unhashable type: 'dict'").
    "v2-datatype-an-object": (
        "/v2/models/sample/infer",
        {"inputs": [{"name": "", "shape": [], "datatype": {}, "data": []}]},
    ),
    "v2-datatype-a-list": ("/v2/models/sample/infer", _with_tensor(datatype=["FP32"])),
    "v2-name-a-number": ("/v2/models/sample/infer", _with_tensor(name=0)),
    "v2-shape-of-strings": ("/v2/models/sample/infer", _with_tensor(shape=["2", "4"])),
    "v2-shape-of-booleans": ("/v2/models/sample/infer", _with_tensor(shape=[True, 4])),
    "v2-shape-negative": ("/v2/models/sample/infer", _with_tensor(shape=[-1, 4])),
    "v2-data-a-number": ("/v2/models/sample/infer", _with_tensor(data=1.0)),
    "v2-data-null": ("/v2/models/sample/infer", _with_tensor(data=None)),
    "v2-data-of-objects": ("/v2/models/sample/infer", _with_tensor(data=[{}] * 8)),
    "v2-parameters-a-list": ("/v2/models/sample/infer", _with_tensor(parameters=[])),
    "v2-outputs-not-a-list": ("/v2/models/sample/infer", v2_body(ROWS_5[:1], outputs={})),
    "v2-output-name-a-number": (
        "/v2/models/sample/infer", v2_body(ROWS_5[:1], outputs=[{"name": 1}])),
    "v2-deeply-nested": ("/v2/models/sample/infer", b'{"inputs": ' + b"[" * 100_000),
    "v2-versioned-datatype-an-object": (
        "/v2/models/sample/versions/1/infer", _with_tensor(datatype={})),
    "v1-bad-json": ("/v1/models/sample:predict", b"not json"),
    "v1-missing-instances": ("/v1/models/sample:predict", {"inputs": ROWS_5}),
    "v1-wrong-feature-count": ("/v1/models/sample:predict", {"instances": [[1.0, 2.0, 3.0]]}),
    "v1-ragged": ("/v1/models/sample:predict", {"instances": [[1.0, 2.0, 3.0, 4.0], [1.0]]}),
}


@pytest.mark.parametrize(("path", "body"), INVALID_REQUESTS.values(), ids=INVALID_REQUESTS.keys())
async def test_invalid_input_is_400_with_json_error(
    shared_pod: Pod, client: aiohttp.ClientSession, path: str, body: Any
) -> None:
    raw = body if isinstance(body, bytes) else b""

    status, answer = await call(client, "POST", f"{shared_pod.url}{path}", body, raw=raw)

    assert status == 400, answer
    assert isinstance(answer["error"], str) and answer["error"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v2/models/other/infer", v2_body(ROWS_5[:1])),
        ("POST", "/v1/models/other:predict", {"instances": ROWS_5[:1]}),
        ("GET", "/v2/models/other", None),
        ("GET", "/v2/models/other/ready", None),
        ("GET", "/v1/models/other", None),
        ("GET", "/v2/models/other/versions/1", None),
        ("POST", "/v2/models/sample/versions/other/infer", v2_body(ROWS_5[:1])),
        ("GET", "/v2/models/sample/versions/other", None),
        ("GET", "/v2/models/sample/versions/other/ready", None),
    ],
)
async def test_unknown_model_is_404(
    shared_pod: Pod, client: aiohttp.ClientSession, method: str, path: str, body: Any
) -> None:
    status, answer = await call(client, method, f"{shared_pod.url}{path}", body)

    assert status == 404
    assert "other" in answer["error"]


async def test_unknown_path_is_json_404(shared_pod: Pod, client: aiohttp.ClientSession) -> None:
    assert (await call(client, "GET", f"{shared_pod.url}/nowhere"))[0] == 404


async def test_versioned_paths_serve_the_version_from_env(
    start_pod: StartPod, client: aiohttp.ClientSession
) -> None:
    pod = await start_pod(MODEL_NAME="iris", MODEL_VERSION="7")
    base = f"{pod.url}/v2/models/iris"

    infer = await call(client, "POST", f"{base}/versions/7/infer", v2_body(ROWS_5))
    metadata = await call(client, "GET", f"{base}/versions/7")
    ready = await call(client, "GET", f"{base}/versions/7/ready")
    other = await call(client, "POST", f"{base}/versions/1/infer", v2_body(ROWS_5))
    unversioned = await call(client, "POST", f"{base}/infer", v2_body(ROWS_5))

    assert infer[0] == 200 and infer[1]["model_version"] == "7", infer
    assert np.allclose(np.reshape(infer[1]["outputs"][0]["data"], (5, 3)), expected(ROWS_5))
    assert metadata == (200, {**metadata[1], "name": "iris", "versions": ["7"]})
    assert ready == (200, {"name": "iris", "ready": True})
    assert other[0] == 404 and "version 1" in other[1]["error"]
    assert unversioned[0] == 200 and unversioned[1]["model_version"] == "7"


async def test_model_name_comes_from_env(
    start_pod: StartPod, client: aiohttp.ClientSession
) -> None:
    pod = await start_pod(MODEL_NAME="iris")

    status, answer = await call(client, "POST", f"{pod.url}/v2/models/iris/infer", v2_body(ROWS_5))
    assert status == 200 and answer["model_name"] == "iris"
    assert (await call(client, "POST", f"{pod.url}/v2/models/sample/infer", v2_body(ROWS_5)))[
        0
    ] == 404


async def test_stats_count_concurrent_requests(
    start_pod: StartPod, client: aiohttp.ClientSession
) -> None:
    pod = await start_pod(SAMPLE_LATENCY_MS="200")
    url = f"{pod.url}/v2/models/sample/infer"

    results = await asyncio.gather(*(call(client, "POST", url, v2_body(ROWS_5)) for _ in range(10)))

    assert [status for status, _ in results] == [200] * 10
    status, stats = await call(client, "GET", f"{pod.url}/stats")
    assert status == 200
    assert stats["max_in_flight"] >= 2
    assert (stats["in_flight"], stats["total"], stats["pid"]) == (0, 10, pod.proc.pid)


async def test_sigterm_lets_the_request_in_flight_finish_then_exits_zero(
    start_pod: StartPod, client: aiohttp.ClientSession
) -> None:
    pod = await start_pod(SAMPLE_LATENCY_MS="700")
    request = asyncio.create_task(
        call(client, "POST", f"{pod.url}/v2/models/sample/infer", v2_body(ROWS_5))
    )
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as observer:
        await wait_in_flight(observer, pod)

    pod.proc.send_signal(signal.SIGTERM)

    async with asyncio.timeout(EXIT_TIMEOUT_S):
        await wait_refusing_connections(pod)
        status, answer = await request
        code = await exit_code(pod, EXIT_TIMEOUT_S)
    assert status == 200, answer
    assert code == 0, pod.output()


async def test_sigterm_when_idle_exits_zero_within_deadline(start_pod: StartPod) -> None:
    pod = await start_pod()

    pod.proc.send_signal(signal.SIGTERM)

    assert await exit_code(pod, EXIT_TIMEOUT_S) == 0, pod.output()


async def test_startup_delay_holds_back_readiness(tmp_path: Path) -> None:
    pod = spawn(tmp_path, {"SAMPLE_STARTUP_DELAY_MS": "400"})
    try:
        assert await wait_ready(pod) >= 0.4
    finally:
        pod.kill()


async def test_fail_on_start_exits_non_zero(tmp_path: Path) -> None:
    pod = spawn(tmp_path, {"SAMPLE_FAIL_ON_START": "1"})
    try:
        code = await exit_code(pod, READY_TIMEOUT_S)
        assert code == 3, pod.output()
        assert "SAMPLE_FAIL_ON_START" in pod.stderr.read_text()
    finally:
        pod.kill()


async def test_missing_port_is_a_clear_error(tmp_path: Path) -> None:
    pod = spawn(tmp_path, {}, with_port=False)
    try:
        code = await exit_code(pod, READY_TIMEOUT_S)
        assert code != 0, pod.output()
        assert "PORT is not set" in pod.stderr.read_text()
    finally:
        pod.kill()
