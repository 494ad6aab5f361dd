"""Cache keys: what makes two fetches the same weights. A given sha256 names the content
itself; otherwise the URI with what the store says of the object's version (size and ETag,
or size and mtime), so a file replaced at the same URI is fetched again, never served stale."""

from __future__ import annotations

import hashlib


def cache_key(uri: str, *, sha256: str = "", size: int = 0, etag: str = "",
              mtime: float = 0.0) -> str:
    """A directory-safe name for one version of the weights at `uri`."""
    version = f"sha256:{sha256}" if sha256 else f"size:{size}\netag:{etag}\nmtime:{mtime!r}"
    return hashlib.sha256(f"{uri}\n{version}".encode()).hexdigest()[:40]
