"""What must survive a restart, in Redis: the service registry, the partition map with its
epochs, the routing snapshot and the last cold start of each service.

Records are the same msgpack Structs as on the wire. The hot path never waits on Redis:
route writes its snapshot behind publishing, and activators read endpoints from NATS.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from kernel import tokenbucket
from kernel.messages import (
    ApiKey,
    ColdStart,
    Endpoints,
    PartitionMap,
    ServiceSpec,
    ShardMap,
    StoredKey,
    decode_record,
    encode_record,
)

# The format of what fnplane keeps (Redis records and keys, JetStream streams, the state
# dir). Raise it with any change an older release could not read, and teach `check_schema`
# (and controlplane/statedir.py) to migrate from the previous one. The first release wrote
# no version: its state is schema 1.
STATE_SCHEMA = 1
SCHEMA_KEY = "fnplane:schema"

SERVICES = "fnplane:services"
PARTITIONS = "fnplane:partitions"
SHARD_MAP = "fnplane:shards"
ROUTES = "fnplane:routes"
COLD_STARTS = "fnplane:coldstarts"
# Per service: its revisions' immutable specs (`fnplane:revisions:NAME`, revision → spec),
# and the revisions that have had a ready pod (Knative's Ready condition, which a revision
# keeps when it scales to zero).
REVISIONS = "fnplane:revisions:"
READY_REVISIONS = "fnplane:ready-revisions"
API_KEYS = "fnplane:apikeys"  # key id → StoredKey (the secret only as its hash)
BUCKET = "fnplane:bucket:{}"  # key id → its token bucket (kernel/tokenbucket.py)

# Fencing: write the partition map only if the stored version is the one the writer read,
# so a coordinator that lost its lease (or a stale copy) cannot roll the map back.
_CAS_MAP = """
local cur = redis.call('HGET', KEYS[1], 'version')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'map', ARGV[2])
return 1
"""


class StaleWrite(Exception):
    pass


class StateSchemaError(RuntimeError):
    """Stored state this release cannot read: refused whole, never half-read."""


def schema_verdict(found: int | None, *, where: str) -> int:
    """The schema to stamp on stored state, or the error that refuses it. `found` is the
    stamped version (None: none, as the first release left it)."""
    if found is None:
        return STATE_SCHEMA  # empty, or the first release's state: both read as schema 1
    if found > STATE_SCHEMA:
        raise StateSchemaError(
            f"{where} holds fnplane state of schema {found}, newer than this release reads "
            f"({STATE_SCHEMA}): run the fnplane release that wrote it, or start this one "
            f"on a fresh state (another --state-dir, or an empty Redis)"
        )
    if found < 1:
        raise StateSchemaError(f"{where}: schema version {found} is not a fnplane schema")
    return found


class Store:
    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client
        self._cas_map = self.r.register_script(_CAS_MAP)
        self._take_token = self.r.register_script(tokenbucket.SCRIPT)

    @classmethod
    def from_url(cls, url: str) -> Store:
        return cls(aioredis.from_url(url, decode_responses=False))

    async def check_schema(self) -> int:
        """Refuse state of a newer schema before reading any of it; stamp ours on state
        that has none (new, or written by the first release, which is schema 1)."""
        raw = await self.r.get(SCHEMA_KEY)
        try:
            found = None if raw is None else int(raw)
        except ValueError:
            raise StateSchemaError(f"Redis key {SCHEMA_KEY} is {raw!r}, not a version") from None
        version = schema_verdict(found, where="Redis")
        if raw is None:
            await self.r.set(SCHEMA_KEY, str(version))
        return version

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def close(self) -> None:
        await self.r.aclose()

    # ---- services -----------------------------------------------------------------------

    async def put_service(self, spec: ServiceSpec) -> None:
        await self.r.hset(SERVICES, spec.name, encode_record(spec))

    async def get_service(self, name: str) -> ServiceSpec | None:
        raw = await self.r.hget(SERVICES, name)
        return decode_record(raw, ServiceSpec) if raw else None

    async def list_services(self) -> list[ServiceSpec]:
        raw = await self.r.hgetall(SERVICES)
        return sorted((decode_record(v, ServiceSpec) for v in raw.values()), key=lambda s: s.name)

    async def delete_service(self, name: str) -> bool:
        revisions = await self.r.hkeys(REVISIONS + name)
        pipe = self.r.pipeline()
        pipe.hdel(SERVICES, name)
        pipe.hdel(ROUTES, name)
        pipe.hdel(COLD_STARTS, name)
        pipe.delete(REVISIONS + name)
        for rev in revisions:
            pipe.hdel(ROUTES, rev)
            pipe.hdel(COLD_STARTS, rev)
            pipe.srem(READY_REVISIONS, rev)
        removed, *_ = await pipe.execute()
        return bool(removed)

    # ---- revisions ----------------------------------------------------------------------

    async def put_service_with_revision(self, spec: ServiceSpec,
                                        revision: ServiceSpec | None,
                                        retired: list[str]) -> None:
        """The service, its new revision and its retired ones, in one transaction: a
        service never names a revision that is not stored."""
        pipe = self.r.pipeline(transaction=True)
        if revision is not None:
            pipe.hset(REVISIONS + spec.name, revision.name, encode_record(revision))
        for rev in retired:
            pipe.hdel(REVISIONS + spec.name, rev)
            pipe.hdel(ROUTES, rev)
            pipe.hdel(COLD_STARTS, rev)
            pipe.srem(READY_REVISIONS, rev)
        pipe.hset(SERVICES, spec.name, encode_record(spec))
        await pipe.execute()

    async def get_revisions(self, service: str) -> dict[str, ServiceSpec]:
        raw = await self.r.hgetall(REVISIONS + service)
        return {k.decode(): decode_record(v, ServiceSpec) for k, v in raw.items()}

    async def get_revision(self, service: str, revision: str) -> ServiceSpec | None:
        raw = await self.r.hget(REVISIONS + service, revision)
        return decode_record(raw, ServiceSpec) if raw else None

    async def mark_ready(self, revision: str) -> None:
        await self.r.sadd(READY_REVISIONS, revision)

    async def ready_revisions(self, revisions: list[str]) -> set[str]:
        if not revisions:
            return set()
        flags = await self.r.smismember(READY_REVISIONS, revisions)
        return {r for r, f in zip(revisions, flags, strict=True) if f}

    # ---- partition map -------------------------------------------------------------------

    async def put_partition_map(self, pmap: PartitionMap) -> None:
        ok = await self._cas_map(keys=[PARTITIONS], args=[pmap.version, encode_record(pmap)])
        if not ok:
            raise StaleWrite(f"partition map version {pmap.version} is not newer than stored")

    async def get_partition_map(self) -> PartitionMap | None:
        raw = await self.r.hget(PARTITIONS, "map")
        return decode_record(raw, PartitionMap) if raw else None

    async def put_shard_map(self, smap: ShardMap) -> None:
        """Kept so a restarted coordinator goes on from the epochs fences already know."""
        await self.r.set(SHARD_MAP, encode_record(smap))

    async def get_shard_map(self) -> ShardMap | None:
        raw = await self.r.get(SHARD_MAP)
        return decode_record(raw, ShardMap) if raw else None

    # ---- routing snapshot and cold starts ------------------------------------------------

    async def put_endpoints(self, eps: Endpoints) -> None:
        await self.r.hset(ROUTES, eps.service, encode_record(eps))

    async def get_routes(self) -> list[Endpoints]:
        raw = await self.r.hgetall(ROUTES)
        return [decode_record(v, Endpoints) for v in raw.values()]

    async def put_cold_start(self, cs: ColdStart) -> None:
        await self.r.hset(COLD_STARTS, cs.service, encode_record(cs))

    async def get_cold_start(self, name: str) -> ColdStart | None:
        raw = await self.r.hget(COLD_STARTS, name)
        return decode_record(raw, ColdStart) if raw else None

    # ---- API keys and their rate limits (kernel/apikeys.py, kernel/tokenbucket.py) --------

    async def put_key(self, stored: StoredKey) -> None:
        await self.r.hset(API_KEYS, stored.key.id, encode_record(stored))

    async def get_key(self, key_id: str) -> StoredKey | None:
        raw = await self.r.hget(API_KEYS, key_id)
        return decode_record(raw, StoredKey) if raw else None

    async def list_keys(self) -> list[ApiKey]:
        raw = await self.r.hgetall(API_KEYS)
        keys = (decode_record(v, StoredKey).key for v in raw.values())
        return sorted(keys, key=lambda k: (k.service, k.created_at, k.id))

    async def take_token(self, key_id: str, *, rps: float, burst: int, now: float) -> float:
        """One request against the key's shared bucket: how long it must wait (0: go)."""
        wait = await self._take_token(keys=[BUCKET.format(key_id)],
                                      args=[repr(rps), burst, f"{now:.6f}"])
        return float(wait)
