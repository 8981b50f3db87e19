"""The CacheStore gRPC servicer: PushBlocks, PullBlocks, Lookup and Stats over a StorePool.

Push: the stream opens with PushOpen (layout and fingerprint checked once for the whole
stream), then block chunks. Each complete block is checked (key, size, token count, checksum)
and stored, acknowledged as a duplicate, or rejected with its reason; a broken stream (truncated
block, chunk without header, oversize chunk) fails the call. A block becomes visible only once
fully received and verified, so nothing half-written is ever served.

Pull: pins the longest held prefix of the requested blocks, sends them (each re-verified
against its checksum first, on the very bytes sent), and ends with a PullSummary saying how many
were sent and why it stopped early. The bytes go as pre-encoded chunks on the gRPC stream, or,
when the client asks and the store has a bulk listener, raw over a ticketed TCP connection
(cache_store.bulk, docs/pull_path.md). Pins are released when the pull ends, fails, or the
client cancels, whichever way the bytes went.
"""

import itertools
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from cache_store.bulk import BulkListener
from cache_store.config import FINGERPRINT_BYTES, StoreConfig
from cache_store.counters import LockedCounters
from cache_store.pool import LeaseBudgetExceeded, StoredBlock, StorePool
from cache_store.replicator import HotReplicator
from cache_store.stream_watchdog import StreamWatchdog
from kvcluster.errors import IntegrityError, InvalidArgument
from kvcluster.kv.blocks import HASH_BYTES, checksum
from kvcluster.kv.wire import (block_key, check_chunk_limit, describe_key, encoded_block_chunks, key_ref,
                            layout_from_proto, layout_to_proto, pass_encoded, reassemble_blocks)
from kvcluster.proto import cache_pb2, cache_pb2_grpc, common_pb2

MAX_BLOCKS_PER_CALL = 4096     # block references one Pull or Lookup may name
MAX_REQUEST_KEY_CHARS = 256
READ_BATCH = 8                 # blocks read from the pool together when serving a pull
Status = cache_pb2.BlockPushResult.Status


@dataclass
class ServiceCounters(LockedCounters):
    """What the handlers did, read by cache_store.metrics. Updated through `add` (thread-safe)."""

    push_bytes: int = 0
    push_seconds: float = 0.0
    pull_bytes: int = 0
    pull_seconds: float = 0.0
    checksum_failures: int = 0
    blocks_stored: int = 0
    blocks_duplicate: int = 0
    blocks_rejected: int = 0
    bulk_pulls: int = 0           # pulls whose bytes went over a claimed bulk connection
    bulk_tickets_unused: int = 0  # bulk offers whose ticket expired, or whose call ended, unclaimed


@dataclass
class StoreIdentity:
    """How this store names itself (known once the port is bound) and its index epoch."""

    store_id: str = ""
    address: str = ""
    epoch: Callable[[], int] = lambda: 0


