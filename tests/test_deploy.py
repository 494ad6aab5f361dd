"""deploy/ checked offline, as a cluster admin would review it before applying — no cluster
can run here: `kubectl kustomize` builds the base and the dev overlay, every built object
validates against the Kubernetes schemas (kubernetes-validate, strict), the FnService CRD's
schema (with its CEL rules) accepts examples/'s FnService and refuses bad ones the same way
`fnplane deploy -f` does, and RBAC is least privilege."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import nats
import pytest
import redis.asyncio as aioredis
import yaml
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from controlplane.kubesecrets import (
    CREDS_KEY,
    NATS_AUTH_KEY,
    NATS_AUTH_SECRET,
    REDIS_AUTH_SECRET,
    creds_secret,
    render,
    secrets,
)
from controlplane.servers import nats_server_binary, redis_server_binary
from controlplane.specfile import spec_from_manifest
from kernel.bus import Bus
from kernel.identity import KINDS, Credentials, Login, login, permissions, redis_acl_file
from kernel.messages import SpecError
from kernel.procs import ManagedProcess, free_port
from kernel.store import Store
from tests.deployutil import allowed, build, cel, crd, validate_custom_resource
from tests.fakekube import ApiCall
from tests.stackutil import REPO

SAMPLE = yaml.safe_load((REPO / "examples/sample/fnservice.yaml").read_text())
COMPONENTS = ("coordinator", "scale", "schedule", "route", "activator", "node", "operator")
WORKLOADS = ("Deployment", "StatefulSet")


@pytest.mark.parametrize("path", ["base", "overlays/dev"])
def test_kustomization_builds_and_every_object_validates_strictly(path: str) -> None:
    docs = build(path)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "CustomResourceDefinition", "ServiceAccount", "Role", "ClusterRole",
            "Deployment", "StatefulSet", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, "1.37", strict=True)
        except Exception as exc:  # ValidationError, SchemaNotFoundError: both are failures
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert all(d["metadata"].get("namespace") in (None, "fnplane") for d in docs)


def _pods(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in WORKLOADS]


@pytest.mark.parametrize("path", ["base", "overlays/dev"])
def test_workloads_are_hardened_and_sized(path: str) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities,
    requests and limits, readiness and liveness probes: on every container."""
    for name, pod in _pods(build(path)):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), name
            assert "readinessProbe" in c and "livenessProbe" in c, name


def test_one_service_account_per_component_and_tokens_only_where_the_api_is_used() -> None:
    docs = build("base")
    pods = dict(_pods(docs))
    for comp in COMPONENTS:
        pod = pods[f"fnplane-{comp}"]
        assert pod["serviceAccountName"] == f"fnplane-{comp}"
        assert pod["containers"][0]["args"] == [comp]
        assert pod["automountServiceAccountToken"] is (
            comp in ("coordinator", "node", "operator")), comp
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "fnplane-activator"}
    assert pdb["spec"]["minAvailable"] == 1


def test_no_role_grants_a_wildcard_and_only_the_node_backend_creates_pods() -> None:
    docs = build("base")
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), (role["metadata"]["name"], rule)
    for comp in COMPONENTS:
        for resource in ("pods", "pods/binding", "bindings"):
            call = ApiCall("create", "", resource, "fnplane", "x")
            assert allowed(comp, call) is (comp == "node" and resource != "bindings"), (
                comp, resource)
    # The coordinator scales `schedule` only: its scale subresource, by name.
    scale = ("apps", "deployments/scale")
    assert allowed("coordinator", ApiCall("patch", *scale, "fnplane", "fnplane-schedule"))
    assert not any(allowed("coordinator", ApiCall(v, *scale, "fnplane", name))
                   for v, name in (("patch", "fnplane-activator"), ("update", "fnplane-schedule"),
                                   ("patch", ""), ("get", "fnplane-node")))
    assert not allowed("coordinator", ApiCall("patch", "apps", "deployments", "fnplane",
                                              "fnplane-schedule"))
    # Components that never talk to the API are bound to no role at all.
    for comp in ("scale", "schedule", "route", "activator"):
        assert not any(allowed(comp, ApiCall(v, g, r, "fnplane", ""))
                       for v in ("get", "list", "watch", "create", "update", "patch", "delete")
                       for g, r in (("", "pods"), ("", "nodes"), ("fnplane.dev", "fnservices"),
                                    ("", "secrets"), ("apps", "deployments/scale")))


