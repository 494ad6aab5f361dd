"""`python -m partitions.modelcache.initializer URI DEST`: KServe's storage initializer in
fnplane's image. Fetches URI (through the same cache code and policy as a local node: only
hosts in FNPLANE_MODEL_HOSTS; file:// refused, a pod has no model root) into DEST, an
emptyDir the server then mounts read-only; exits non-zero with the reason, which the pod's
status shows, when the fetch fails."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

from partitions.modelcache.policy import ModelUriError, UriPolicy
from partitions.modelcache.store import ModelCache, ModelFetchError


async def initialize(uri: str, dest: Path, env: dict[str, str]) -> None:
    hosts = frozenset(h.strip().lower() for h in env.get("FNPLANE_MODEL_HOSTS", "").split(",")
                      if h.strip())
    policy = UriPolicy(hosts=hosts,
                       max_bytes=int(env.get("FNPLANE_MODEL_MAX_BYTES") or 20 * 1024**3),
                       timeout_s=float(env.get("FNPLANE_MODEL_FETCH_TIMEOUT_S") or 600))
    work = dest / ".fnplane-fetch"  # on DEST's filesystem: the files are moved, not copied
    cache = ModelCache(work, capacity_bytes=policy.max_bytes, policy=policy)
    cache.load()
    model = await cache.fetch(uri, sha256=env.get("FNPLANE_MODEL_SHA256", ""))
    os.chmod(model.path, 0o755)
    for item in model.path.iterdir():
        os.rename(item, dest / item.name)
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m partitions.modelcache.initializer URI DEST", file=sys.stderr)
        return 2
    try:
        asyncio.run(initialize(args[0], Path(args[1]), dict(os.environ)))
    except (ModelUriError, ModelFetchError) as exc:
        print(f"storage-initializer: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
