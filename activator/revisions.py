"""Which revision serves one request to a service with revisions: the one its tag names
(`X-Fnplane-Tag`), the one its versioned OIP path names (the version is the revision
number, once a service has several), or a weighted draw over the split — random per
request, or by the hash of its `x-request-id` so a retried request stays on its
revision. From there the request takes the revision's own path (buffer, scale from
zero, direct mode) as any service's.

A revision whose pods fail to start (`route` says so: no endpoint and an error) gets no
share: the draw falls to the others, counted and logged once per revision, not silent.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from activator.services import ServiceTable
from kernel import revisions as rv
from kernel.messages import ServiceSpec
from kernel.metrics import REVISION, SERVICE, Metrics

log = logging.getLogger(__name__)

TAG_HEADERS = ("x-fnplane-tag", "fnplane-tag")  # HTTP, and the NATS ingress' spelling
REQUEST_ID = "x-request-id"


def header(headers: Mapping[str, str], *names: str) -> str:
    wanted = set(names)
    return next((v for k, v in headers.items() if k.lower() in wanted), "")


@dataclass(frozen=True)
class Choice:
    """The revision chosen, or why none (`status`, `message`: the answer to give)."""

    revision: str = ""
    version: str | None = None  # the model version to send on a versioned path
    drawn: bool = False  # by the split's draw (another revision may serve it instead)
    status: int = 0
    message: str = ""


class RevisionPicker:
    def __init__(self, table: ServiceTable, metrics: Metrics, *, log_id: str,
                 draw: Callable[[], float] = random.random) -> None:
        self.table = table
        self.id = log_id
        self.draw = draw  # injected so a test can show the draw, not the order, decides
        self._fallback = metrics.counter("fnplane.route.revision.fallback")
        self._picked = metrics.counter("fnplane.route.revision.requests")
        self._reported: set[str] = set()

    def choose(self, service: ServiceSpec, headers: Mapping[str, str],
               version: str | None) -> Choice:
        tag = header(headers, *TAG_HEADERS)
        if tag:
            rev = rv.tags_of(service.traffic).get(tag)
            if rev is None:
                return Choice(status=404, message=f"Model {service.name} has no tag {tag}.")
            return self._chosen(service, rev, version, via="tag")
        # With several revisions a version names one by its number (and the service's own
        # model version still means the split); with one, the service answers to its model
        # version only, as it always did.
        if version is not None and version.isdigit() and len(service.revisions) > 1:
            rev = rv.revision_name(service.name, int(version))
            if rev in service.revisions:
                return self._chosen(service, rev, None, via="version", versioned=True)
        if version is not None and version != service.model_version:
            return Choice(status=404, message=f"Model with name {service.name} and version "
                                              f"{version} does not exist.")
        failed = self._failed(service)
        key = header(headers, REQUEST_ID)
        rev = rv.pick(service.traffic, rv.sticky_draw(key) if key else self.draw(),
                      unavailable=failed)
        if rev is None:
            why = "; ".join(f"{r}: {self._error(r)}" for r in sorted(failed)) or "no traffic"
            return Choice(status=503, message=f"no revision of {service.name} can serve: {why}")
        return self._chosen(service, rev, version, via="split")

    def _chosen(self, service: ServiceSpec, rev: str, version: str | None, *, via: str,
                versioned: bool = False) -> Choice:
        svc = self.table.get(rev)
        if versioned and svc is not None:
            version = svc.spec.model_version  # the pod's own version, on its versioned path
        self._picked.add(1, {SERVICE: service.name, REVISION: rev, "via": via})
        return Choice(revision=rev, version=version, drawn=via == "split")

    def _failed(self, service: ServiceSpec) -> set[str]:
        """Weighted revisions whose pods fail to start; each reported the first time."""
        out = set()
        for t in service.traffic:
            svc = self.table.get(t.revision)
            if t.percent and svc is not None and svc.failed:
                out.add(t.revision)
                self._fallback.add(1, {SERVICE: service.name, REVISION: t.revision})
                if t.revision not in self._reported:
                    self._reported.add(t.revision)
                    log.warning("%s: revision %s of %s fails to start (%s): its %d%% goes "
                                "to the other revisions", self.id, t.revision, service.name,
                                self._error(t.revision), t.percent)
            elif svc is not None and not svc.failed:
                self._reported.discard(t.revision)
        return out

    def _error(self, rev: str) -> str:
        svc = self.table.get(rev)
        return svc.endpoints.error if svc is not None and svc.endpoints is not None else ""