class CacheStoreServicer(cache_pb2_grpc.CacheStoreServicer):
    """Handlers only validate and translate; the pool does the work, the interceptor the errors."""

    def __init__(self, pool: StorePool, config: StoreConfig, identity: StoreIdentity,
                 counters: ServiceCounters, watchdog: StreamWatchdog, replicator: HotReplicator,
                 bulk: BulkListener | None = None):
        self.pool = pool
        self.replicator = replicator  # counts pulls per block, copies hot ones to a second store
        self.config = config
        self.identity = identity
        self.counters = counters
        self.watchdog = watchdog  # a stalled or endless stream cannot hold a handler thread and its pins
        self._owners = itertools.count()
        self.bulk = bulk  # None: pulls always stream over gRPC

    # ---- PushBlocks ------------------------------------------------------------------------

    def PushBlocks(self, request_iterator, context) -> cache_pb2.PushBlocksResponse:
        started = time.perf_counter()
        opening = next(request_iterator, None)
        if opening is None or opening.WhichOneof("item") != "open":
            raise InvalidArgument("open", "the first message of a push must be PushOpen")
        fingerprint, lease_s = self._check_open(opening.open)
        response = cache_pb2.PushBlocksResponse(store_id=self.identity.store_id)
        chunks = (_chunk_of(message) for message in request_iterator)
        received, pusher = 0, _peer_host(context)
        with self.watchdog.watch(context, "PushBlocks") as progressed:
            for header, payload in reassemble_blocks(chunks, self.pool.layout.block_nbytes):
                received += len(payload)
                response.results.append(self._push_one(header, payload, fingerprint, lease_s, pusher))
                progressed()
        statuses = [result.status for result in response.results]
        response.num_stored = statuses.count(Status.STORED)
        response.num_duplicate = statuses.count(Status.DUPLICATE)
        response.num_rejected = statuses.count(Status.REJECTED)
        self.counters.add(push_bytes=received, push_seconds=time.perf_counter() - started,
                          blocks_stored=response.num_stored, blocks_duplicate=response.num_duplicate,
                          blocks_rejected=response.num_rejected)
        self.replicator.received(context, response.num_stored)
        return response

    def _check_open(self, opening: cache_pb2.PushOpen) -> tuple[bytes, float]:
        fingerprint = _check_fingerprint(opening.fingerprint, "open.fingerprint")
        accepted = self.config.fingerprint_bytes
        if accepted and fingerprint != accepted:
            raise IntegrityError(f"open.fingerprint: this store accepts only {accepted.hex()}, "
                                 f"the push has {fingerprint.hex()}")
        theirs, ours = layout_from_proto(opening.layout), self.pool.layout
        if theirs != ours:
            raise IntegrityError(f"open.layout: this store holds {ours.canonical()}, the push has {theirs.canonical()}")
        if opening.lease_seconds > self.config.max_lease_seconds:
            raise InvalidArgument("open.lease_seconds", f"{opening.lease_seconds} exceeds the limit of "
                                  f"{self.config.max_lease_seconds:g}")
        return fingerprint, float(opening.lease_seconds or self.config.lease_seconds)

    def _push_one(self, header: common_pb2.BlockRef, payload: bytes, fingerprint: bytes,
                  lease_s: float, pusher: str) -> cache_pb2.BlockPushResult:
        key = block_key(header)
        result = cache_pb2.BlockPushResult(block=key_ref(key))
        try:
            self._check_block(key, header, payload)
            stored = self.pool.store(key, fingerprint, self._stamped(header), payload, lease_s, pusher)
            result.status = Status.STORED if stored else Status.DUPLICATE
        except (IntegrityError, InvalidArgument, LeaseBudgetExceeded) as exc:
            result.status, result.reason = Status.REJECTED, str(exc)
        return result

    def _check_block(self, key: bytes | str, header: common_pb2.BlockRef, payload: bytes) -> None:
        layout = self.pool.layout
        if isinstance(key, bytes) and len(key) != HASH_BYTES:
            raise InvalidArgument("block_hash", f"must be {HASH_BYTES} bytes, got {len(key)}")
        if isinstance(key, str) and not 0 < len(key) <= MAX_REQUEST_KEY_CHARS:
            raise InvalidArgument("request_key", f"must be 1 to {MAX_REQUEST_KEY_CHARS} characters")
        if len(payload) != layout.block_nbytes:
            raise IntegrityError(f"{describe_key(key)}: payload is {len(payload)} bytes, "
                                 f"the layout needs {layout.block_nbytes}")
        full = isinstance(key, bytes)
        if (full and header.num_tokens != layout.block_size) or not 0 < header.num_tokens <= layout.block_size:
            raise InvalidArgument("num_tokens", f"{header.num_tokens} is invalid: a full block has "
                                  f"{layout.block_size} tokens, a tail block 1 to {layout.block_size}")
        if len(header.token_ids) != header.num_tokens:
            raise InvalidArgument("token_ids", f"has {len(header.token_ids)} ids for {header.num_tokens} tokens")
        actual = checksum(payload)
        if actual != header.checksum:
            self.counters.add(checksum_failures=1)
            raise IntegrityError(f"{describe_key(key)}: checksum mismatch, header says "
                                 f"{header.checksum:#018x}, payload has {actual:#018x}")

    def _stamped(self, header: common_pb2.BlockRef) -> common_pb2.BlockRef:
        # A fresh message: keeping the pushed sub-message would keep its whole chunk (and its
        # up to 1 MiB of data) alive for as long as the block is held.
        stored = common_pb2.BlockRef()
        stored.CopyFrom(header)
        stored.store_id, stored.store_address = self.identity.store_id, self.identity.address
        return stored

    # ---- PullBlocks ------------------------------------------------------------------------

    def PullBlocks(self, request, context) -> Iterator[cache_pb2.PullBlocksResponse | bytes]:
        started = time.perf_counter()
        fingerprint = _check_fingerprint(request.fingerprint, "fingerprint")
        max_chunk_bytes = check_chunk_limit(request.max_chunk_bytes)
        keys = [block_key(ref, f"blocks[{i}]") for i, ref in enumerate(_bounded(request.blocks, "blocks"))]
        owner = ("pull", next(self._owners))
        if not context.add_callback(lambda: self.pool.release(owner)):  # it runs on cancel, too
            return  # the call already ended: pin nothing
        pinned, stop_reason = self.pool.pin(fingerprint, keys, owner)
        self.replicator.pulled(fingerprint, pinned)
        sent, sent_bytes, finished = 0, 0, False
        try:
            with self.watchdog.watch(context, "PullBlocks") as progressed:
                if request.bulk and self.bulk is not None and pinned:
                    ticket = self.bulk.open_ticket()
                    yield cache_pb2.PullBlocksResponse(bulk=cache_pb2.BulkOffer(
                        ticket=ticket.secret, port=self.bulk.port, headers=[block.header for block in pinned]))
                    connection = self.bulk.wait(ticket, context.is_active)
                    self.counters.add(**{"bulk_pulls" if connection else "bulk_tickets_unused": 1})
                    transport = _BulkTransport(self.bulk, connection, context, self.config.stream_idle_seconds)
                else:
                    transport = _StreamTransport(max_chunk_bytes)
                with transport:
                    for block, payload in self._verified(pinned):
                        if payload is None:
                            stop_reason = f"block {sent} ({describe_key(block.key)}) failed its checksum in the store"
                            break
                        if not context.is_active():
                            break
                        problem = yield from transport.send(block.header, payload)
                        if problem:
                            stop_reason = f"block {sent} ({describe_key(block.key)}) not sent: {problem}"
                            break
                        sent, sent_bytes = sent + 1, sent_bytes + len(payload)
                        progressed()
            # Finish before the summary goes out, so a client holding the summary sees the pins
            # gone and the transfer counted. Request-scoped blocks are freed only by a pull that
            # delivered all it pinned.
            finished = self._finish_pull(owner, sent == len(pinned), sent_bytes, started)
            summary = cache_pb2.PullSummary(num_blocks_sent=sent, stop_reason=stop_reason)
            yield cache_pb2.PullBlocksResponse(summary=summary)
        finally:
            if not finished:  # failed or cancelled mid-stream
                self._finish_pull(owner, False, sent_bytes, started)

    def _finish_pull(self, owner: object, consumed: bool, sent_bytes: int, started: float) -> bool:
        self.pool.release(owner, consumed=consumed)
        self.counters.add(pull_bytes=sent_bytes, pull_seconds=time.perf_counter() - started)
        return True

    def _verified(self, pinned: list[StoredBlock]) -> Iterator[tuple[StoredBlock, memoryview | None]]:
        """Each pinned block with its bytes (None if they fail the checksum), read READ_BATCH at a
        time: a host pool's blocks are views of their slots (no copy); a device pool's take one
        gather and one device-to-host copy per batch, host memory bounded by the batch. This is
        the store's one checksum of a pull: the bytes verified are the bytes sent."""
        for start in range(0, len(pinned), READ_BATCH):
            batch = pinned[start:start + READ_BATCH]
            for block, payload in zip(batch, self.pool.read_views(batch)):
                if checksum(payload) == block.header.checksum:
                    yield block, payload
                    continue
                self.counters.add(checksum_failures=1)
                self.pool.discard(block)
                yield block, None
                return

    # ---- Lookup, Stats ---------------------------------------------------------------------

    def Lookup(self, request, context) -> cache_pb2.LookupResponse:
        fingerprint = _check_fingerprint(request.fingerprint, "fingerprint")
        hashes = list(_bounded(request.block_hashes, "block_hashes"))
        return cache_pb2.LookupResponse(num_prefix_blocks=self.pool.lookup(fingerprint, hashes),
                                        store_id=self.identity.store_id)

    def Stats(self, request, context) -> cache_pb2.StatsResponse:
        stats = self.pool.stats()
        return cache_pb2.StatsResponse(
            store_id=self.identity.store_id, address=self.identity.address, epoch=self.identity.epoch(),
            device=str(self.pool.device), blocks_used=stats.blocks_used,
            blocks_capacity=stats.blocks_capacity, bytes_used=stats.bytes_used,
            bytes_capacity=stats.bytes_capacity, pinned_blocks=stats.pinned_blocks,
            request_blocks=stats.request_blocks, evictions=stats.counters.evictions,
            fingerprint=self.config.fingerprint_bytes, layout=layout_to_proto(self.pool.layout))