def test_least_privilege_checker_refuses_what_the_roles_do_not_grant() -> None:
    """The check used on every fake-API test's recorded calls is not vacuous."""
    assert allowed("node", ApiCall("watch", "", "pods", "fnplane", ""))
    assert allowed("node", ApiCall("list", "", "nodes", "", ""))
    # Every namespace's pods hold room on the nodes: read them all, write none outside.
    assert allowed("node", ApiCall("watch", "", "pods", "", ""))
    refused = [ApiCall("get", "", "secrets", "fnplane", "x"),
               ApiCall("delete", "", "pods", "kube-system", "x"),
               ApiCall("get", "", "pods", "kube-system", "x"),
               ApiCall("create", "", "pods", "kube-system", "x"),
               ApiCall("patch", "", "nodes", "", "n1"),
               ApiCall("update", "", "pods/status", "fnplane", "x")]
    assert [c for c in refused if allowed("node", c)] == []


# ---- the FnService CRD -----------------------------------------------------------------------


def test_crd_is_namespaced_v1alpha1_with_a_status_subresource() -> None:
    spec = crd()["spec"]
    assert spec["group"] == "fnplane.dev" and spec["scope"] == "Namespaced"
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}


def test_the_sample_fnservice_is_accepted_by_the_crd_and_by_fnplane_deploy() -> None:
    assert validate_custom_resource(SAMPLE, crd()) == []
    assert spec_from_manifest(copy.deepcopy(SAMPLE)).name == "sample"


def _variant(**predictor: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SAMPLE)
    for key, value in predictor.items():
        if value is None:
            doc["spec"]["predictor"].pop(key, None)
        else:
            doc["spec"]["predictor"][key] = value
    return doc


def _container(**fields: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SAMPLE)
    doc["spec"]["predictor"]["container"].update(fields)
    return doc


BAD = [
    ("min above max", _variant(minReplicas=5, maxReplicas=2), "minReplicas must be <="),
    ("negative container concurrency", _variant(containerConcurrency=-1), "minimum"),
    ("unknown scale metric", _variant(scaleMetric="qps"), "is not one of"),
    ("scale window under 6s", _variant(scaleWindowSeconds=5), "minimum"),
    ("readiness path not absolute", _container(readinessPath="health"), "does not match"),
    ("empty argument in command", _container(command=["python", ""]), "non-empty"),
    ("unknown predictor field", _variant(replicas=3), "Additional properties"),
    ("negative min replicas", _variant(minReplicas=-1), "minimum"),
    ("model version with a slash", _variant(modelVersion="1/infer"), "does not match"),
    ("negative run-as user", _container(securityContext={"runAsUser": -1}), "minimum"),
]


@pytest.mark.parametrize("doc,why", [(d, w) for _, d, w in BAD], ids=[n for n, _, _ in BAD])
def test_the_crd_refuses_what_fnplane_deploy_refuses(doc: dict[str, Any], why: str) -> None:
    errors = validate_custom_resource(doc, crd())
    assert any(why in e for e in errors), errors
    with pytest.raises(SpecError):
        spec_from_manifest(copy.deepcopy(doc))


GOOD = [
    ("unbounded max", _variant(minReplicas=3, maxReplicas=0)),
    ("no bounds at all", _variant(minReplicas=None, maxReplicas=None)),
    ("equal bounds", _variant(minReplicas=2, maxReplicas=2)),
    ("rps metric", _variant(scaleMetric="rps", scaleTarget=50)),
    ("a model version", _variant(modelVersion="2024.1")),
    ("empty command runs the sample", _container(command=[])),
    ("gpu as integer", _container(resources={"requests": {"cpu": 1, "memory": "1Gi",
                                                          "nvidia.com/gpu": 1}})),
    ("memory in bytes", _container(resources={"requests": {"cpu": "1e0",
                                                           "memory": 268435456}})),
    ("a run-as user", _container(securityContext={"runAsUser": 1000, "runAsGroup": 1000})),
]


