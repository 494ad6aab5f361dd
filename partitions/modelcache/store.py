"""The node-local model cache on disk: one directory per cached version of the weights
(`<root>/<key>/`), an index (`<root>/index.json`) that survives the agent's restart, and
downloads into `<root>/.tmp-*` renamed into place only once complete and verified, so a pod
is never handed half a model. Fetches of the same weights share one download (ten pods
starting on one node fetch once); the cache stays within its size by evicting the least
recently used models no pod uses (`lru`), and refuses a model that cannot fit."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from partitions.modelcache.keys import cache_key
from partitions.modelcache.lru import Entry, evictions
from partitions.modelcache.policy import ModelUriError, Source, UriPolicy

log = logging.getLogger(__name__)

INDEX = "index.json"
TMP_PREFIX = ".tmp-"
CHUNK = 1024 * 1024


class ModelFetchError(RuntimeError):
    """The weights could not be made ready on this node; the message names the URI."""


@dataclass(frozen=True)
class CachedModel:
    key: str
    uri: str
    path: Path  # the read-only directory handed to pods as MODEL_DIR
    size: int
    hit: bool = False


@dataclass(frozen=True)
class _Version:
    size: int
    etag: str
    mtime: float
    directory: bool


class ModelCache:
    """One node's cache. `fetches` counts downloads done (tests check single-flight)."""

    def __init__(self, root: Path, *, capacity_bytes: int, policy: UriPolicy,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.capacity = capacity_bytes
        self.policy = policy
        self.clock = clock
        self.entries: dict[str, Entry] = {}
        self.users: dict[str, str] = {}  # pod → key it uses
        self.fetches = 0
        self._inflight: dict[tuple[str, str], asyncio.Task[CachedModel]] = {}
        self._reserved: dict[str, int] = {}  # download under way → bytes it will take
        self._changed: list[Callable[[], None]] = []

    # ---- state -------------------------------------------------------------------------

    def load(self) -> None:
        """Adopt what a previous agent left: indexed, complete directories only. A
        download cut short (a `.tmp-*`) or a directory the index does not name is removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            raw = json.loads((self.root / INDEX).read_text())
        except (OSError, ValueError):
            raw = []
        entries = {}
        for item in raw if isinstance(raw, list) else []:
            try:
                e = Entry(**item)
            except TypeError:
                continue
            if (self.root / e.key).is_dir():
                entries[e.key] = e
        self.entries = entries
        for child in self.root.iterdir():
            if child.name != INDEX and child.name not in entries:
                _remove(child)
        self._save()

    def contents(self) -> dict[str, int]:
        """URI → bytes of every model cached now (what the node reports)."""
        out: dict[str, int] = {}
        for e in self.entries.values():
            out[e.uri] = out.get(e.uri, 0) + e.size
        return out

    def on_change(self, callback: Callable[[], None]) -> None:
        self._changed.append(callback)

    def acquire(self, pod: str, key: str) -> None:
        self.users[pod] = key
        if (e := self.entries.get(key)) is not None:
            self.entries[key] = Entry(e.key, e.uri, e.size, self.clock())

    def release(self, pod: str) -> None:
        self.users.pop(pod, None)

    def _save(self) -> None:
        tmp = self.root / f"{INDEX}.{os.getpid()}"
        tmp.write_text(json.dumps([asdict(e) for e in self.entries.values()]))
        os.replace(tmp, self.root / INDEX)

    def _notify(self) -> None:
        for cb in self._changed:
            cb()

    # ---- fetching ----------------------------------------------------------------------

    async def fetch(self, uri: str, *, sha256: str = "") -> CachedModel:
        """The weights at `uri` in this cache, downloading them once however many pods ask
        at the same time. Raises `ModelUriError` (refused) or `ModelFetchError`."""
        source = self.policy.check(uri)
        flight = (uri, sha256)
        task = self._inflight.get(flight)
        if task is None:
            task = asyncio.create_task(self._fetch(source, sha256), name=f"fetch {uri}")
            self._inflight[flight] = task
            task.add_done_callback(lambda _t: self._inflight.pop(flight, None))
        # Shielded: one pod that stops waiting (it was stopped) does not cancel the others'.
        return await asyncio.shield(task)

    async def _fetch(self, source: Source, sha256: str) -> CachedModel:
        uri = source.uri
        if sha256:
            key = cache_key(uri, sha256=sha256)
            if key in self.entries:
                return self._hit(key)
        version = await asyncio.wait_for(asyncio.to_thread(self._version, source),
                                         timeout=min(30.0, self.policy.timeout_s))
        if version.size > self.policy.max_bytes:
            raise ModelFetchError(f"model {uri}: {version.size} bytes is over the limit of "
                                  f"{self.policy.max_bytes}")
        key = cache_key(uri, sha256=sha256, size=version.size, etag=version.etag,
                        mtime=version.mtime)
        if key in self.entries:
            return self._hit(key)
        self._make_room(uri, key, version.size)
        tmp = self.root / f"{TMP_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        try:
            self.fetches += 1
            size = await asyncio.to_thread(self._download, source, version, sha256, tmp)
            _read_only(tmp)
            os.rename(tmp, self.root / key)
        except OSError as exc:
            _remove(tmp)
            if exc.errno == errno.ENOSPC:
                raise ModelFetchError(f"model {uri}: the cache disk is full") from None
            raise ModelFetchError(f"model {uri}: {exc}") from None
        except BaseException:
            _remove(tmp)
            raise
        finally:
            self._reserved.pop(key, None)
        self.entries[key] = Entry(key, uri, size, self.clock())
        self._save()
        self._notify()
        log.info("model cache %s: fetched %s (%d bytes)", self.root, uri, size)
        return CachedModel(key, uri, self.root / key, size)

    def _hit(self, key: str) -> CachedModel:
        e = self.entries[key]
        self.entries[key] = Entry(e.key, e.uri, e.size, self.clock())
        return CachedModel(key, e.uri, self.root / key, e.size, hit=True)

    def _make_room(self, uri: str, key: str, size: int) -> None:
        in_use = set(self.users.values())
        out = evictions(self.entries.values(), in_use=in_use, need=size,
                        capacity=self.capacity, reserved=sum(self._reserved.values()))
        if out is None:
            held = sum(e.size for e in self.entries.values() if e.key in in_use)
            raise ModelFetchError(
                f"model {uri}: {size} bytes do not fit in the node's model cache of "
                f"{self.capacity} bytes ({held} held by running pods, "
                f"{sum(self._reserved.values())} by downloads under way)")
        for old in out:
            e = self.entries.pop(old)
            _remove(self.root / old)
            log.info("model cache %s: evicted %s (%d bytes)", self.root, e.uri, e.size)
        if out:
            self._save()
            self._notify()
        self._reserved[key] = size

    # ---- blocking I/O, in a thread -------------------------------------------------------

    def _fs(self, source: Source) -> tuple[Any, str]:
        import fsspec  # here: importing it costs the agent's start-up nothing

        if source.scheme == "file":
            return fsspec.filesystem("file"), source.path
        if source.scheme in ("http", "https"):
            import aiohttp

            self._check_resolved(source)
            timeout = aiohttp.ClientTimeout(total=self.policy.timeout_s, sock_connect=10)
            # No instance cache: each fetch gets this policy's timeout, not an older one's.
            fs = fsspec.filesystem(source.scheme, skip_instance_cache=True,
                                   client_kwargs={"timeout": timeout})
            return fs, source.uri
        try:
            fs = fsspec.filesystem(source.scheme)
        except (ImportError, ValueError) as exc:
            raise ModelFetchError(f"model {source.uri}: no fsspec support for "
                                  f"{source.scheme}:// here ({exc})") from None
        return fs, source.uri

    def _check_resolved(self, source: Source) -> None:
        try:
            infos = socket.getaddrinfo(source.host, source.port or 443, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ModelFetchError(f"model {source.uri}: cannot resolve {source.host}: "
                                  f"{exc}") from None
        for info in infos:
            self.policy.check_address(source.uri, source.host, source.port, str(info[4][0]))

    def _version(self, source: Source) -> _Version:
        fs, path = self._fs(source)
        try:
            info = fs.info(path)
        except FileNotFoundError as exc:
            # fsspec's HTTP filesystem says "not found" for a refused connection as well.
            why = "not found" if source.scheme == "file" else f"unreachable or not found ({exc})"
            raise ModelFetchError(f"model {source.uri}: {why}") from None
        except (OSError, ValueError) as exc:
            raise ModelFetchError(f"model {source.uri}: unreachable ({exc})") from None
        except Exception as exc:  # fsspec's backends raise their clients' own errors
            raise ModelFetchError(f"model {source.uri}: unreachable ({exc})") from None
        if info.get("type") == "directory":
            size = sum(int(i.get("size") or 0) for i in fs.find(path, detail=True).values())
            return _Version(size, "", float(info.get("mtime") or 0), True)
        size = info.get("size")
        if size is None:
            raise ModelFetchError(f"model {source.uri}: the server gives no size")
        etag = str(info.get("ETag") or info.get("etag") or "")
        return _Version(int(size), etag, float(info.get("mtime") or 0), False)

    def _download(self, source: Source, version: _Version, sha256: str, tmp: Path) -> int:
        """Copy into `tmp`, checking the size, the time and the checksum as it goes; the
        caller renames `tmp` into place only after this returns."""
        fs, path = self._fs(source)
        deadline = time.monotonic() + self.policy.timeout_s
        tmp.mkdir(parents=True)
        if not version.directory:
            name = Path(path.rstrip("/")).name or "model"
            got, digest = self._copy(fs, path, tmp / name, deadline, source.uri)
            if got != version.size:
                raise ModelFetchError(f"model {source.uri}: got {got} of {version.size} "
                                      "bytes (the download was cut short)")
            if sha256 and digest != sha256:
                raise ModelFetchError(f"model {source.uri}: sha256 {digest} is not the "
                                      f"expected {sha256}")
            return got
        total = 0
        for file in sorted(fs.find(path)):
            rel = Path(file).relative_to(path)
            if source.scheme == "file":  # a symlink inside the root must not lead out
                self.policy.check(f"file://{file}")
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            got, _ = self._copy(fs, file, dest, deadline, source.uri)
            total += got
            if total > self.policy.max_bytes:
                raise ModelFetchError(f"model {source.uri}: over the limit of "
                                      f"{self.policy.max_bytes} bytes")
        if total != version.size:
            raise ModelFetchError(f"model {source.uri}: got {total} of {version.size} bytes "
                                  "(it changed while being fetched)")
        return total

    def _copy(self, fs: Any, path: str, dest: Path, deadline: float,
              uri: str) -> tuple[int, str]:
        digest = hashlib.sha256()
        got = 0
        try:
            # Over HTTP, block_size=0 streams the body in one GET; a block size makes fsspec
            # fetch it as ranged GETs, one per block (300 per 300 MB at 1 MiB: the issue-15
            # benchmark's uncached fetch took 2.4x the wire time).
            block = 0 if path.startswith(("http://", "https://")) else CHUNK
            with fs.open(path, "rb", block_size=block) as src, dest.open("wb") as out:
                while chunk := src.read(CHUNK):
                    got += len(chunk)
                    if got > self.policy.max_bytes:
                        raise ModelFetchError(f"model {uri}: over the limit of "
                                              f"{self.policy.max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise ModelFetchError(f"model {uri}: not fetched within "
                                              f"{self.policy.timeout_s:g}s")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except (ModelFetchError, ModelUriError):
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
            raise ModelFetchError(f"model {uri}: {exc}") from None
        except Exception as exc:  # the HTTP client's own errors (a connection cut short)
            raise ModelFetchError(f"model {uri}: download failed ({exc})") from None
        return got, digest.hexdigest()


def _read_only(path: Path) -> None:
    """Pods get the weights read-only: a pod cannot spoil them for the next one."""
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o444)
        os.chmod(dirpath, 0o555)


def _remove(path: Path) -> None:
    if not path.exists():
        return
    if path.is_dir() and not path.is_symlink():
        for dirpath, _dirs, _files in os.walk(path):
            os.chmod(dirpath, 0o755)  # read-only directories cannot be emptied
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
