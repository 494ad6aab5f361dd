"""Revisions and traffic splits, as pure decisions (Knative's Configuration → Revision →
Route, KServe's canaryTrafficPercent): whether a deploy makes a new revision, what split a
`--traffic` / `--canary-percent` / `--tag` / rollback asks for and whether it is valid,
which revisions are reachable, which old ones retire, and — per request, in the activator —
which revision serves it. No I/O and no clock: the registry and the activator call these
with what they hold, so every rule is testable on its own.

A revision is scaled, placed and routed as a service named `NAME-0000N`; only the service
(what clients call) knows the split. That keeps `scale`, `schedule` and `route` unchanged:
each revision has its own KPA and scales from zero on its own, as in Knative.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable, Mapping

import msgspec

from kernel.errors import ErrorCode, RemoteError
from kernel.messages import ScalingSpec, ServiceSpec, TrafficTarget

# kn's `@latest`: the newest revision (and a target that follows the next one).
LATEST = "@latest"
_REVISION_RE = re.compile(r"^(?P<service>[a-z0-9][-a-z0-9]*)-(?P<n>\d{5})$")
_TAG_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# What a pod template is not: knobs of the autoscaler and of the registry. A change of
# anything else (command, image, env, resources, storage URI, …) is a new revision.
_NOT_TEMPLATE = {
    "scaling": ScalingSpec(), "generation": 0, "prefetch": 0, "revision_of": "",
    "routing_state": "active", "revisions": [], "latest_revision": "", "traffic": [],
    "promoted": [],
}


def revision_name(service: str, number: int) -> str:
    """Knative's `NAME-0000N` (five digits, as its generated revision names)."""
    return f"{service}-{number:05d}"


def revision_number(name: str) -> int:
    """The N of `NAME-0000N` (0: not a revision name); the OIP model version of it."""
    m = _REVISION_RE.match(name)
    return int(m["n"]) if m else 0


def parent_of(name: str) -> str:
    """The service a revision name belongs to ("" for a name that is not one)."""
    m = _REVISION_RE.match(name)
    return m["service"] if m else ""


def template(spec: ServiceSpec) -> ServiceSpec:
    """The pod template of a spec: what a revision freezes."""
    return msgspec.structs.replace(spec, name="", **_NOT_TEMPLATE)


def creates_revision(old: ServiceSpec | None, new: ServiceSpec) -> bool:
    """A deploy makes a revision when the template changed; scaling-only changes do not
    (they apply to every revision, as the autoscaler's knobs of the service)."""
    if old is None or not old.revisions:
        return True
    return template(old) != template(new)


def revision_spec(service: ServiceSpec, number: int) -> ServiceSpec:
    """The immutable spec of revision `number` of `service`. Its pods still answer to the
    service's model name (MODEL_NAME), since clients call the service, not the revision,
    and keep its weights' identity (`model_id`), so every revision finds the nodes that
    cache the service's model."""
    env = {"MODEL_NAME": service.name, **service.env}
    return msgspec.structs.replace(
        template(service), name=revision_name(service.name, number), env=env,
        scaling=service.scaling, generation=number, revision_of=service.name,
        model=service.model_id if not service.storage_uri else service.model)


def effective(revision: ServiceSpec, service: ServiceSpec) -> ServiceSpec:
    """A revision as `scale` runs it: the service's current scaling knobs (scaling-only
    changes made no revision, so they reach every one), and `reserve` when no target names
    it (Knative: an unrouted revision scales to zero whatever its min-scale)."""
    return msgspec.structs.replace(
        revision, scaling=service.scaling,
        routing_state="active" if revision.name in reachable(service.traffic) else "reserve")


def reachable(traffic: Iterable[TrafficTarget]) -> set[str]:
    return {t.revision for t in traffic if t.percent > 0 or t.tag}


