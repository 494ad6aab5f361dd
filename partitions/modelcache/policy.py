"""Which storage URIs a node may fetch: the pure check, run at deploy (a 400) and again by
the node before any byte moves. Safe by default: `file://` only under the configured model
root (never the state dir, nothing leading out by symlink or `..`), http(s) and object
stores only to hosts on the allow-list, loopback and link-local addresses refused unless
listed by name, since a node fetching for a user must not become a way to read the control
plane's own files or reach services that trust localhost."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Schemes fetched through fsspec; s3/gs need their fsspec packages (s3fs, gcsfs) installed.
SCHEMES = ("file", "http", "https", "s3", "gs")
ANY_HOST = "*"


class ModelUriError(ValueError):
    """A storage URI this node refuses to fetch; the message says which URI and why."""


@dataclass(frozen=True)
class Source:
    """A checked URI: its scheme, host (bucket for object stores) and path (a resolved local
    path for `file://`)."""

    uri: str
    scheme: str
    host: str = ""
    port: int | None = None
    path: str = ""


@dataclass(frozen=True)
class UriPolicy:
    model_root: Path | None = None
    state_dir: Path | None = None
    hosts: frozenset[str] = field(default_factory=frozenset)
    max_bytes: int = 50 * 1024**3
    timeout_s: float = 600.0

    def check(self, uri: str) -> Source:
        """The URI as a `Source`, or `ModelUriError` naming the URI and the reason."""
        try:
            parts = urlsplit(uri)
            port = parts.port
        except ValueError as exc:
            raise ModelUriError(f"storage URI {uri!r} is malformed: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ModelUriError(f"storage URI {uri!r}: scheme {scheme or '(none)'!r} is not "
                                f"supported (expected one of {', '.join(SCHEMES)})")
        if scheme == "file":
            return self._check_file(uri, parts.netloc, unquote(parts.path))
        host = (parts.hostname or "").lower()
        if not host:
            raise ModelUriError(f"storage URI {uri!r} names no host")
        if not self.host_allowed(host, port):
            raise ModelUriError(f"storage URI {uri!r}: host {host!r} is not on --model-hosts"
                                + (" (loopback and link-local hosts must be listed by name)"
                                   if is_local_host(host) else ""))
        if scheme in ("http", "https") and not parts.path.strip("/"):
            raise ModelUriError(f"storage URI {uri!r} names no file")
        return Source(uri=uri, scheme=scheme, host=host, port=port, path=parts.path)

    def host_allowed(self, host: str, port: int | None = None) -> bool:
        """Listed by name (or name:port); '*' admits any host but loopback and link-local."""
        host = host.lower().strip("[]")
        if host in self.hosts or (port is not None and f"{host}:{port}" in self.hosts):
            return True
        return ANY_HOST in self.hosts and not is_local_host(host)

    def _check_file(self, uri: str, netloc: str, raw: str) -> Source:
        if netloc not in ("", "localhost"):
            raise ModelUriError(f"storage URI {uri!r}: file:// names a path on this node, "
                                f"not on host {netloc!r}")
        if self.model_root is None:
            raise ModelUriError(f"storage URI {uri!r}: file:// is refused without a model "
                                "root (--model-root)")
        if not raw.startswith("/"):
            raise ModelUriError(f"storage URI {uri!r}: expected an absolute path")
        if ".." in Path(raw).parts:
            raise ModelUriError(f"storage URI {uri!r}: '..' is not allowed in a model path")
        root = self.model_root.resolve()
        # Symlinks followed: a link under the root that points out of it leads out of it.
        real = Path(raw).resolve()
        if self.state_dir is not None and real.is_relative_to(self.state_dir.resolve()):
            raise ModelUriError(f"storage URI {uri!r} is inside fnplane's state dir")
        if not real.is_relative_to(root):
            how = " (through a symlink)" if Path(raw).is_relative_to(root) else ""
            raise ModelUriError(f"storage URI {uri!r} is outside the model root {root}{how}")
        return Source(uri=uri, scheme="file", path=str(real))

    def check_address(self, uri: str, host: str, port: int | None, address: str) -> None:
        """What a host resolved to: loopback or link-local only when the host is listed by
        name (a '*' or a DNS name that resolves to 127.0.0.1 does not reach localhost)."""
        listed = host in self.hosts or (port is not None and f"{host}:{port}" in self.hosts)
        if not listed and is_local_host(address):
            raise ModelUriError(f"storage URI {uri!r}: host {host!r} resolves to {address}, a "
                                "loopback or link-local address; list the host by name in "
                                "--model-hosts to allow it")


def is_local_host(host: str) -> bool:
    """localhost, or a loopback / link-local / unspecified address literal."""
    host = host.lower().strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or ip.is_link_local or ip.is_unspecified


def policy_from(*, model_root: Path | None, state_dir: Path | None, hosts: tuple[str, ...],
                max_bytes: int, timeout_s: float) -> UriPolicy:
    """The policy of a node configuration; a model root inside the state dir is refused
    (the state dir holds credentials: no user's URI may reach it)."""
    if model_root is not None and state_dir is not None and \
            model_root.resolve().is_relative_to(state_dir.resolve()):
        raise ModelUriError(f"model root {model_root} is inside the state dir {state_dir}")
    return UriPolicy(model_root=model_root, state_dir=state_dir,
                     hosts=frozenset(h.lower() for h in hosts), max_bytes=max_bytes,
                     timeout_s=timeout_s)
