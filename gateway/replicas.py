"""The decode replicas the gateway can send work to: read from the Redis registry (or a fixed list),
each with a grpc.aio channel, its published load and the gateway's own count of open calls.

A replica leaves the rotation when its heartbeat key expires (the registry stops listing it) or,
at once, when a call to it failed with UNAVAILABLE (`suspect`), until `suspect_seconds` pass or it
registers again under a new epoch (a restart).
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from gateway.config import GatewayConfig
from kvcluster.kv.index import (LAYOUT_FIELDS, LOAD_FIELDS, NUMERICS_FIELDS, TOKENIZER_FIELDS, RedisIndex, StoreRef,
                                worker_namespace)
from kvcluster.kv.membership import Membership, published_load
from kvcluster.proto import decode_pb2, decode_pb2_grpc
from kvcluster.rpc.plumbing import channel_options

log = logging.getLogger(__name__)


@dataclass
class Replica:
    """One decode replica as the gateway sees it."""

    member: StoreRef                   # id, address, epoch, layout, fingerprint (hex) as registered
    stub: decode_pb2_grpc.DecodeServiceStub
    channel: grpc.aio.Channel
    published: dict = field(default_factory=dict)  # load, numerics, block size, tokenizer at its last heartbeat
    open_calls: int = 0                # Generate calls of this gateway to it now
    queued_prefill_tokens: int = 0     # uncached prompt tokens of those calls not past their first token
    suspect_until: float = 0.0         # monotonic; out of rotation before it

    @property
    def replica_id(self) -> str:
        return self.member.store_id

    @property
    def load(self) -> int:
        """Requests this gateway has open on it: exact and current, where the replica's own count is up to
        a heartbeat old (a request that just finished would still count). With several gateways each
        sees only its share; `published_load` then breaks ties."""
        return self.open_calls

    @property
    def published_load(self) -> int:
        """Sequences running and waiting on it at its last heartbeat (every client's)."""
        return published_load(self.published)

    @property
    def exactness_guaranteed(self) -> bool | None:
        """Whether its numerics make a cached or batched answer the cold one; None when it published
        nothing (a static target)."""
        value = self.published.get("exactness_guaranteed")
        return None if value is None else value == "true"

    @property
    def fingerprint(self) -> bytes:
        return bytes.fromhex(self.member.fingerprint)

    @property
    def tokenizer_fingerprint(self) -> str | None:
        """Its tokenizer's fingerprint (kvcluster.model.tokenizer), None when it published none (a static
        target, or a worker from before the field)."""
        return self.published.get("tokenizer_fingerprint") or None

    @property
    def block_size(self) -> int:
        """Tokens per KV block as it registered them (0 for a static target: it publishes nothing)."""
        return int(self.published.get("block_size", 0))


class ReplicaSet:
    """Live replicas by id. `refresh_from` (any thread) reads the registry; `apply` (the event loop's
    thread, which owns the channels) updates the set."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        static = config.static_targets()
        self.index = None if static or not config.redis_url else RedisIndex(
            config.redis_url, worker_namespace(config.index_namespace, "decode"))
        self.membership = (None if self.index is None else
                           Membership(self.index, fields=LOAD_FIELDS + NUMERICS_FIELDS + LAYOUT_FIELDS
                                                      + TOKENIZER_FIELDS))
        self.static = [StoreRef(f"static-{i}", target) for i, target in enumerate(static)]
        self.replicas: dict[str, Replica] = {}
        self._retired: list[Replica] = []  # gone from the registry; closed once no call of ours uses them
        self._kept_through_empty_listing = False

    def read_registry(self) -> list[tuple[StoreRef, dict]]:
        """Blocking: every live replica, its load and numerics (static targets have none)."""
        if self.membership is None:
            return [(member, {}) for member in self.static]
        return self.membership.refresh()

    def apply(self, listing: list[tuple[StoreRef, dict]]) -> None:
        """Make the rotation the registry's listing. An empty listing while replicas are in rotation
        is taken as the registry having lost its memory (a Redis failover or restart that dropped the
        heartbeats), not as every replica dying at once: the rotation stays until the registry lists
        any replica again. A replica that is really gone fails its calls and is suspected as usual."""
        if not listing and self.replicas:
            if not self._kept_through_empty_listing:
                log.warning("the registry lists no decode replica; keeping the %d in rotation until it lists any",
                            len(self.replicas))
            self._kept_through_empty_listing = True
            return
        self._kept_through_empty_listing = False
        seen = set()
        for member, load in listing:
            seen.add(member.store_id)
            replica = self.replicas.get(member.store_id)
            if replica is None or replica.member.address != member.address:
                if replica is not None:
                    self._retired.append(replica)
                replica = self.replicas[member.store_id] = self._connect(member)
                log.info("decode replica %s at %s joined the rotation", member.store_id, member.address)
            elif replica.member.epoch != member.epoch:
                replica.suspect_until = 0.0  # registered again: a restart
            replica.member = member
            replica.published = load
        for replica_id in set(self.replicas) - seen:
            log.info("decode replica %s left the rotation (heartbeat expired or deregistered)", replica_id)
            self._retired.append(self.replicas.pop(replica_id))
        self._close_retired()

    def up(self, exclude: set[str] = frozenset()) -> list[Replica]:
        now = time.monotonic()
        return [r for r in self.replicas.values() if r.suspect_until <= now and r.replica_id not in exclude]

    def suspect(self, replica: Replica) -> None:
        replica.suspect_until = time.monotonic() + self.config.suspect_seconds

    async def reset_prefix_caches(self, metadata, timeout_s: float) -> list[tuple[Replica, object]]:
        """ResetPrefixCache on every registered replica at once, suspects included (one back in rotation
        must not bring blocks the router no longer expects). Per replica its ResetPrefixCacheResponse,
        or the grpc.aio.AioRpcError it failed with (UNAVAILABLE, DEADLINE_EXCEEDED after `timeout_s`)."""
        async def reset(replica: Replica):
            try:
                return await replica.stub.ResetPrefixCache(decode_pb2.ResetPrefixCacheRequest(), timeout=timeout_s,
                                                           metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                return exc

        replicas = list(self.replicas.values())
        return list(zip(replicas, await asyncio.gather(*map(reset, replicas))))

    async def close(self) -> None:
        for replica in [*self.replicas.values(), *self._retired]:
            await replica.channel.close()
        self.replicas.clear()
        self._retired.clear()
        if self.index is not None:
            self.index.close()

    def _connect(self, member: StoreRef) -> Replica:
        credentials = self.config.channel_credentials()
        options = channel_options()
        channel = (grpc.aio.secure_channel(member.address, credentials, options=options) if credentials is not None
                   else grpc.aio.insecure_channel(member.address, options=options))
        return Replica(member, decode_pb2_grpc.DecodeServiceStub(channel), channel)

    def _close_retired(self) -> None:
        keep = []
        for replica in self._retired:
            if replica.open_calls:
                keep.append(replica)
            else:
                asyncio.ensure_future(replica.channel.close())
        self._retired = keep