class _StreamTransport:
    """Blocks as pre-encoded PullBlocksResponse chunks on the gRPC stream (one copy each, out of the pool)."""

    def __init__(self, max_chunk_bytes: int):
        self.max_chunk_bytes = max_chunk_bytes

    def __enter__(self) -> "_StreamTransport":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def send(self, header: common_pb2.BlockRef, payload: memoryview) -> Iterator[bytes]:
        yield from encoded_block_chunks(header, payload, self.max_chunk_bytes, cache_pb2.PullBlocksResponse)
        return ""


class _BulkTransport:
    """Blocks as raw bytes on a claimed bulk connection, straight from the pool (no copy in Python).
    A stalled reader fails the send after `idle_s`, as a stalled stream is cancelled; a cancelled
    call (client gone, deadline, watchdog) hangs the connection up, so a blocked send fails at once."""

    def __init__(self, listener: BulkListener, connection: socket.socket | None, context, idle_s: float):
        self.listener, self.connection = listener, connection
        if connection is not None:
            connection.settimeout(idle_s)
            if not context.add_callback(lambda: listener.hang_up(connection)):
                listener.hang_up(connection)  # the call already ended

    def __enter__(self) -> "_BulkTransport":
        return self

    def __exit__(self, *exc) -> None:
        if self.connection is not None:
            self.listener.finished(self.connection)

    def send(self, header: common_pb2.BlockRef, payload: memoryview) -> Iterator[bytes]:
        if self.connection is None:
            return "the bulk ticket expired unused"
        try:
            self.connection.sendall(payload)
        except OSError as exc:
            return f"the bulk connection failed ({exc.__class__.__name__})"
        return ""
        yield  # a generator, like _StreamTransport.send


