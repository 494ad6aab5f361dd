"""A fake Kubernetes API server on loopback for tests: no real cluster can run here.

It is kmock's `KubernetesEmulator` (Kopf's test server, from PyPI) — its aiohttp server,
request parsing, request log, discovery and `Status` error bodies — with the object store
replaced where the backend depends on the real API's behaviour, which kmock does not model:

- resourceVersion: one counter for all writes, as etcd's revision; lists carry it, watches
  resume after it, and a watch from a version older than the last compaction gets the real
  `ERROR` event with a `Status` of code 410 (reason `Expired`) — or, with
  `expired_as_http_status`, an HTTP 410 answer, which some servers and proxies give instead;
- label selectors (`=`, `==`, `!=`, `k`, `!k`, `in`, `notin`) and field selectors;
- `limit`/`continue` pagination, watch `timeoutSeconds` and `allowWatchBookmarks`;
- the `binding` subresource of pods (and the `bindings` collection): sets `spec.nodeName`
  once, 409 when already bound, answers a `Status` like the real one (which the generated
  client cannot deserialize into `V1Binding`);
- `status` subresources: writes to the main resource keep the stored status, writes to
  `/status` change only the status;
- graceful deletion of bound pods: `deletionTimestamp` first, gone when the kubelet deletes
  with `gracePeriodSeconds=0`; finalizers hold any object;
- merge patch (RFC 7386; strategic merge patch is treated as merge patch for core kinds and
  refused with 415 for custom resources, as the real server does), JSON patch, update with
  optimistic concurrency (409 Conflict on a stale resourceVersion);
- `pods/log`, served from what the kubelet emulator captured;
- Deployments (`spec.replicas` defaulted to 1) and their `scale` subresource: GET answers an
  `autoscaling/v1` Scale (`spec.replicas`, omitted at 0 as the real omitempty does;
  `status.replicas`; `status.selector`, the Deployment's selector serialized), PATCH and PUT
  of it change only the Deployment's `spec.replicas` (422 below 0). No controller acts on
  them: tests/replicaset.py is a minimal one.

- a watch with a selector sees an object leave it as `DELETED` and enter it as `ADDED` (the
  watch cache does this: a pod watched with `status.phase!=Failed` is DELETED when it fails);
- injected faults (`inject`): chosen verbs on chosen resources answer 429 with `Retry-After`,
  500/503/504 with the real `Status` bodies, or hang past the client's timeout — before the
  write or after it (`applied`: the write happened, the answer was lost, as when etcd commits
  and the API server's own deadline passes).

Every request stays in kmock's log; `calls(user_agent)` turns it into RBAC terms (verb,
API group, resource[/subresource], namespace) for the least-privilege tests.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
from kmock import KubernetesError, KubernetesScaffold

from tests.kubequery import format_selector, merge_patch, selector


@dataclass(frozen=True)
class Kind:
    kind: str
    namespaced: bool
    subresources: frozenset[str] = frozenset()


KINDS: dict[tuple[str, str, str], Kind] = {
    ("", "v1", "nodes"): Kind("Node", False, frozenset({"status"})),
    ("", "v1", "pods"): Kind("Pod", True, frozenset({"status", "binding", "log"})),
    ("", "v1", "bindings"): Kind("Binding", True),
    ("fnplane.dev", "v1alpha1", "fnservices"): Kind("FnService", True, frozenset({"status"})),
    ("apps", "v1", "deployments"): Kind("Deployment", True, frozenset({"status", "scale"})),
    # Leader election (partitions/leader.py): plain objects, updates locked optimistically.
    ("coordination.k8s.io", "v1", "leases"): Kind("Lease", True),
}
CUSTOM_GROUPS = {"fnplane.dev"}  # strategic merge patch is refused for these


@dataclass(frozen=True)
class ApiCall:
    """One request in RBAC terms."""

    verb: str
    group: str
    resource: str  # plural, or plural/subresource
    namespace: str  # "" for cluster-scoped or all-namespaces requests
    name: str


@dataclass
class Fault:
    """A failure the API server answers to the next `times` requests that match: `status`
    (429, 500, 503, 504) and/or `hang_s` (held that long first: a client with a shorter
    timeout gives up, not knowing whether the request was applied). `applied`: the request
    is carried out before the failure is answered."""

    verb: str  # create | delete | get | list | watch | patch | update
    resource: str  # pods, pods/binding, ...
    status: int = 0
    hang_s: float = 0.0
    applied: bool = False
    times: int = 1
    user_agent: str = ""  # only this client's requests ("" = anyone's)
    retry_after_s: int = 1
    hits: int = 0

    def matches(self, verb: str, resource: str, user_agent: str) -> bool:
        return (self.hits < self.times and verb == self.verb and resource == self.resource
                and user_agent.startswith(self.user_agent))


FAULT_STATUS = {  # what the real API server says with each code
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: etcdserver: request timed out"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    504: ("Timeout", "Timeout: request did not complete within requested timeout - "
                     "context deadline exceeded"),
}


def now_rfc3339(delta_s: float = 0.0) -> str:
    t = datetime.now(UTC) + timedelta(seconds=delta_s)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _err(status: int, reason: str, message: str, **details: Any) -> KubernetesError:
    return KubernetesError(status=status, reason=reason, message=message, details=details)


class FakeKubernetes(kmock.KubernetesEmulator):
    """The API server. Objects are plain dicts keyed by (group, plural, namespace, name)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.rv = 0
        self.history: list[tuple[int, tuple[str, str], str, dict[str, Any]]] = []
        self.compacted = 0  # watches from a version below this get 410 Gone
        self.expired_as_http_status = False
        self.logs: dict[tuple[str, str], str] = {}
        self._watchers: set[_Watcher] = set()
        self._paused = False
        self.faults: list[Fault] = []
        self._before: dict[int, dict[str, Any] | None] = {}  # rv → the object it replaced
        for (group, version, plural), kind in KINDS.items():
            self.resources[kmock.resource(group, version, plural)] = kmock.ResourceInfo(
                kind=kind.kind, namespaced=kind.namespaced,
                subresources=set(kind.subresources),
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            )

    # ---- direct access for tests (what an admin or a controller would do) -------------------

    def put(self, group: str, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object, bypassing HTTP (nodes, test fixtures)."""
        meta = obj.setdefault("metadata", {})
        key = (group, plural, meta.get("namespace", ""), meta["name"])
        _default(plural, obj)
        old = self.store.get(key)
        if old is None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now_rfc3339())
        return self._write(key, obj, "MODIFIED" if old else "ADDED")

    def get(self, group: str, plural: str, name: str, namespace: str = "") -> dict[str, Any]:
        return self.store.get((group, plural, namespace, name)) or {}

    def objects(self, group: str, plural: str) -> list[dict[str, Any]]:
        return [o for (g, p, _, _), o in self.store.items() if (g, p) == (group, plural)]

    def pause_watches(self) -> None:
        """Open watches stop receiving events (a network partition): only a list sees them."""
        self._paused = True

    def sever_watches(self, *, compact: bool = True) -> None:
        """Close every open watch; with `compact`, history is gone, so a client that
        resumes from its last resourceVersion must re-list (410 Gone)."""
        self._paused = False
        if compact:
            # Events up to now are gone: a watch from an older version cannot be resumed.
            self.compacted = self.rv
            self.history.clear()
            self._before.clear()
        for w in list(self._watchers):
            w.queue.put_nowait(None)

    def inject(self, verb: str, resource: str, **fault: Any) -> Fault:
        """Make the next matching request(s) fail (see `Fault`); returns it (`hits` counts)."""
        f = Fault(verb, resource, **fault)
        self.faults.append(f)
        return f

    def calls(self, user_agent: str) -> list[ApiCall]:
        out = []
        for req in self:
            ua = str(req.headers.get("User-Agent", ""))
            if not ua.startswith(user_agent) or req.resource is None:
                continue
            out.append(ApiCall(_verb(req), req.resource.group or "",
                               req.resource.plural + (f"/{req.subresource}"
                                                      if req.subresource else ""),
                               req.namespace or "", req.name or ""))
        return out

    # ---- HTTP -------------------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        key = (res.group, res.version, res.plural) if res is not None else None
        if key not in KINDS:
            # Discovery, /version, unknown paths: kmock's scaffold answers.
            return await KubernetesScaffold._handle(self, request)
        ua = str(request.headers.get("User-Agent", ""))
        what = res.plural + (f"/{request.subresource}" if request.subresource else "")
        fault = next((f for f in self.faults if f.matches(_verb(request), what, ua)), None)
        if fault is None:
            return await self._serve(request, KINDS[key])  # type: ignore[index]
        fault.hits += 1
        if fault.applied:
            try:
                await self._serve(request, KINDS[key])  # type: ignore[index]
            except KubernetesError:
                pass  # the failure below is what the client hears either way
        if fault.hang_s:
            await asyncio.sleep(fault.hang_s)
        status = fault.status or 504
        reason, message = FAULT_STATUS.get(status, ("InternalError", "injected failure"))
        details = {"retryAfterSeconds": fault.retry_after_s} if status == 429 else {}
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "details": details, "code": status}
        headers = {"Retry-After": str(fault.retry_after_s)} if status == 429 else {}
        return aiohttp.web.json_response(body, status=status, headers=headers)

    async def _serve(self, req: kmock.Request, kind: Kind) -> aiohttp.web.StreamResponse:
        assert req.resource is not None
        group, plural = req.resource.group or "", req.resource.plural or ""
        ns, name, sub = req.namespace or "", req.name or "", req.subresource or ""
        method = str(req.method.value).upper()
        if sub and sub not in kind.subresources:
            raise _err(404, "NotFound", f"the server could not find the requested resource "
                                        f"({plural}/{sub})")
        if plural == "bindings" and method == "POST":
            body = req.data or {}
            return self._bind(ns, (body.get("metadata") or {}).get("name", ""), body)
        if method == "GET" and not name:
            if req.params.get("watch") in ("true", "1"):
                return await self._watch(req, group, plural, ns)
            return _json(self._list(req, group, plural, ns))
        if method == "POST" and not name:
            return _json(self._create(group, plural, ns, kind, req.data), 201)
        if not name:
            raise _err(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        key = (group, plural, ns, name)
        if sub == "scale":
            ctype = str(req.headers.get("Content-Type", "")).split(";")[0]
            return _json(self._scale(key, method, ctype, req.data))
        if method == "GET" and sub == "log":
            return self._log(key, req)
        if method == "POST" and sub == "binding":
            return self._bind(ns, name, req.data or {})
        if method == "GET":
            return _json(self._existing(key, plural))
        if method == "PUT":
            return _json(self._update(key, kind, sub, req.data or {}))
        if method == "PATCH":
            ctype = str(req.headers.get("Content-Type", "")).split(";")[0]
            return _json(self._patch(key, kind, sub, ctype, req.data))
        if method == "DELETE":
            return _json(self._delete(key, plural, req))
        raise _err(405, "MethodNotAllowed", f"{method} is not supported")

    # ---- verbs ------------------------------------------------------------------------------

    def _existing(self, key: tuple[str, str, str, str], plural: str) -> dict[str, Any]:
        obj = self.store.get(key)
        if obj is None:
            raise _err(404, "NotFound", f'{plural} "{key[3]}" not found', name=key[3],
                       kind=plural)
        return obj

    def _list(self, req: kmock.Request, group: str, plural: str, ns: str) -> dict[str, Any]:
        match = selector(req.params)
        items = sorted((o for (g, p, n, _), o in self.store.items()
                        if (g, p) == (group, plural) and (not ns or n == ns) and match(o)),
                       key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        start = int(req.params.get("continue") or 0)
        limit = int(req.params.get("limit") or 0) or len(items) or 1
        page = items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        return {"apiVersion": "v1", "kind": "List", "metadata": meta, "items": page}

    def _create(self, group: str, plural: str, ns: str, kind: Kind,
                body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _err(400, "BadRequest", "the body of the request is not a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _err(422, "Invalid", "metadata.name: Required value")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if kind.namespaced:
            if meta.get("namespace", ns) != ns:
                raise _err(400, "BadRequest", "the namespace of the object does not match "
                                              "the namespace on the request")
            meta["namespace"] = ns
        key = (group, plural, ns if kind.namespaced else "", meta["name"])
        if key in self.store:
            raise _err(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists',
                       name=meta["name"], kind=plural)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        _default(plural, obj)
        if "status" in kind.subresources:
            obj.pop("status", None)
        if plural == "pods":
            containers = (obj.get("spec") or {}).get("containers") or []
            if not containers or not all(c.get("name") and c.get("image") for c in containers):
                raise _err(422, "Invalid", "spec.containers: every container needs a name "
                                           "and an image")
            obj["status"] = {"phase": "Pending", "qosClass": "Guaranteed"}
        return self._write(key, obj, "ADDED")

    def _update(self, key: tuple[str, str, str, str], kind: Kind, sub: str,
                body: dict[str, Any]) -> dict[str, Any]:
        old = self._existing(key, key[1])
        want = str((body.get("metadata") or {}).get("resourceVersion") or "")
        if want and want != old["metadata"]["resourceVersion"]:
            raise _err(409, "Conflict", f'Operation cannot be fulfilled on {key[1]} "{key[3]}":'
                                        " the object has been modified; please apply your "
                                        "changes to the latest version and try again")
        return self._replace(key, kind, sub, old, copy.deepcopy(body))

    def _patch(self, key: tuple[str, str, str, str], kind: Kind, sub: str, ctype: str,
               patch: Any) -> dict[str, Any]:
        old = self._existing(key, key[1])
        new = _apply_patch(old, ctype, patch, key[0])
        # As the real server: a resourceVersion in the patch is a precondition (409 when the
        # object changed since), which is how a read-modify-write patch locks optimistically.
        want = str(((patch if isinstance(patch, dict) else {}).get("metadata") or {}).get(
            "resourceVersion") or "")
        if want and want != old["metadata"]["resourceVersion"]:
            raise _err(409, "Conflict", f'Operation cannot be fulfilled on {key[1]} "{key[3]}":'
                                        " the object has been modified; please apply your "
                                        "changes to the latest version and try again")
        return self._replace(key, kind, sub, old, new)

    def _scale(self, key: tuple[str, str, str, str], method: str, ctype: str,
               body: Any) -> dict[str, Any]:
        """The scale subresource: a Scale view of the Deployment; writes set replicas."""
        dep = self._existing(key, key[1])
        view = scale_of(dep)
        if method == "GET":
            return view
        if method == "PUT":
            if not isinstance(body, dict):
                raise _err(400, "BadRequest", "the body of the request is not a JSON object")
            want = str((body.get("metadata") or {}).get("resourceVersion") or "")
            if want and want != dep["metadata"]["resourceVersion"]:
                raise _err(409, "Conflict", f'Operation cannot be fulfilled on deployments.apps '
                                            f'"{key[3]}": the object has been modified; please '
                                            "apply your changes to the latest version and try "
                                            "again")
            new = body
        elif method == "PATCH":
            new = _apply_patch(view, ctype, body, key[0])
        else:
            raise _err(405, "MethodNotAllowed", f"{method} is not supported on scale")
        replicas = (new.get("spec") or {}).get("replicas", 0)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise _err(422, "Invalid", f'Scale.autoscaling "{key[3]}" is invalid: spec.replicas:'
                                       f" Invalid value: {replicas!r}: must be greater than or "
                                       "equal to 0")
        if replicas != dep["spec"].get("replicas"):
            dep = copy.deepcopy(dep)
            dep["spec"]["replicas"] = replicas
            dep["metadata"]["generation"] = dep["metadata"].get("generation", 1) + 1
            dep = self._write(key, dep, "MODIFIED")
        return scale_of(dep)

    def _replace(self, key: tuple[str, str, str, str], kind: Kind, sub: str,
                 old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        if sub == "status":
            obj = copy.deepcopy(old)
            obj["status"] = new.get("status") or {}
        else:
            obj = new
            if "status" in kind.subresources:
                obj["status"] = copy.deepcopy(old.get("status", {}))
            if obj.get("spec") != old.get("spec"):
                obj.setdefault("metadata", {})["generation"] = old["metadata"].get(
                    "generation", 1) + 1
        meta = obj.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._write(key, obj, "DELETED")
        return self._write(key, obj, "MODIFIED")

    def _delete(self, key: tuple[str, str, str, str], plural: str,
                req: kmock.Request) -> dict[str, Any]:
        obj = copy.deepcopy(self._existing(key, plural))
        body = req.data if isinstance(req.data, dict) else {}
        grace = body.get("gracePeriodSeconds", req.params.get("gracePeriodSeconds"))
        meta = obj["metadata"]
        if plural == "pods" and (obj.get("spec") or {}).get("nodeName") and grace not in (0, "0"):
            # A bound pod waits for its kubelet to stop the containers, then to delete it.
            if not meta.get("deletionTimestamp"):
                seconds = int(grace if grace is not None else
                              obj["spec"].get("terminationGracePeriodSeconds", 30))
                meta["deletionTimestamp"] = now_rfc3339(seconds)
                meta["deletionGracePeriodSeconds"] = seconds
                return self._write(key, obj, "MODIFIED")
            return obj
        if meta.get("finalizers"):
            meta.setdefault("deletionTimestamp", now_rfc3339())
            return self._write(key, obj, "MODIFIED")
        return self._write(key, obj, "DELETED")

    def _bind(self, ns: str, name: str, body: dict[str, Any]) -> aiohttp.web.Response:
        meta, target = body.get("metadata") or {}, body.get("target") or {}
        if meta.get("name", name) != name or not name:
            raise _err(400, "BadRequest", "the name of the binding does not match the pod")
        if target.get("kind", "Node") != "Node" or not target.get("name"):
            raise _err(422, "Invalid", "target: a binding must name a Node")
        key = ("", "pods", ns, name)
        pod = copy.deepcopy(self._existing(key, "pods"))
        if pod["spec"].get("nodeName"):
            raise _err(409, "Conflict", f'Operation cannot be fulfilled on pods/binding "{name}":'
                                        f" pod {name} is already assigned to node "
                                        f'"{pod["spec"]["nodeName"]}"')
        if pod["metadata"].get("deletionTimestamp"):
            raise _err(409, "Conflict", f"pod {name} is being deleted, cannot be assigned to "
                                        "a host")
        pod["spec"]["nodeName"] = target["name"]
        status = pod.setdefault("status", {})
        status["conditions"] = [c for c in status.get("conditions") or []
                                if c.get("type") != "PodScheduled"] + [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}]
        self._write(key, pod, "MODIFIED")
        return _json({"kind": "Status", "apiVersion": "v1", "metadata": {},
                      "status": "Success", "code": 201}, 201)

    def _log(self, key: tuple[str, str, str, str], req: kmock.Request) -> aiohttp.web.Response:
        self._existing(key, "pods")
        text = self.logs.get((key[2], key[3]))
        if text is None:
            raise _err(400, "BadRequest", f'container "{req.params.get("container", "")}" in '
                                          f'pod "{key[3]}" is waiting to start')
        tail = int(req.params.get("tailLines") or 0)
        if tail:
            text = "".join(text.splitlines(keepends=True)[-tail:])
        return aiohttp.web.Response(text=text, content_type="text/plain")

    # ---- writes and watches ----------------------------------------------------------------

    def _write(self, key: tuple[str, str, str, str], obj: dict[str, Any],
               kind: str) -> dict[str, Any]:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        before = self.store.get(key)
        if kind == "DELETED":
            self.store.pop(key, None)
        else:
            self.store[key] = obj
        self.history.append((self.rv, key[:2], kind, obj))
        self._before[self.rv] = before
        if not self._paused:
            for w in list(self._watchers):
                if seen := w.sees(key, kind, before, obj):
                    w.queue.put_nowait({"type": seen, "object": obj})
        return obj

    async def _watch(self, req: kmock.Request, group: str, plural: str,
                     ns: str) -> aiohttp.web.StreamResponse:
        since = str(req.params.get("resourceVersion") or "")
        if since not in ("", "0") and int(since) < self.compacted:
            expired = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure", "reason": "Expired", "code": 410,
                       "message": f"too old resource version: {since} ({self.compacted})"}
            if self.expired_as_http_status:
                return _json(expired, 410)
            events = [{"type": "ERROR", "object": expired}]
            watcher = None
        else:
            watcher = _Watcher((group, plural), ns, selector(req.params))
            if since in ("", "0"):
                events = [{"type": "ADDED", "object": o} for k, o in self.store.items()
                          if watcher.wants(k, o)]
            else:
                events = [{"type": seen, "object": o} for rv, k, t, o in self.history
                          if rv > int(since) and (seen := watcher.sees(
                              (*k, o["metadata"].get("namespace", ""), ""), t,
                              self._before.get(rv), o))]
            self._watchers.add(watcher)
        assert req._raw_request is not None
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(req._raw_request)
        try:
            for ev in events:
                await resp.write(json.dumps(ev).encode() + b"\n")
            if watcher is not None:
                timeout = float(req.params.get("timeoutSeconds") or 1800)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                severed = False
                while (left := deadline - loop.time()) > 0:
                    try:
                        ev = await asyncio.wait_for(watcher.queue.get(), left)
                    except TimeoutError:
                        break
                    if ev is None:
                        severed = True
                        break
                    await resp.write(json.dumps(ev).encode() + b"\n")
                # As the real server, a watch that ends on its timeout says how far it got.
                if (not severed and not self._paused
                        and req.params.get("allowWatchBookmarks") == "true"):
                    mark = {"kind": KINDS_BY_PLURAL[plural].kind,
                            "metadata": {"resourceVersion": str(self.rv)}}
                    await resp.write(json.dumps({"type": "BOOKMARK", "object": mark}).encode()
                                     + b"\n")
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            if watcher is not None:
                self._watchers.discard(watcher)
        return resp


KINDS_BY_PLURAL = {plural: kind for (_, _, plural), kind in KINDS.items()}


def _default(plural: str, obj: dict[str, Any]) -> None:
    """The API server's defaulting, where tests depend on it."""
    if plural == "deployments":
        obj.setdefault("spec", {}).setdefault("replicas", 1)


def _apply_patch(old: dict[str, Any], ctype: str, patch: Any, group: str) -> dict[str, Any]:
    if ctype == "application/json-patch+json":
        try:
            return jsonpatch.apply_patch(old, patch)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise _err(422, "Invalid", f"json patch: {exc}") from None
    if ctype == "application/merge-patch+json" or (
            ctype == "application/strategic-merge-patch+json" and group not in CUSTOM_GROUPS):
        return merge_patch(copy.deepcopy(old), patch)
    raise _err(415, "UnsupportedMediaType",
               f"the body of the request was in an unknown format - accepted media "
               f"types include: application/json-patch+json, "
               f"application/merge-patch+json (got {ctype})")


def scale_of(dep: dict[str, Any]) -> dict[str, Any]:
    """A Deployment as its scale subresource shows it (autoscaling/v1 Scale)."""
    meta = dep["metadata"]
    replicas = dep["spec"].get("replicas", 1)
    return {
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                          "creationTimestamp") if k in meta},
        "spec": {"replicas": replicas} if replicas else {},
        "status": {"replicas": (dep.get("status") or {}).get("replicas", 0),
                   "selector": format_selector(dep["spec"].get("selector") or {})},
    }


class _Watcher:
    def __init__(self, kind: tuple[str, str], ns: str, match: Any) -> None:
        self.kind, self.ns, self.match = kind, ns, match
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def wants(self, key: tuple[str, ...], obj: dict[str, Any]) -> bool:
        return (key[:2] == self.kind and (not self.ns or key[2] == self.ns)
                and self.match(obj))

    def sees(self, key: tuple[str, ...], kind: str, before: dict[str, Any] | None,
             obj: dict[str, Any]) -> str:
        """The event this watch gets for a write ("" for none): as the watch cache, an
        object that leaves the selector is DELETED for it and one that enters is ADDED."""
        was = before is not None and self.wants(key, before)
        now = self.wants(key, obj)
        if kind == "DELETED":
            return kind if was or now else ""
        if now:
            return kind if was or kind == "ADDED" or before is None else "ADDED"
        return "DELETED" if was else ""


def _json(body: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.json_response(body, status=status)


def _verb(req: kmock.Request) -> str:
    method = str(req.method.value).upper()
    if method == "GET":
        if req.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if req.name else "list"
    if method == "DELETE":
        return "delete" if req.name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())