def test_the_crd_keeps_kserve_fields_fnplane_refuses_so_they_are_never_pruned_silently(
) -> None:
    """The API server prunes fields a structural schema does not declare: a `runtime`
    dropped there would deploy a service without its server, silently. `model` keeps unknown
    fields, so the operator sees `runtime` and refuses it with the reason; `storageUri` is
    kept and read."""
    doc = _variant(model={"modelFormat": {"name": "sklearn"}, "runtime": "kserve-sklearn",
                          "image": "registry.example/iris:1"})
    doc["spec"]["predictor"].pop("container")
    assert validate_custom_resource(doc, crd()) == []
    with pytest.raises(SpecError, match="runtime: not supported"):
        spec_from_manifest(copy.deepcopy(doc))
    doc["spec"]["predictor"]["model"].pop("runtime")
    doc["spec"]["predictor"]["model"]["storageUri"] = "gs://b/iris"
    assert validate_custom_resource(doc, crd()) == []
    assert spec_from_manifest(copy.deepcopy(doc)).storage_uri == "gs://b/iris"
    doc["spec"]["predictor"]["model"]["securityContext"] = {"runAsUser": 1000}
    assert validate_custom_resource(doc, crd()) == []
    assert spec_from_manifest(copy.deepcopy(doc)).run_as_user == 1000


@pytest.mark.parametrize("doc", [d for _, d in GOOD], ids=[n for n, _ in GOOD])
def test_the_crd_accepts_what_fnplane_deploy_accepts(doc: dict[str, Any]) -> None:
    assert validate_custom_resource(doc, crd()) == []
    spec_from_manifest(copy.deepcopy(doc))


def test_a_name_longer_than_a_dns_label_is_refused_by_cel() -> None:
    doc = copy.deepcopy(SAMPLE)
    doc["metadata"]["name"] = "s" * 64
    assert any("DNS label" in e for e in validate_custom_resource(doc, crd()))


def test_the_cel_translator_refuses_what_it_does_not_know() -> None:
    assert cel("!has(self.a) || self.a <= 3", {"a": 2})
    assert not cel("has(self.a) && self.a == 0", {})
    with pytest.raises(ValueError):
        cel("self.a.all(x, x > 0)", {"a": [1]})
    with pytest.raises(ValueError):
        cel("__import__('os')", {})
    with pytest.raises(ValueError):
        cel("self.__class__ == 1", {})


def test_the_dockerfile_runs_components_by_argument() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "controlplane.component"]' in text
    assert "USER 10001" in text
    assert Path(REPO / ".dockerignore").exists()


# ---- credentials as Secrets (`fnplane creds k8s`) --------------------------------------------

CREDS_DIR = "/etc/fnplane/credentials"
# The components whose Store is on Redis (the activator's: API keys and their buckets).
REDIS_USERS = ("coordinator", "route", "activator")


def _by_name(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs}


def _nats_users(secret: dict[str, Any]) -> dict[str, dict[str, Any]]:
    text = secret["stringData"][NATS_AUTH_KEY]
    assert text.startswith("authorization: ")
    return {u["user"]: u for u in json.loads(text.removeprefix("authorization: "))["users"]}