def percents(traffic: Iterable[TrafficTarget]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in traffic:
        out[t.revision] = out.get(t.revision, 0) + t.percent
    return out


def tags_of(traffic: Iterable[TrafficTarget]) -> dict[str, str]:
    """tag → revision."""
    return {t.tag: t.revision for t in traffic if t.tag}


# ---- what a user asks for ----------------------------------------------------------------


def parse_assignments(items: Iterable[str], *, what: str) -> list[tuple[str, str]]:
    """kn's `REV=VALUE` flags, in order; the CLI and the operator share the syntax."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise RemoteError(ErrorCode.INVALID, f"{what} {item!r}: expected REVISION=VALUE")
        out.append((key.strip(), value.strip()))
    return out


def parse_traffic(items: Iterable[str]) -> list[TrafficTarget]:
    out = []
    for rev, pct in parse_assignments(items, what="--traffic"):
        try:
            percent = int(pct.rstrip("%"))
        except ValueError:
            raise RemoteError(ErrorCode.INVALID,
                              f"--traffic {rev}={pct}: percent must be an integer") from None
        out.append(TrafficTarget(revision=rev, percent=percent))
    return out


def _resolve(name: str, service: str, revisions: Collection[str], latest: str,
             tags: Mapping[str, str]) -> tuple[str, bool]:
    """A name a user wrote — a revision, `@latest`, a revision number, or a tag — as
    (revision, follows-latest); unknown → NOT_FOUND."""
    if name == LATEST:
        return latest, True
    if name.isdigit() and revision_name(service, int(name)) in revisions:
        return revision_name(service, int(name)), False
    if name in revisions:
        return name, False
    if name in tags:
        return tags[name], False
    raise RemoteError(ErrorCode.NOT_FOUND, f"service {service!r} has no revision or tag "
                                           f"{name!r} (revisions: {', '.join(revisions)})")


def split(service: str, requested: Iterable[TrafficTarget], *, revisions: Collection[str],
          latest: str, current: Iterable[TrafficTarget]) -> list[TrafficTarget]:
    """A `--traffic` request as a traffic block: every revision known, each named once,
    percents 0..100 summing to 100. Tags of the current block stay on their revisions."""
    current = list(current)
    old_tags = tags_of(current)
    targets: dict[str, TrafficTarget] = {}
    for t in requested:
        rev, follows = _resolve(t.revision, service, revisions, latest, old_tags)
        if rev in targets:
            raise RemoteError(ErrorCode.INVALID, f"revision {rev} named twice in the traffic")
        if not 0 <= t.percent <= 100:
            raise RemoteError(ErrorCode.INVALID,
                              f"traffic of {rev}: {t.percent}% is not between 0 and 100")
        targets[rev] = TrafficTarget(revision=rev, percent=t.percent, latest=follows)
    total = sum(t.percent for t in targets.values())
    if total != 100:
        raise RemoteError(ErrorCode.INVALID, f"traffic percents sum to {total}, not 100")
    return _with_tags(list(targets.values()), {r: [g for g, x in old_tags.items() if x == r]
                                              for r in revisions})


def canary(service: str, percent: int, *, revisions: Collection[str], latest: str,
           current: Iterable[TrafficTarget]) -> list[TrafficTarget]:
    """KServe's canaryTrafficPercent: the newest revision gets `percent`, the stable one —
    the revision other than it with the largest share now, else the one before it — the
    rest. A service with one revision has no canary: it gets everything."""
    if not 0 <= percent <= 100:
        raise RemoteError(ErrorCode.INVALID, f"canary percent {percent} is not 0..100")
    current = list(current)
    shares = {r: p for r, p in percents(current).items() if r != latest and r in revisions}
    stable = max(shares, key=lambda r: (shares[r], revision_number(r)), default="")
    if not stable or not shares[stable]:
        older = [r for r in revisions if revision_number(r) < revision_number(latest)]
        stable = older[-1] if older else ""
    if not stable:
        percent = 100
    wanted = [TrafficTarget(revision=latest, percent=percent)]
    if stable:
        wanted.append(TrafficTarget(revision=stable, percent=100 - percent))
    return split(service, wanted, revisions=revisions, latest=latest, current=current)


def retag(service: str, traffic: Iterable[TrafficTarget], tags: Mapping[str, str], *,
          revisions: Collection[str], latest: str) -> list[TrafficTarget]:
    """`--tag REV=TAG`: a tag names one revision (a second use of it is a CONFLICT), is a
    DNS label, and is not a revision's name. A revision may carry several tags."""
    traffic = list(traffic)
    by_rev: dict[str, list[str]] = {}
    for tag, rev in tags_of(traffic).items():
        by_rev.setdefault(rev, []).append(tag)
    for name, tag in tags.items():
        rev, _ = _resolve(name, service, revisions, latest, {})
        if not _TAG_RE.match(tag):
            raise RemoteError(ErrorCode.INVALID, f"tag {tag!r}: must be a DNS label")
        if tag in revisions or tag.isdigit() or tag == LATEST:
            raise RemoteError(ErrorCode.CONFLICT, f"tag {tag!r} collides with a revision")
        owner = next((r for r, ts in by_rev.items() if tag in ts), rev)
        if owner != rev:
            raise RemoteError(ErrorCode.CONFLICT, f"tag {tag!r} already names {owner}")
        if tag not in by_rev.setdefault(rev, []):
            by_rev[rev].append(tag)
    return _with_tags([t for t in traffic if t.percent or not t.tag], by_rev)


def _with_tags(targets: list[TrafficTarget], by_rev: Mapping[str, list[str]]
               ) -> list[TrafficTarget]:
    """Knative's block shape: a revision's first tag on its weighted target, each other tag
    as a 0% target of its own."""
    out = [msgspec.structs.replace(t, tag="") for t in targets if t.percent or t.latest]
    for rev, rev_tags in by_rev.items():
        for tag in rev_tags:
            i = next((i for i, t in enumerate(out) if t.revision == rev and not t.tag), None)
            if i is None:
                out.append(TrafficTarget(revision=rev, tag=tag))
            else:
                out[i] = msgspec.structs.replace(out[i], tag=tag)
    return out


def follow_latest(traffic: Iterable[TrafficTarget], latest: str) -> list[TrafficTarget]:
    """A deploy with no traffic flags keeps the block (kn's habit): its `latest` targets
    move to the new revision, their tags staying with the old one."""
    out: list[TrafficTarget] = []
    for t in traffic:
        if t.latest and t.revision != latest:
            out.append(TrafficTarget(revision=latest, percent=t.percent, latest=True))
            if t.tag:
                out.append(TrafficTarget(revision=t.revision, tag=t.tag))
        else:
            out.append(t)
    return out or [TrafficTarget(revision=latest, percent=100, latest=True)]


def promote(promoted: list[str], traffic: Iterable[TrafficTarget], *, keep: int) -> list[str]:
    """Remember the revision that now takes all traffic (what `rollback` returns to)."""
    full = [r for r, p in percents(traffic).items() if p == 100]
    if not full or (promoted and promoted[-1] == full[0]):
        return promoted
    return [*promoted, full[0]][-keep:]


def rollback(service: str, traffic: Iterable[TrafficTarget], promoted: Iterable[str],
             revisions: Collection[str]) -> list[TrafficTarget]:
    """All traffic back to the newest revision that once took it all and is older than
    the newest revision taking traffic now; pinned (no longer following `@latest`), as a
    rollback must survive the next deploy. None such → CONFLICT."""
    traffic = list(traffic)
    serving = [r for r, p in percents(traffic).items() if p > 0]
    newest = max((revision_number(r) for r in serving), default=0)
    back = [r for r in promoted if r in revisions and revision_number(r) < newest]
    if not back:
        raise RemoteError(ErrorCode.CONFLICT, f"service {service!r} has no earlier revision "
                                              "that served all its traffic to roll back to")
    target = back[-1]
    by_rev: dict[str, list[str]] = {}
    for tag, rev in tags_of(traffic).items():
        by_rev.setdefault(rev, []).append(tag)
    return _with_tags([TrafficTarget(revision=target, percent=100)], by_rev)


def retire(revisions: list[str], traffic: Iterable[TrafficTarget], *, latest: str,
           keep: int) -> list[str]:
    """The bounded history: the oldest revisions beyond `keep` that no target names (no
    percent, no tag) and that are not the newest, to delete. A routed revision is never
    retired, so the history may exceed `keep` while a split holds more."""
    routed = reachable(traffic) | {latest}
    extra = len(revisions) - keep
    out = []
    for rev in revisions:
        if extra <= 0:
            break
        if rev not in routed:
            out.append(rev)
            extra -= 1
    return out


# ---- per request (the activator) ---------------------------------------------------------


def sticky_draw(key: str) -> float:
    """A request id as a draw in [0, 1): the same id reaches the same revision while the
    split holds (a retried request does not switch revision halfway through a session)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def pick(traffic: Iterable[TrafficTarget], draw: float, *,
         unavailable: Collection[str] = ()) -> str | None:
    """The revision for one request, by weight, from a draw in [0, 1) (random per request,
    or `sticky_draw`): a weighted random choice, never round robin. Revisions in
    `unavailable` (their pods fail to start) get no traffic: their share falls to the
    others in proportion. None when no weighted revision is left."""
    shares = [(r, p) for r, p in percents(traffic).items() if p > 0 and r not in unavailable]
    total = sum(p for _, p in shares)
    if not total:
        return None
    point = draw * total
    for rev, p in shares:
        point -= p
        if point < 0:
            return rev
    return shares[-1][0]  # draw * total rounding up to total
