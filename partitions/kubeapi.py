"""Talking to the Kubernetes API with the official (synchronous) `kubernetes` client from an
asyncio program: one-shot calls (`KubeApi`) run in worker threads; each list+watch runs in
its own daemon thread and hands what it sees to the event loop.

The list+watch loop is the informer pattern of client-go, in small: list (paginated) to get
a consistent snapshot and its resourceVersion, watch from that resourceVersion (bookmarks
keep it fresh), and when the server says the version is too old (410 Gone, either as the
HTTP status or as an ERROR event in the stream), list again. Every list is delivered whole
(`Synced`) so the consumer can notice objects deleted while it was not watching.

Bodies are read raw (`_preload_content=False`) and parsed as JSON: the client's models cost
time on big lists, and some responses do not deserialize at all (a Binding's reply is a
`Status`, which the generated `create_namespaced_pod_binding` cannot turn into `V1Binding`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3.exceptions
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger(__name__)

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LIST_PAGE = 500


class ApiUnreachable(Exception):
    """No answer in time, or the connection broke: the request may or may not have been
    applied (a create may have created, a bind may have bound)."""


def uncertain(exc: BaseException) -> bool:
    """Whether the failed request may still have been applied: no answer at all, or a 500
    or 504 (the API server gave up on etcd, which may yet commit the write)."""
    return isinstance(exc, ApiUnreachable) or (
        isinstance(exc, ApiException) and exc.status in (500, 504))


def transient(exc: BaseException) -> bool:
    """Worth asking again: uncertain, or refused for now (429 Too Many Requests, 503)."""
    return uncertain(exc) or (isinstance(exc, ApiException) and exc.status in (429, 503))


def retry_after(exc: BaseException, default: float) -> float:
    """The wait the API server asked for (`Retry-After`, or the Status body's
    `retryAfterSeconds`), else `default`."""
    if isinstance(exc, ApiException):
        header = exc.headers.get("Retry-After") if exc.headers else None
        try:
            if header:
                return float(header)
            details = json.loads(exc.body or "{}").get("details") or {}
            if details.get("retryAfterSeconds"):
                return float(details["retryAfterSeconds"])
        except (TypeError, ValueError):
            pass
    return default


class Gone(Exception):
    """The resourceVersion we wanted to watch from was compacted away: list again."""


@dataclass(frozen=True)
class Synced:
    kind: str
    items: list[dict[str, Any]]
    resource_version: str


@dataclass(frozen=True)
class Changed:
    kind: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]


def load_client(
    kubeconfig: str | None, context: str | None, *, user_agent: str
) -> tuple[client.ApiClient, str]:
    """An API client and the namespace to work in: from `kubeconfig` (its context's namespace)
    when given, else the in-cluster service account, else ~/.kube/config. Blocking."""
    cfg = client.Configuration()
    namespace = ""
    if kubeconfig is None and SA_NAMESPACE.exists():
        config.load_incluster_config(client_configuration=cfg)
        namespace = SA_NAMESPACE.read_text().strip()
    else:
        config.load_kube_config(config_file=kubeconfig, context=context,
                                client_configuration=cfg)
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
            active = next((c for c in contexts if c["name"] == context), active)
        namespace = ((active or {}).get("context") or {}).get("namespace", "")
    api = client.ApiClient(cfg)
    api.user_agent = user_agent
    return api, namespace or "default"


def read_json(resp: Any) -> Any:
    data = resp.data if hasattr(resp, "data") else resp.read()
    return json.loads(data) if data else {}


def api_reason(exc: ApiException) -> str:
    """The API's own message (from its Status body) rather than the client's dump."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or exc.reason or exc)


class KubeApi:
    """The calls the node backend makes, awaitable, bodies parsed. ApiException propagates
    (its `status` is the API's HTTP status), except where a method says otherwise."""

    def __init__(self, api: client.ApiClient, namespace: str, *,
                 request_timeout_s: float) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.timeout = request_timeout_s

    @property
    def host(self) -> str:
        return str(self.api.configuration.host)

    async def _call(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
                    **kwargs: Any) -> Any:
        """One request; no answer (timeout, broken connection) raises `ApiUnreachable`."""
        def call() -> Any:
            try:
                return read_json(fn(*args, _preload_content=False,
                                    _request_timeout=timeout_s or self.timeout, **kwargs))
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise ApiUnreachable(f"{type(exc).__name__}: {exc}") from None

        return await asyncio.to_thread(call)

    async def create_pod(self, manifest: dict[str, Any], *,
                         timeout_s: float | None = None) -> None:
        await self._call(self.core.create_namespaced_pod, self.namespace, manifest,
                         timeout_s=timeout_s)

    async def bind(self, pod: str, node: str, *, timeout_s: float | None = None) -> None:
        """POST pods/{pod}/binding. The reply is a `Status` that the generated client cannot
        deserialize as the `V1Binding` it declares, hence the raw read."""
        body = {"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": pod, "namespace": self.namespace},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        await self._call(self.core.create_namespaced_pod_binding, pod, self.namespace, body,
                         timeout_s=timeout_s)

    async def read_pod(self, name: str) -> dict[str, Any] | None:
        """The Pod as the server has it now, or None when there is none."""
        try:
            return await self._call(self.core.read_namespaced_pod, name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def remove_pod(self, name: str, *, grace_s: int) -> bool:
        """DELETE the pod: True when accepted, False when it was already gone; any other
        failure raises (ApiException, ApiUnreachable), for the caller to retry."""
        try:
            await self._call(self.core.delete_namespaced_pod, name, self.namespace,
                             grace_period_seconds=grace_s)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def delete_pod(self, name: str, *, grace_s: int) -> bool:
        """False when the pod was already gone; other errors are logged, not raised: a
        delete is retried by the next watch event or sweep anyway."""
        try:
            return await self.remove_pod(name, grace_s=grace_s)
        except ApiException as exc:
            log.warning("kubernetes: deleting pod %s: %s", name, api_reason(exc))
        except ApiUnreachable as exc:
            log.warning("kubernetes: deleting pod %s: %s", name, exc)
        return True

    async def log_tail(self, name: str, container: str, *, lines: int = 50) -> str:
        """The end of a pod's output, or "" when there is none (never started, node gone)."""

        def read() -> str:
            resp = self.core.read_namespaced_pod_log(
                name, self.namespace, container=container, tail_lines=lines,
                _preload_content=False, _request_timeout=self.timeout)
            return bytes(resp.data).decode(errors="replace")

        try:
            return (await asyncio.to_thread(read))[-2000:]
        except Exception as exc:  # the tail is a courtesy in an error report: never fatal
            log.debug("log tail of %s unavailable: %s", name, exc)
            return ""

    def close(self) -> None:
        self.api.close()


class ListWatch:
    """List, then watch from the list's resourceVersion, forever, in one daemon thread.

    `deliver` is called from that thread with `Synced` and `Changed`; it must be thread-safe
    (the backend passes `loop.call_soon_threadsafe` onto a queue). A daemon thread, not
    `asyncio.to_thread`: a watch blocks for minutes, and the default executor is joined at
    interpreter exit.
    """

    def __init__(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        deliver: Callable[[Synced | Changed], None],
        *,
        watch_timeout_s: float = 300.0,
        request_timeout_s: float = 10.0,
        **list_kwargs: Any,
    ) -> None:
        self.kind = kind
        self.list_fn = list_fn
        self.deliver = deliver
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self.list_kwargs = list_kwargs
        self.relists = 0  # lists after the first: 410 Gone and errors
        self.last_error = ""
        self._stop = threading.Event()
        self._resp: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Idempotent; unblocks a watch stuck in a read by shutting its socket down."""
        self._stop.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()  # urllib3 >= 2.3: safe from another thread
            except (AttributeError, OSError):
                try:
                    resp.close()
                except OSError:
                    log.debug("list+watch %s: closing the stream failed", self.kind,
                              exc_info=True)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        backoff = 0.2
        first = True
        while not self._stop.is_set():
            try:
                if not first:
                    self.relists += 1
                first = False
                rv = self._list()
                backoff = 0.2
                while not self._stop.is_set():
                    rv = self._watch(rv)
            except Gone as exc:
                log.info("watch %s: %s; listing again", self.kind, exc)
            except Exception as exc:
                if self._stop.is_set():
                    return
                self.last_error = str(exc) if not isinstance(exc, ApiException) else (
                    f"{exc.status}: {api_reason(exc)}")
                log.warning("watch %s: %s; retrying in %.1fs", self.kind, self.last_error,
                            backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _list(self) -> str:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs = dict(self.list_kwargs, limit=LIST_PAGE)
            if token:
                kwargs["_continue"] = token
            try:
                body = read_json(self.list_fn(**kwargs, _preload_content=False,
                                              _request_timeout=self.request_timeout_s))
            except ApiException as exc:
                if exc.status == 410:  # the continue token expired mid-pagination
                    raise Gone(f"list continuation expired: {api_reason(exc)}") from None
                raise
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                rv = str(meta.get("resourceVersion", ""))
                self.deliver(Synced(self.kind, items, rv))
                return rv

    def _watch(self, rv: str) -> str:
        """One watch request; returns the newest resourceVersion when the server ends it."""
        try:
            resp = self.list_fn(
                **self.list_kwargs,
                watch=True,
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=max(1, int(self.watch_timeout_s)),
                _preload_content=False,
                _request_timeout=(self.request_timeout_s, self.watch_timeout_s + 30),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise Gone(api_reason(exc)) from None
            raise
        self._resp = resp
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", "resourceVersion too old"))
                    raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = str(new_rv)
                if kind != "BOOKMARK":
                    self.deliver(Changed(self.kind, kind, obj))
        finally:
            self._resp = None
            resp.close()
            resp.release_conn()
        return rv


def threadsafe_put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> Callable[
        [Any], None]:
    """A `deliver` for ListWatch: enqueue on the loop's thread; dropped once the loop closed."""

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # loop closed: we are shutting down
            pass

    return put