def test_generated_secrets_validate_and_every_run_makes_fresh_passwords() -> None:
    cli = subprocess.run([sys.executable, "-m", "controlplane.cli", "creds", "k8s"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    first = list(yaml.safe_load_all(cli.stdout))
    second = list(yaml.safe_load_all(render()))
    for doc in first:
        kubernetes_validate.validate(doc, "1.37", strict=True)
        assert doc["kind"] == "Secret" and doc["metadata"]["namespace"] == "fnplane"
    assert set(_by_name(first)) == {NATS_AUTH_SECRET, REDIS_AUTH_SECRET} | {
        creds_secret(kind) for kind in KINDS}
    old = {u["password"] for u in _nats_users(_by_name(first)[NATS_AUTH_SECRET]).values()}
    new = {u["password"] for u in _nats_users(_by_name(second)[NATS_AUTH_SECRET]).values()}
    assert len(old) == len(KINDS) and not old & new
    assert all(len(pw) >= 32 for pw in old)


def test_the_nats_authorization_is_kernel_identitys_permissions_for_each_kind() -> None:
    creds = Credentials.generate()
    users = _nats_users(_by_name(secrets(creds))[NATS_AUTH_SECRET])
    assert set(users) == set(KINDS)
    for kind in KINDS:
        assert users[kind]["permissions"] == permissions(kind), kind
        assert users[kind]["password"] == creds.passwords[kind]


def test_each_kinds_secret_holds_its_own_password_and_nothing_else(tmp_path: Path) -> None:
    creds = Credentials.generate()
    docs = _by_name(secrets(creds))
    for kind in KINDS:
        path = tmp_path / f"{kind}.json"
        path.write_text(docs[creds_secret(kind)]["stringData"][CREDS_KEY])
        assert Credentials.load(path) == Credentials({kind: creds.passwords[kind]})
        assert login(path, kind) == Login(kind, creds.passwords[kind])
    redis_auth = docs[REDIS_AUTH_SECRET]["stringData"]
    assert redis_auth["password"] == creds.redis
    assert redis_auth["users.acl"] == redis_acl_file(creds.redis)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_volumes(pod: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}


@pytest.mark.parametrize("path", ["base", "overlays/dev"])
def test_every_deployment_mounts_only_its_own_kinds_credentials(path: str) -> None:
    docs = build(path)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["spec"]["template"]["spec"]["containers"][0]["args"][0]
            for d in deployments} == set(COMPONENTS)
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        kind = container["args"][0]
        volumes = _secret_volumes(pod)
        assert list(volumes.values()) == [creds_secret(kind)], kind
        (mount,) = [m for m in container["volumeMounts"] if m["name"] in volumes]
        assert mount["mountPath"] == CREDS_DIR and mount["readOnly"] is True
        env = _env(container)
        assert env["FNPLANE_CREDS"]["value"] == f"{CREDS_DIR}/{CREDS_KEY}"
        # Secret files are readable by the pod's group only, which the container runs in.
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
        assert pod["volumes"][-1]["secret"]["defaultMode"] == 0o440
        password = env.get("FNPLANE_REDIS_PASSWORD")
        if kind in REDIS_USERS:
            assert password == {"name": "FNPLANE_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {
                "name": REDIS_AUTH_SECRET, "key": "password"}}}
            assert env["FNPLANE_REDIS_URL"]["value"] == (
                "redis://fnplane:$(FNPLANE_REDIS_PASSWORD)@redis:6379/0")
            # Kubernetes expands $(VAR) only from variables defined earlier in the list.
            names = list(env)
            assert names.index("FNPLANE_REDIS_PASSWORD") < names.index("FNPLANE_REDIS_URL")
        else:
            assert password is None, kind


def test_nats_and_redis_read_their_authorization_from_the_secrets() -> None:
    sets = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in build("base")
            if d["kind"] == "StatefulSet"}
    nats_pod, redis_pod = sets["nats"], sets["redis"]
    assert _secret_volumes(nats_pod) == {"auth": NATS_AUTH_SECRET}
    (nats,) = nats_pod["containers"]
    assert f"--config=/etc/nats/auth/{NATS_AUTH_KEY}" in nats["args"]
    assert {"name": "auth", "mountPath": "/etc/nats/auth", "readOnly": True} in (
        nats["volumeMounts"])
    assert _secret_volumes(redis_pod) == {"auth": REDIS_AUTH_SECRET}
    (rds,) = redis_pod["containers"]
    assert rds["args"][1:3] == ["--aclfile", "/etc/redis/auth/users.acl"]
    assert _env(rds)["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == {
        "name": REDIS_AUTH_SECRET, "key": "password"}


