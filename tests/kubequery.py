"""Label and field selectors and JSON merge patch, as the API server applies them, for the
fake API server of tests/fakekube.py (no real cluster can run here)."""

from __future__ import annotations

import copy
import re
from typing import Any

from kmock import KubernetesError

# Field selectors the real API accepts for these kinds (others are a 400 there too).
FIELDS = {"metadata.name", "metadata.namespace", "spec.nodeName", "status.phase",
          "spec.schedulerName", "spec.unschedulable"}


def bad_request(message: str) -> KubernetesError:
    return KubernetesError(status=400, reason="BadRequest", message=message, details={})


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = merge_patch(target.get(k), v)
    return target


_REQ = re.compile(
    r"^\s*(!?)([\w./-]+)\s*(?:(==|=|!=)\s*([\w./-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$"
)


def selector(params: Any) -> Any:
    """labelSelector and fieldSelector → a predicate over objects; 400 on what the real API
    would refuse."""
    labels = _split(str(params.get("labelSelector") or ""))
    fields = _split(str(params.get("fieldSelector") or ""))
    checks = []
    for text in labels:
        m = _REQ.match(text)
        if not m:
            raise bad_request(f"unable to parse requirement: {text!r}")
        neg, key, op, val, setop, vals = m.groups()
        checks.append(_label_check(neg, key, op, val, setop, vals))
    for text in fields:
        m = _REQ.match(text)
        if not m or m.group(1) or m.group(5) or m.group(3) is None:
            raise bad_request(f"invalid field selector: {text!r}")
        key, op, val = m.group(2), m.group(3), m.group(4)
        if key not in FIELDS:
            raise bad_request(f'"{key}" is not a known field selector')
        checks.append(_field_check(key, op, val))
    return lambda obj: all(c(obj) for c in checks)


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [s for s in out if s.strip()]


def _label_check(neg: str, key: str, op: str | None, val: str | None, setop: str | None,
                 vals: str | None) -> Any:
    def labels(o: dict[str, Any]) -> dict[str, str]:
        return o.get("metadata", {}).get("labels") or {}

    if setop:
        options = {v.strip() for v in (vals or "").split(",")}
        if setop == "in":
            return lambda o: labels(o).get(key) in options
        return lambda o: labels(o).get(key) not in options
    if op in ("=", "=="):
        return lambda o: labels(o).get(key) == val
    if op == "!=":
        return lambda o: labels(o).get(key) != val
    if neg:
        return lambda o: key not in labels(o)
    return lambda o: key in labels(o)


def _field_check(key: str, op: str, val: str) -> Any:
    def value(o: dict[str, Any]) -> str:
        cur: Any = o
        for part in key.split("."):
            cur = (cur or {}).get(part) if isinstance(cur, dict) else None
        return "" if cur is None else str(cur).lower() if isinstance(cur, bool) else str(cur)

    if op == "!=":
        return lambda o: value(o) != val
    return lambda o: value(o) == val


def format_selector(sel: dict[str, Any]) -> str:
    """A LabelSelector as the API server serializes it (a Scale's `status.selector`):
    requirements sorted by key, set values sorted."""
    reqs = [(k, f"{k}={v}") for k, v in (sel.get("matchLabels") or {}).items()]
    for e in sel.get("matchExpressions") or []:
        key, op, vals = e["key"], e["operator"], ",".join(sorted(e.get("values") or []))
        text = {"In": f"{key} in ({vals})", "NotIn": f"{key} notin ({vals})",
                "Exists": key, "DoesNotExist": f"!{key}"}[op]
        reqs.append((key, text))
    return ",".join(t for _, t in sorted(reqs))
