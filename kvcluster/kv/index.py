"""The Redis index of which cache store holds which KV block, shared by every service.

Key schema (namespace `ns`, default "kvc"; hashes as 32 lowercase hex digits):

    {ns}:blk:{hash}             HASH  store_id -> epoch       the stores holding the block
    {ns}:entries:{store}:{ep}   SET   hash, ...               what `store` indexed in epoch `ep`
    {ns}:epochs:{store}         SET   ep, ...                 epochs that may still own entries
    {ns}:epoch:{store}          STR   counter (INCR)          the store's latest epoch
    {ns}:alive:{store}          STR   current epoch, PX ttl   heartbeat; gone = store is dead
    {ns}:store:{store}          HASH  address, epoch, layout, fingerprint
                                                              how to reach the store, what it holds
    {ns}:stores                 SET   store_id, ...           every store registered and not collected
    {ns}:gc                     STR   lock, PX                one collector of dead stores at a time
    {ns}:events                 STREAM m, e, op, h            KV events: member, epoch, add|remove, hex hashes
                                                              (capped at EVENTS_MAXLEN; gateway.prefix_follower)

Workers use the same machinery under their own namespaces (`worker_namespace`: `{ns}:decode`,
`{ns}:prefill`): a member there is a worker, `{ns}:decode:blk:{hash}` says which decode workers'
local prefix caches hold a block, and the member's HASH also carries its load (running, waiting,
free_blocks), refreshed with each heartbeat. `held_prefix` counts, per worker, the leading blocks of
a prompt it holds (one round trip), which is what the gateway routes by.

Rules. A store is the only writer of its own fields and keys. On start it INCRs its epoch, sets
its heartbeat key, then deletes the entries of every older epoch in batches. An entry counts only
while `{ns}:alive:{store}` exists and equals the entry's epoch, so readers ignore both dead stores
(heartbeat expired) and leftovers of a store's earlier life; live stores periodically collect
the entries and registration of stores dead for longer than a grace period. `lookup` is one Lua script: for N
chained hashes it returns the longest prefix whose every block has a live holder, preferring the
previous block's holder so runs stay long, plus each holder's address. Scripts use only Redis 2.6+
commands (HGETALL, HMGET, GET, HGET, HDEL, SREM, PEXPIRE), so Redis 6.2 and 7 both work. The scripts read
keys they are not passed, which a single Redis instance allows.

On Redis Cluster (`redis+cluster://HOST:PORT[,HOST:PORT...]`, redis-py's `RedisCluster`) a script
runs on one node, so there the readers are batched reads instead, one round trip per shard each
(`_shard_reads`: a `_SHARD_READ` script on Redis 7+, every shard asked at once; a pipeline before): `lookup` is two (the blocks'
holders, then those holders' heartbeats and addresses), `held_prefix` one, `live_stores` two, with
the same choice rules as the scripts. Block keys spread
over the shards by their hash; a member's own keys (`alive`, `store`, `epoch`, `epochs`, `entries`)
carry the member id as a hash tag (`{ns}:alive:{{store}}`), so they share one slot and its
collection stays atomic. A conditional removal there reads the entries' epochs and then deletes the
matching ones (two pipelines, not atomic): a race with a re-registration can drop a fresh entry,
which costs a hit, never a wrong block (a store serves only what it holds, checksummed).
When a master dies, a request for its slots meets a refused or broken connection: redis-py's
`RedisCluster` then re-reads the slot map from another node and retries once (`Retry(NoBackoff(), 1)`,
which replaces `cluster_error_retry_attempts`), so until the replica is promoted such a call fails fast
as Unavailable (its callers fall back to recompute; calls that touch only other shards still work) and the first call
after the promotion finds the new master (docs/redis_modes.md).

Where Redis lives (`redis_client`): `redis://` / `rediss://` / `unix://` is one instance; a
`redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]` URL asks those Sentinels for the
primary of SERVICE and follows a failover (redis-py's `Sentinel.master_for`): a request that meets
the dead primary fails as Unavailable (its callers fall back to recompute) and the next connection
goes to the promoted replica. PASSWORD is the data nodes' (Sentinels themselves without one).
"""