# A URL whose user part carries a password, unless the password is a placeholder:
# a variable Kubernetes expands, a redaction, a format field.
_URL_PASSWORD = re.compile(r"\b(?:redis|rediss|nats|tls)://[^/\s:@'\"]+:([^@\s/'\"]+)@")
_PLACEHOLDER = re.compile(r"^(\$\(\w+\)|\*+|\{[^}]*\}.*|<\w+>)$")
_CONFIG_PASSWORD = re.compile(r"(?im)^\s*(?:requirepass|[\"']?password[\"']?\s*[:=])\s*\S")


def test_no_password_literal_in_the_repository() -> None:
    """No committed Secret, no env var with a password value, no password in a URL or a
    config file anywhere in git: passwords exist only where `fnplane creds k8s` or
    `fnplane up` made them."""
    for path in ("base", "overlays/dev"):
        docs = build(path)
        assert not [d for d in docs if d["kind"] == "Secret"]
        for name, pod in _pods(docs):
            for c in pod["containers"]:
                for var, e in _env(c).items():
                    if re.search(r"PASSWORD|PASS$|AUTH|TOKEN|SECRET", var):
                        assert "valueFrom" in e, (name, var)
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    found = []
    for rel in files:
        path = REPO / rel
        if path.suffix in (".png", ".jpg", ".gz", ".npz") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        found += [(rel, m.group(0)) for m in _URL_PASSWORD.finditer(text)
                  if not _PLACEHOLDER.match(m.group(1))]
        if path.suffix in (".yaml", ".yml", ".json", ".conf", ".acl", ".env", ".md"):
            found += [(rel, m.group(0)) for m in _CONFIG_PASSWORD.finditer(text)]
    assert found == []


async def test_the_generated_configs_work_with_real_servers(tmp_path: Path) -> None:
    """nats-server takes the Secret's nats.conf as deploy/ passes it (--config) and lets each
    kind in with the file of its own Secret, nobody without one; redis-server takes the ACL
    file and the URL coordinator and route build, and refuses its default user."""
    creds = Credentials.generate()
    docs = _by_name(secrets(creds))
    conf = tmp_path / NATS_AUTH_KEY
    conf.write_text(docs[NATS_AUTH_SECRET]["stringData"][NATS_AUTH_KEY])
    acl = tmp_path / "users.acl"
    acl.write_text(docs[REDIS_AUTH_SECRET]["stringData"]["users.acl"])
    nats_port, redis_port = free_port(), free_port()
    nats_proc = await ManagedProcess.start(
        [nats_server_binary(), f"--config={conf}", "-a", "127.0.0.1", "-p", str(nats_port)],
        name="nats-server", log_dir=tmp_path / "logs")
    redis_proc = await ManagedProcess.start(
        [redis_server_binary(), "--aclfile", str(acl), "--bind", "127.0.0.1",
         "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        name="redis-server", log_dir=tmp_path / "logs")
    try:
        assert await asyncio.wait_for(nats_proc.wait_for_line("Server is ready"), 20)
        assert await asyncio.wait_for(redis_proc.wait_for_line("Ready to accept"), 20)
        url = f"nats://127.0.0.1:{nats_port}"
        for kind in COMPONENTS:
            own = tmp_path / f"{kind}.json"
            own.write_text(docs[creds_secret(kind)]["stringData"][CREDS_KEY])
            bus = await Bus.connect(url, kind, reconnect=False, login=login(own, kind))
            await bus.close()
        with pytest.raises(Exception, match="Authorization"):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=1,
                               reconnect_time_wait=0.1)

        deployed = "redis://fnplane:$(FNPLANE_REDIS_PASSWORD)@redis:6379/0"
        redis_url = deployed.replace("$(FNPLANE_REDIS_PASSWORD)", creds.redis).replace(
            "redis:6379", f"127.0.0.1:{redis_port}")
        ours = Store.from_url(redis_url)
        # No retries: redis-py would back off for seconds before reporting the refusal.
        anonymous = aioredis.Redis(host="127.0.0.1", port=redis_port,
                                   retry=Retry(NoBackoff(), 0))
        try:
            assert await ours.ping()
            with pytest.raises(aioredis.AuthenticationError):
                await anonymous.get("fnplane:services")
        finally:
            await ours.close()
            await anonymous.aclose()
    finally:
        await nats_proc.stop(timeout=5)
        await redis_proc.stop(timeout=5)
