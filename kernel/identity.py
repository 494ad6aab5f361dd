"""Who may say what on the bus. One NATS user per component kind, its publish and subscribe
allow-lists generated from the endpoint declarations (kernel/endpoints.py), so they cannot
drift from the code: a kind may publish what it calls and subscribe what it serves, answer
the requests it received (`allow_responses`), and read only its own reply inboxes.
Everything else — a `StartPod` from anyone but `schedule`, a pod event from anyone but a node
agent, the admin API without admin credentials — the server refuses.

The credentials file (`credentials.json` in the state dir, mode 0600) holds one password per
kind and Redis's; `fnplane up` makes it on first start and the servers' configs from it."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel.endpoints import ALL, Endpoint

# Every kind that connects to NATS. `admin` is the CLI (and whoever holds its credentials);
# `client` is an inference client of the NATS ingress; `bench` runs the scheduler
# benchmark's baseline schedulers and drivers.
KINDS = ("coordinator", "scale", "schedule", "route", "activator", "node", "operator",
         "admin", "client", "bench")
CREDENTIALS_FILE = "credentials.json"
# A responder may answer each request it receives this many times within the expiry (node
# agents answer one inventory request in several chunks).
MAX_RESPONSES = 100_000
# JetStream's API and acks: the activator consumes the per-service event streams.
JETSTREAM = ["$JS.API.>", "$JS.ACK.>"]


# Redis's one ACL user, and what it may do: everything fnplane needs, no dangerous command
# (CONFIG, FLUSHALL, KEYS, DEBUG …) but SHUTDOWN, so `fnplane up` can stop its server
# cleanly. `fnplane up` passes these on redis-server's command line; deploy/ in an ACL file.
REDIS_USER = "fnplane"
REDIS_ACL = ("~*", "&*", "+@all", "-@dangerous", "+shutdown", "+info", "+ping")


def redis_acl_file(password: str) -> str:
    """redis-server's ACL file: the default user off, fnplane's user on with `password`."""
    return f"user default off\nuser {REDIS_USER} on >{password} {' '.join(REDIS_ACL)}\n"


def inbox_prefix(kind: str) -> str:
    """Each kind reads replies only under its own prefix, so it cannot read another's."""
    return f"_INBOX_{kind}"


def _subject(ep: Endpoint[Any, Any], kind: str) -> str:
    # A `{kind}` parameter is the sender's own kind: nobody beats for someone else.
    return ep.subject_for(kind=kind) if "kind" in ep.params else ep.pattern


def permissions(kind: str) -> dict[str, Any]:
    """The nats-server permissions block of one kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}")
    publish = sorted({_subject(ep, kind) for ep in ALL if kind in ep.called_by})
    subscribe = sorted({ep.pattern for ep in ALL if kind in ep.served_by})
    subscribe.append(f"{inbox_prefix(kind)}.>")
    if kind == "client":
        subscribe.append("_INBOX.>")  # third-party clients use nats.py's default inboxes
    if kind == "activator":
        publish += JETSTREAM
        # Events are answered on the producer's `Fnplane-Reply-To`, a client inbox.
        publish.append("_INBOX.>")
    return {
        "publish": {"allow": publish},
        "subscribe": {"allow": subscribe},
        "allow_responses": {"max": MAX_RESPONSES, "expires": "5m"},
    }


@dataclass(frozen=True)
class Login:
    """How one kind connects: its user, password and reply-inbox prefix."""

    kind: str
    password: str

    def nats_options(self) -> dict[str, str]:
        return {"user": self.kind, "password": self.password,
                "inbox_prefix": inbox_prefix(self.kind)}


def login(credentials: Path | None, kind: str) -> Login | None:
    """The login of `kind` from a credentials file; None without one (a NATS server
    without authorization, such as the test fixtures')."""
    if credentials is None:
        return None
    return Login(kind, Credentials.load(credentials).passwords[kind])


@dataclass(frozen=True)
class Credentials:
    passwords: dict[str, str]  # kind → password; the user name is the kind
    redis: str = ""  # the password of Redis's ACL user (controlplane/servers.py)

    @classmethod
    def generate(cls) -> Credentials:
        return cls({kind: secrets.token_urlsafe(24) for kind in KINDS},
                   redis=secrets.token_urlsafe(24))

    @classmethod
    def load(cls, path: Path) -> Credentials:
        data = json.loads(path.read_text())
        return cls({str(k): str(v) for k, v in data["passwords"].items()},
                   redis=str(data.get("redis", "")))

    def dumps(self) -> str:
        """The credentials file's text (`load` reads it back)."""
        return json.dumps({"passwords": self.passwords, "redis": self.redis})

    def only(self, kind: str) -> Credentials:
        """What one kind's process needs: its own password, nothing of the others'."""
        return Credentials({kind: self.passwords[kind]})

    def save(self, path: Path) -> None:
        """Written 0600 from the first byte (never readable by others, even briefly)."""
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.dumps())
        tmp.replace(path)

    @classmethod
    def ensure(cls, state_dir: Path) -> tuple[Credentials, Path]:
        """The state dir's credentials, made on first use."""
        path = state_dir / CREDENTIALS_FILE
        if path.exists():
            return cls.load(path), path
        creds = cls.generate()
        creds.save(path)
        return creds, path

    def user(self, kind: str) -> tuple[str, str]:
        return kind, self.passwords[kind]

    def server_authorization(self) -> dict[str, Any]:
        """The `authorization` block of nats-server's config: every kind, no anonymous."""
        return {"users": [{"user": kind, "password": pw, "permissions": permissions(kind)}
                          for kind, pw in sorted(self.passwords.items())]}