import functools
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import ParamSpec, TypeVar

import redis
import xxhash
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from kvcluster.errors import Unavailable

BATCH = 512  # entries per round trip when publishing or removing
EVENTS_MAXLEN = 10_000  # KV events kept in {ns}:events (about; a follower further behind re-reads the entries sets).
# An event carries up to BATCH hashes (16 KiB of hex): the cap bounds the stream at ~160 MiB worst case, ~1 MiB
# for a decode worker's usual few-block events.

_LOOKUP = """
local ns, live, holders, previous = ARGV[1], {}, {}, false
for i = 1, #KEYS do
  local fields, chosen = redis.call('HGETALL', KEYS[i]), false
  for j = 1, #fields, 2 do
    local sid = fields[j]
    if live[sid] == nil then live[sid] = redis.call('GET', ns .. ':alive:' .. sid) end
    if live[sid] == fields[j + 1] then
      chosen = sid
      if sid == previous then break end
    end
  end
  if not chosen then break end
  holders[i], previous = chosen, chosen
end
local addresses, seen = {}, {}
for _, sid in ipairs(holders) do
  if not seen[sid] then
    seen[sid] = true
    addresses[#addresses + 1] = sid
    addresses[#addresses + 1] = redis.call('HGET', ns .. ':store:' .. sid, 'address') or ''
  end
end
return {holders, addresses}
"""

# KEYS: block keys; ARGV: ns, store, epoch, hex hashes (same order as KEYS).
_REMOVE = """
local ns, sid, epoch = ARGV[1], ARGV[2], ARGV[3]
local removed = 0
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], sid) == epoch then
    redis.call('HDEL', KEYS[i], sid)
    removed = removed + 1
  end
  redis.call('SREM', ns .. ':entries:' .. sid .. ':' .. epoch, ARGV[i + 3])
end
return removed
"""

_LIVE_STORES = """
local ns, result = ARGV[1], {}
for _, sid in ipairs(redis.call('SMEMBERS', ns .. ':stores')) do
  local epoch = redis.call('GET', ns .. ':alive:' .. sid)
  if epoch then
    result[#result + 1] = sid
    result[#result + 1] = epoch
    local info = redis.call('HMGET', ns .. ':store:' .. sid, 'address', 'layout', 'fingerprint')
    result[#result + 1] = info[1] or ''
    result[#result + 1] = info[2] or ''
    result[#result + 1] = info[3] or ''
  end
end
return result
"""

# KEYS: block keys of a prompt, in order; ARGV: ns, then member id and epoch pairs. Per member, how
# many leading blocks its live epoch holds (0 when its heartbeat is gone or belongs to another epoch).
_HELD_PREFIX = """
local ns, counts = ARGV[1], {}
for m = 2, #ARGV, 2 do
  local sid, epoch, n = ARGV[m], ARGV[m + 1], 0
  local live = redis.call('GET', ns .. ':alive:' .. sid) == epoch
  for i = 1, (live and #KEYS or 0) do
    if redis.call('HGET', KEYS[i], sid) ~= epoch then break end
    n = n + 1
  end
  counts[#counts + 1] = n
end
return counts
"""

