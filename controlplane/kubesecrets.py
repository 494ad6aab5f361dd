"""The credentials of deploy/ as Kubernetes Secrets, made fresh by `fnplane creds k8s` and
never committed: nats-server's authorization (every kind's user and permissions, from
kernel/identity.py, as `fnplane up` writes it), Redis's ACL file and password, and one Secret
per component kind holding only that kind's credentials file, which the kind's Deployment
mounts (FNPLANE_CREDS). deploy/README.md says how to apply and rotate them."""

from __future__ import annotations

import json
from typing import Any

import yaml

from kernel.identity import KINDS, Credentials, redis_acl_file

NATS_AUTH_SECRET = "fnplane-nats-auth"
NATS_AUTH_KEY = "nats.conf"  # nats-server runs with --config on this file
REDIS_AUTH_SECRET = "fnplane-redis-auth"
CREDS_KEY = "credentials.json"


def creds_secret(kind: str) -> str:
    return f"fnplane-creds-{kind}"


def _secret(name: str, namespace: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "fnplane"}},
            "stringData": data}


def secrets(creds: Credentials, namespace: str = "fnplane") -> list[dict[str, Any]]:
    """Every Secret deploy/ references. A kind's Secret holds its own password only (and no
    Redis password: coordinator and route get that from the Redis Secret, by key)."""
    nats_conf = f"authorization: {json.dumps(creds.server_authorization(), indent=2)}\n"
    out = [
        _secret(NATS_AUTH_SECRET, namespace, {NATS_AUTH_KEY: nats_conf}),
        _secret(REDIS_AUTH_SECRET, namespace, {"users.acl": redis_acl_file(creds.redis),
                                               "password": creds.redis}),
    ]
    for kind in KINDS:
        out.append(_secret(creds_secret(kind), namespace,
                           {CREDS_KEY: creds.only(kind).dumps()}))
    return out


class _Dumper(yaml.SafeDumper):
    """Multi-line values (the configs) as literal blocks, readable in `kubectl get -o yaml`."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value,
                                   style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def render(namespace: str = "fnplane") -> str:
    """Fresh random passwords, as one YAML stream for `kubectl apply -f -`."""
    return yaml.dump_all(secrets(Credentials.generate(), namespace), Dumper=_Dumper,
                         sort_keys=False)