def add_to_server(servicer: CacheStoreServicer, server) -> None:
    """cache_pb2_grpc's registration of the CacheStore service, except that PullBlocks' serializer
    sends the pre-encoded chunks (bytes) its handler yields as they are."""
    recorded = _RecordedHandlers()
    cache_pb2_grpc.add_CacheStoreServicer_to_server(servicer, recorded)
    pull = recorded.handlers["PullBlocks"]
    recorded.handlers["PullBlocks"] = grpc.unary_stream_rpc_method_handler(
        pull.unary_stream, request_deserializer=pull.request_deserializer, response_serializer=pass_encoded)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(recorded.name, recorded.handlers),))
    server.add_registered_method_handlers(recorded.name, recorded.handlers)


class _RecordedHandlers:
    """Stands in for a server to read the method handlers a generated `add_*_to_server` builds."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict) -> None:
        self.name, self.handlers = name, dict(handlers)


def _chunk_of(message: cache_pb2.PushBlocksRequest) -> common_pb2.BlockChunk:
    if message.WhichOneof("item") != "chunk":
        raise InvalidArgument("chunk", "only the first message of a push may be PushOpen; the rest are chunks")
    return message.chunk


def _peer_host(context) -> str:
    """The calling host ("ipv4:10.0.0.7:53122" -> "ipv4:10.0.0.7"): leases are budgeted per pusher."""
    return context.peer().rsplit(":", 1)[0]


def _check_fingerprint(fingerprint: bytes, field: str) -> bytes:
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise InvalidArgument(field, f"must be {FINGERPRINT_BYTES} bytes, got {len(fingerprint)}")
    return fingerprint


def _bounded(items, field: str):
    if len(items) > MAX_BLOCKS_PER_CALL:
        raise InvalidArgument(field, f"{len(items)} entries exceed the limit of {MAX_BLOCKS_PER_CALL}")
    return items