# KEYS: heartbeat key. ARGV: epoch, ttl ms. 1 = refreshed; 0 = gone or taken by another epoch.
_HEARTBEAT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: heartbeat key, registration (one slot). Deletes the registration if the heartbeat is gone.
_FORGET = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: heartbeat key. ARGV: epoch. Deletes it only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Redis Cluster, Redis 7+: one read command on keys of several slots of the node it runs on (undeclared
# keys, which `allow-cross-slot-keys` permits). ARGV: n, command, key 1..n, the command's other args.
_SHARD_READ = """#!lua flags=no-writes,allow-cross-slot-keys
local n, replies = tonumber(ARGV[1]), {}
for i = 1, n do replies[i] = redis.call(ARGV[2], ARGV[2 + i], unpack(ARGV, 3 + n)) end
return replies
"""


@dataclass(frozen=True)
class StoreRef:
    """A live store as the index knows it, with the KV it holds (as published at registration)."""

    store_id: str
    address: str
    epoch: int = 0
    layout: str = ""        # canonical KV layout of its pool (KVLayout.canonical())
    fingerprint: str = ""   # hex fingerprint it accepts exclusively; "" = any

    def accepts(self, layout: str, fingerprint: bytes) -> bool:
        """Whether this store takes blocks of `layout` computed under `fingerprint`."""
        return self.layout == layout and self.fingerprint in ("", fingerprint.hex())

    def describe(self) -> str:
        only = f", fingerprint {self.fingerprint} only" if self.fingerprint else ""
        return f"store {self.store_id} at {self.address} holds {self.layout or 'an unpublished layout'}{only}"


@dataclass(frozen=True)
class Run:
    """Consecutive blocks [start, end) held by one store: one PullBlocks call."""

    start: int
    end: int
    store: StoreRef


P = ParamSpec("P")
R = TypeVar("R")


def _unavailable_on_redis_error(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (redis.RedisError, RedisClusterException) as exc:
            raise Unavailable(f"Redis index: {exc}") from exc
    return wrapper


WORKER_KINDS = ("decode", "prefill")
LOAD_FIELDS = ("running", "waiting", "free_blocks", "queued_tokens", "host_id")
# A worker's numerics mode and whether exactness holds on it (kvcluster.worker.numerics), for /health.
NUMERICS_FIELDS = ("numerics", "exactness_guaranteed")
# A worker's KV block size in tokens, a field of its own (the gateway hashes prompts with it; never parsed
# out of the layout text).
LAYOUT_FIELDS = ("block_size",)
# A worker's kvcluster.model.tokenizer.tokenizer_fingerprint: the gateway sends a prompt as the token ids
# it computed only to a worker that would have computed the same ids from its text.
TOKENIZER_FIELDS = ("tokenizer_fingerprint",)


SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
# Keys owned by one member (the part after the kind is its id): hash-tagged on Redis Cluster.
MEMBER_KEYS = frozenset(("alive", "store", "epoch", "epochs", "entries"))


def redis_client(url: str, timeout_s: float = 1.0) -> redis.Redis | RedisCluster:
    """A client for `url`: one instance, the current primary behind Sentinels, or a Redis Cluster
    (module docstring). One fast retry covers a pooled connection broken by a restart or a
    failover; more would stall request paths that should fall back to recompute instead."""
    options = dict(decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    scheme, sep, rest = url.partition("://")
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), **options)
    credentials, _, location = rest.rpartition("@")
    password = credentials.partition(":")[2] or None
    hosts, _, path = location.partition("/")
    service, _, db = path.partition("/")
    if scheme == CLUSTER_SCHEME:
        if not sep or not hosts or path:
            raise ValueError(f"a Redis Cluster URL is {CLUSTER_SCHEME}://[:PASSWORD@]HOST:PORT[,HOST:PORT...], got {url!r}")
        nodes = [ClusterNode(host, port) for host, port in _host_ports(hosts, url)]
        return RedisCluster(startup_nodes=nodes, password=password, retry=Retry(NoBackoff(), 1), **options)
    if not sep or not hosts or not service:
        raise ValueError(f"a Sentinel URL is {SENTINEL_SCHEME}://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB], "
                         f"got {url!r}")
    sentinel = Sentinel(_host_ports(hosts, url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    return sentinel.master_for(service, password=password, db=int(db or 0), retry=Retry(NoBackoff(), 1), **options)


def _host_ports(hosts: str, url: str) -> list[tuple[str, int]]:
    pairs = []
    for host_port in hosts.split(","):
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"address must be HOST:PORT, got {host_port!r} in {url!r}")
        pairs.append((host, int(port)))
    return pairs


def worker_namespace(namespace: str, kind: str) -> str:
    """The index namespace in which workers of `kind` (decode, prefill) register."""
    if kind not in WORKER_KINDS:
        raise ValueError(f"worker kind must be one of {WORKER_KINDS}, got {kind!r}")
    return f"{namespace}:{kind}"


def pick_store(block_hash: bytes, stores: Sequence[StoreRef]) -> StoreRef:
    """Rendezvous hashing: the live store with the highest score for this block. Adding or losing
    a store moves only the blocks that store wins or held."""
    if not stores:
        raise Unavailable("no live cache store to place a block on")
    return max(stores, key=lambda store: _rendezvous_score(block_hash, store))


def rendezvous_order(block_hash: bytes, stores: Sequence[StoreRef]) -> list[StoreRef]:
    """`stores` in this block's rendezvous order, pick_store's choice first: where its copies go."""
    return sorted(stores, key=lambda store: _rendezvous_score(block_hash, store), reverse=True)


def _rendezvous_score(block_hash: bytes, store: StoreRef) -> int:
    return xxhash.xxh3_64_intdigest(store.store_id.encode() + block_hash)


def group_runs(holders: Sequence[StoreRef]) -> list[Run]:
    """Split a lookup's holders into runs of consecutive blocks on the same store."""
    runs, start = [], 0
    for store, members in groupby(holders, key=lambda ref: ref.store_id):
        count = len(list(members))
        runs.append(Run(start, start + count, holders[start]))
        start += count
    return runs


class RedisIndex:
    """Client of the index. Readers use `lookup` and `live_stores`; a store uses the rest for its
    own entries only. Every Redis failure surfaces as kvcluster.errors.Unavailable."""

    def __init__(self, url: str, namespace: str = "kvc", timeout_s: float = 1.0, kv_events: bool = False):
        """`kv_events`: also append this client's entry writes to `{ns}:events`, for followers
        (decode workers, whose registry the gateway may mirror: `--routing-index local`). Stores
        and prefill workers leave it off: nobody follows their events."""
        self.redis = redis_client(url, timeout_s)
        self.cluster = isinstance(self.redis, RedisCluster)
        self.ns = namespace
        self.kv_events = kv_events
        self._lookup = self.redis.register_script(_LOOKUP)
        self._remove = self.redis.register_script(_REMOVE)
        self._live_stores = self.redis.register_script(_LIVE_STORES)
        self._heartbeat = self.redis.register_script(_HEARTBEAT)
        self._release = self.redis.register_script(_RELEASE)
        self._held_prefix = self.redis.register_script(_HELD_PREFIX)
        self._forget = self.redis.register_script(_FORGET)
        self._shard_read, self._shard_scripts = self.redis.register_script(_SHARD_READ), self.cluster

    def key(self, *parts: object) -> str:
        if self.cluster and parts[0] in MEMBER_KEYS:  # one slot per member: {id} is its hash tag
            parts = (parts[0], f"{{{parts[1]}}}", *parts[2:])
        return ":".join((self.ns, *map(str, parts)))

    def close(self) -> None:
        self.redis.close()

    # ---- readers ---------------------------------------------------------------------------

    @_unavailable_on_redis_error
    def lookup(self, block_hashes: Sequence[bytes]) -> list[StoreRef]:
        """Holders of the longest indexed prefix of `block_hashes` (one round trip)."""
        if not block_hashes:
            return []
        keys = [self.key("blk", h.hex()) for h in block_hashes]
        if self.cluster:
            holders, addresses = self._cluster_lookup(keys)
        else:
            holders, flat_addresses = self._lookup(keys=keys, args=[self.ns])
            addresses = dict(zip(flat_addresses[::2], flat_addresses[1::2]))
        stores = {sid: StoreRef(sid, address) for sid, address in addresses.items()}
        return [stores[sid] for sid in holders]

    @_unavailable_on_redis_error
    def live_stores(self) -> list[StoreRef]:
        flat = self._cluster_live_stores() if self.cluster else self._live_stores(args=[self.ns])
        stores = [StoreRef(flat[i], flat[i + 2], int(flat[i + 1]), flat[i + 3], flat[i + 4])
                  for i in range(0, len(flat), 5)]
        return sorted(stores, key=lambda store: store.store_id)

    @_unavailable_on_redis_error
    def live_holders(self, block_hashes: Sequence[bytes]) -> list[set[str]]:
        """Per block, the ids of the live stores holding it (two round trips; pipelines, so the same
        on one instance and on Redis Cluster)."""
        if not block_hashes:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for block_hash in block_hashes:
            pipe.hgetall(self.key("blk", block_hash.hex()))
        fields = pipe.execute()
        sids = sorted({sid for block in fields for sid in block})
        live = dict(zip(sids, self._alive(sids)))
        return [{sid for sid, epoch in block.items() if live[sid] == epoch} for block in fields]

    @_unavailable_on_redis_error
    def held_prefix(self, block_hashes: Sequence[bytes], members: Sequence[StoreRef]) -> list[int]:
        """For each member, how many leading `block_hashes` its current epoch holds (one round trip; on Redis
        Cluster one per shard)."""
        if not block_hashes or not members:
            return [0] * len(members)
        keys = [self.key("blk", h.hex()) for h in block_hashes]
        if self.cluster:
            return self._cluster_held_prefix(keys, members)
        pairs = [x for m in members for x in (m.store_id, m.epoch)]
        return [int(n) for n in self._held_prefix(keys=keys, args=[self.ns, *pairs])]

    # The scripts' rules as pipelines, for Redis Cluster (module docstring).

    def _alive(self, store_ids: Sequence[str], *info_fields: str) -> list:
        """Per id: its heartbeat's epoch (None = dead), then `info_fields` of its registration."""
        reads = []
        for sid in store_ids:
            reads.append(("get", self.key("alive", sid)))
            if info_fields:
                reads.append(("hmget", self.key("store", sid), list(info_fields)))
        return self._shard_reads(reads)

    def _shard_reads(self, reads: Sequence[tuple]) -> list:
        """Replies to `reads` ((method, key, *args), in order), one round trip per shard and command,
        routed by the slot map redis-py holds: a `_SHARD_READ` script call (Redis 7+; the shards asked
        at once), else a plain pipeline. redis-py's own cluster pipeline routes each command through
        its policy machinery, ~50 us of Python per command: 8x one Redis's script for 1024 hashes
        (bench/index_latency.py). On any error (a slot moved, a dead master) the slot map is read
        again and redis-py's pipeline runs the reads with its redirections and retry. On one instance
        (or behind Sentinels) it is that one pipeline."""
        if self.cluster:
            try:
                return self._reads_by_shard(reads)
            except (redis.RedisError, RedisClusterException):
                self.redis.nodes_manager.initialize()
        pipe = self.redis.pipeline(transaction=False)
        for method, *args in reads:
            getattr(pipe, method)(*args)
        return pipe.execute()

    def _reads_by_shard(self, reads: Sequence[tuple]) -> list:
        groups: dict[tuple, tuple] = {}
        for i, (method, key, *args) in enumerate(reads):
            node = self.redis.get_node_from_key(key)
            extra = tuple(a for arg in args for a in (arg if isinstance(arg, list) else [arg]))
            groups.setdefault((node.name, method, extra), (node, []))[1].append(i)
        calls = [(node, method, [reads[i][1] for i in positions], extra)
                 for (_, method, extra), (node, positions) in groups.items()]
        answers = None
        if self._shard_scripts:
            try:
                answers = self._scripts_on_shards(calls)
            except redis.ResponseError as exc:
                if "compiling" not in str(exc):
                    raise
                self._shard_scripts = False  # Redis < 7 knows no script flags: pipelines from now on
        scripted = answers is not None  # a script's HGETALL replies are flat lists, a pipeline's dicts
        if not scripted:
            answers = [self._pipeline_on(node, method, keys, extra) for node, method, keys, extra in calls]
        replies: list = [None] * len(reads)
        for ((_, method, _extra), (_node, positions)), answer in zip(groups.items(), answers):
            if method == "hgetall" and scripted:
                answer = [dict(zip(r[::2], r[1::2])) for r in answer]
            for i, reply in zip(positions, answer):
                replies[i] = reply
        return replies

    def _scripts_on_shards(self, calls: list[tuple]) -> list:
        """One `_SHARD_READ` call per (node, method, keys, extra), every one sent before any reply is
        read, so the shards work at once: the round trips overlap."""
        held = []
        try:
            for node, method, keys, extra in calls:
                pool = self.redis.get_redis_connection(node).connection_pool
                held.append((pool, pool.get_connection()))
                held[-1][1].send_command("EVALSHA", self._shard_read.sha, 0, len(keys), method, *keys, *extra)
            answers = []
            for (_, connection), (node, method, keys, extra) in zip(held, calls):
                try:
                    answers.append(connection.read_response())
                except redis.exceptions.NoScriptError:  # first use on this node: load it, call again
                    answers.append(self._shard_read(args=[len(keys), method, *keys, *extra],
                                                    client=self.redis.get_redis_connection(node)))
            return answers
        except BaseException:
            for _, connection in held:  # replies may be left unread on them
                connection.disconnect()
            raise
        finally:
            for pool, connection in held:
                pool.release(connection)

    def _pipeline_on(self, node, method: str, keys: list[str], extra: tuple) -> list:
        pipe = self.redis.get_redis_connection(node).pipeline(transaction=False)
        for key in keys:
            getattr(pipe, method)(key, *extra)
        return pipe.execute()

    def _cluster_lookup(self, keys: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        fields = self._shard_reads([("hgetall", key) for key in keys])
        sids = sorted({sid for block in fields for sid in block})
        replies = self._alive(sids, "address")
        live = {sid: replies[2 * i] for i, sid in enumerate(sids)}
        addresses = {sid: replies[2 * i + 1][0] or "" for i, sid in enumerate(sids)}
        holders, previous = [], None
        for block in fields:
            chosen = None
            for sid, epoch in block.items():
                if live[sid] == epoch:
                    chosen = sid
                    if sid == previous:
                        break
            if chosen is None:
                break
            holders.append(chosen)
            previous = chosen
        return holders, {sid: addresses[sid] for sid in set(holders)}

    def _cluster_live_stores(self) -> list[str]:
        sids = sorted(self.redis.smembers(self.key("stores")))
        replies, flat = self._alive(sids, "address", "layout", "fingerprint"), []
        for i, sid in enumerate(sids):
            epoch, info = replies[2 * i], replies[2 * i + 1]
            if epoch is not None:
                flat += [sid, epoch, *(value or "" for value in info)]
        return flat

    def _cluster_held_prefix(self, keys: Sequence[str], members: Sequence[StoreRef]) -> list[int]:
        ids = [m.store_id for m in members]
        replies = self._shard_reads([("get", self.key("alive", sid)) for sid in ids]
                                    + [("hmget", key, ids) for key in keys])
        alive, blocks = replies[:len(ids)], replies[len(ids):]
        counts = []
        for j, member in enumerate(members):
            n, epoch = 0, str(member.epoch)
            if alive[j] == epoch:
                for held in blocks:
                    if held[j] != epoch:
                        break
                    n += 1
            counts.append(n)
        return counts

    @_unavailable_on_redis_error
    def member_fields(self, member_ids: Sequence[str], fields: Sequence[str] = LOAD_FIELDS) -> list[dict[str, str]]:
        """`fields` of each member's registration (missing ones absent), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for member_id in member_ids:
            pipe.hmget(self.key("store", member_id), list(fields))
        return [{f: v for f, v in zip(fields, values) if v is not None} for values in pipe.execute()]

    # ---- a store's own entries ------------------------------------------------------------

    @_unavailable_on_redis_error
    def register(self, store_id: str, address: str, ttl_s: float, layout: str = "", fingerprint: str = "") -> int:
        """Take a new epoch, announce the store and what it holds, then drop every older epoch's entries."""
        epoch = int(self.redis.incr(self.key("epoch", store_id)))
        pipe = self.redis.pipeline(transaction=not self.cluster)  # the heartbeat key last: readers need it
        pipe.hset(self.key("store", store_id), mapping={"address": address, "epoch": epoch, "layout": layout,
                                                        "fingerprint": fingerprint})
        pipe.sadd(self.key("stores"), store_id)
        pipe.sadd(self.key("epochs", store_id), epoch)
        pipe.set(self.key("alive", store_id), epoch, px=_ms(ttl_s))
        pipe.execute()
        for old in self.redis.smembers(self.key("epochs", store_id)):
            if int(old) != epoch:
                self._drop_epoch(store_id, int(old))
        return epoch

    @_unavailable_on_redis_error
    def publish_load(self, store_id: str, load: dict[str, int | str]) -> None:
        """Add or refresh fields of this member's registration (a worker's load and numerics)."""
        self.redis.hset(self.key("store", store_id), mapping=load)

    @_unavailable_on_redis_error
    def heartbeat(self, store_id: str, epoch: int, ttl_s: float) -> bool:
        """Refresh the TTL. False when the key expired or was taken: the store must re-register."""
        return bool(self._heartbeat(keys=[self.key("alive", store_id)], args=[epoch, _ms(ttl_s)]))

    @_unavailable_on_redis_error
    def add_entries(self, store_id: str, epoch: int, block_hashes: Sequence[bytes]) -> None:
        for start in range(0, len(block_hashes), BATCH):
            hexes = [h.hex() for h in block_hashes[start:start + BATCH]]
            pipe = self.redis.pipeline(transaction=False)
            for hex_hash in hexes:
                pipe.hset(self.key("blk", hex_hash), store_id, epoch)
            pipe.sadd(self.key("entries", store_id, epoch), *hexes)
            self._event(pipe, store_id, epoch, "add", hexes)
            pipe.execute()

    @_unavailable_on_redis_error
    def remove_entries(self, store_id: str, epoch: int, block_hashes: Sequence[bytes]) -> int:
        """Remove this store's entries for `block_hashes` (only those of `epoch`); count removed."""
        return self._remove_hexes(store_id, epoch, [h.hex() for h in block_hashes])

    @_unavailable_on_redis_error
    def deregister(self, store_id: str, epoch: int) -> None:
        """Graceful stop: readers ignore the store at once, then its entries are removed."""
        self._release(keys=[self.key("alive", store_id)], args=[epoch])
        self._drop_epoch(store_id, epoch)

    @_unavailable_on_redis_error
    def collect_dead_stores(self, grace_s: float, lock_s: float = 30.0) -> list[str]:
        """Remove every trace of stores whose heartbeat has been gone for `grace_s`: their entries
        (readers already ignore them, but they would stay in Redis forever) and registration.
        A store's first sighting as dead stamps `dead_since`; a store that comes back clears it.
        Any live store may run this (one at a time, under a lock key); for a store that re-registers
        meanwhile only epochs older than its new one are dropped, and its registration stays."""
        lock, token = self.key("gc"), secrets.token_hex(8)
        if not self.redis.set(lock, token, nx=True, px=_ms(lock_s)):
            return []  # another store is collecting
        try:
            now_ms = _redis_ms(self.redis.time())
            return [store_id for store_id in self.redis.smembers(self.key("stores"))
                    if self._collect_if_dead(store_id, now_ms, _ms(grace_s))]
        finally:
            self._release(keys=[lock], args=[token])

    def _collect_if_dead(self, store_id: str, now_ms: int, grace_ms: int) -> bool:
        info, alive = self.key("store", store_id), self.key("alive", store_id)
        latest = int(self.redis.get(self.key("epoch", store_id)) or 0)
        if self.redis.exists(alive):
            self.redis.hdel(info, "dead_since")
            return False
        dead_since = self.redis.hget(info, "dead_since")
        if dead_since is None:
            self.redis.hset(info, "dead_since", now_ms)
            return False
        if now_ms - int(dead_since) < grace_ms:
            return False
        for epoch in self.redis.smembers(self.key("epochs", store_id)):
            if int(epoch) <= latest:  # a re-registration meanwhile took a newer epoch: keep that one
                self._drop_epoch(store_id, int(epoch))
        if self.cluster:  # alive and info share the member's slot; the stores set is elsewhere
            if not self._forget(keys=[alive, info]):
                return False
            self.redis.srem(self.key("stores"), store_id)
            if self.redis.exists(alive):  # it registered again meanwhile: keep it listed
                self.redis.sadd(self.key("stores"), store_id)
            return True
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(alive)
                if pipe.exists(alive):
                    return False
                pipe.multi()
                pipe.delete(info)
                pipe.srem(self.key("stores"), store_id)
                pipe.execute()
            except redis.WatchError:  # it came back this very moment
                return False
        return True

    def _remove_hexes(self, store_id: str, epoch: int, hexes: Sequence[str]) -> int:
        removed = 0
        for start in range(0, len(hexes), BATCH):
            batch = hexes[start:start + BATCH]
            keys = [self.key("blk", hex_hash) for hex_hash in batch]
            if self.cluster:
                removed += self._cluster_remove(keys, store_id, epoch, batch)
            else:
                removed += self._remove(keys=keys, args=[self.ns, store_id, epoch, *batch])
            self._event(self.redis, store_id, epoch, "remove", batch)
        return removed

    def _cluster_remove(self, keys: Sequence[str], store_id: str, epoch: int, hexes: Sequence[str]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, store_id)
        mine = [key for key, held in zip(keys, pipe.execute()) if held == str(epoch)]
        pipe = self.redis.pipeline(transaction=False)
        for key in mine:
            pipe.hdel(key, store_id)
        pipe.srem(self.key("entries", store_id, epoch), *hexes)
        return sum(pipe.execute()[:-1])

    def _event(self, client, store_id: str, epoch: int, op: str, hexes: Sequence[str]) -> None:
        if not self.kv_events:
            return
        client.xadd(self.key("events"), {"m": store_id, "e": epoch, "op": op, "h": "".join(hexes)},
                    maxlen=EVENTS_MAXLEN, approximate=True)

    # ---- followers of the KV events (gateway.prefix_follower) -------------------------------

    @_unavailable_on_redis_error
    def events_position(self) -> tuple[str, str]:
        """(id of the oldest event kept, id of the newest); "0-0" for both when there are none."""
        first = self.redis.xrange(self.key("events"), count=1)
        last = self.redis.xrevrange(self.key("events"), count=1)
        return (first[0][0] if first else "0-0"), (last[0][0] if last else "0-0")

    @_unavailable_on_redis_error
    def read_events(self, after_id: str, count: int = 1000) -> list[tuple[str, str, int, str, list[bytes]]]:
        """Up to `count` events after `after_id`: (id, member, epoch, add|remove, hashes)."""
        reply = self.redis.xread({self.key("events"): after_id}, count=count)
        entries = reply[0][1] if reply else []
        return [(event_id, f["m"], int(f["e"]), f["op"], [bytes.fromhex(f["h"][i:i + 32]) for i in range(0, len(f["h"]), 32)])
                for event_id, f in entries]

    @_unavailable_on_redis_error
    def member_entries(self, store_id: str, epoch: int) -> list[bytes]:
        """Every hash `store_id` indexed in `epoch` (a follower's snapshot)."""
        return [bytes.fromhex(h) for h in self.redis.sscan_iter(self.key("entries", store_id, epoch), count=4096)]

    def _drop_epoch(self, store_id: str, epoch: int) -> None:
        entries = self.key("entries", store_id, epoch)
        while batch := self.redis.spop(entries, BATCH):
            self._remove_hexes(store_id, epoch, batch)
        self.redis.srem(self.key("epochs", store_id), epoch)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _redis_ms(time_reply: tuple[int, int]) -> int:
    """Redis TIME (seconds, microseconds) in ms: every store compares against the one clock."""
    seconds, micros = time_reply
    return int(seconds) * 1000 + int(micros) // 1000
