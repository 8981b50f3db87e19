"""Client of one cache store: push and pull blocks, look up a prefix, read stats.

Used by the prefill and decode services, the tests and the benchmarks. Pulled blocks are
checked against their checksum before they are returned (the store verified them on push, this
verifies the trip), once, whichever path they came by; re-checking token ids is the caller's job,
since only it knows the tokens.

Pulls take the store's bulk data path (kvcluster.rpc.bulk) where the store offers it and the channel
is not TLS; whatever goes wrong on it (refused ticket, broken connection, corrupt bytes), the
blocks not yet delivered are pulled again over the gRPC stream.
"""

import itertools
import logging

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from kvcluster.errors import IntegrityError
from kvcluster.kv.blocks import checksum
from kvcluster.kv.pool import KVLayout
from kvcluster.kv.wire import (MAX_CHUNK_BYTES, block_chunks, block_key, describe_key, key_ref, layout_to_proto,
                            reassemble_blocks)
from kvcluster.proto import cache_pb2, cache_pb2_grpc, common_pb2
from kvcluster.rpc.bulk import receive_blocks, store_host
from kvcluster.rpc.plumbing import make_channel

Block = tuple[common_pb2.BlockRef, bytes]  # header and payload (a memoryview when it came by the bulk path)
log = logging.getLogger(__name__)


@dataclass
class PullResult:
    """The blocks a pull delivered, in order, and the store's account of it."""

    blocks: list[Block]
    num_blocks_sent: int
    stop_reason: str


def make_ref(payload: bytes | memoryview, token_ids: Sequence[int], block_hash: bytes | None = None,
             request_key: str | None = None) -> common_pb2.BlockRef:
    """A BlockRef header for a block about to be pushed (checksum computed here)."""
    ref = common_pb2.BlockRef(checksum=checksum(payload), num_tokens=len(token_ids), token_ids=token_ids)
    if block_hash is not None:
        ref.block_hash = block_hash
    else:
        ref.request_key = request_key
    return ref


def push_requests(fingerprint: bytes, layout: KVLayout, blocks: Iterable[Block], lease_seconds: int = 0,
                  max_chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[cache_pb2.PushBlocksRequest]:
    """The request stream of one PushBlocks call."""
    opening = cache_pb2.PushOpen(fingerprint=fingerprint, layout=layout_to_proto(layout), lease_seconds=lease_seconds)
    yield cache_pb2.PushBlocksRequest(open=opening)
    for header, payload in blocks:
        yield from block_chunks(header, payload, max_chunk_bytes, cache_pb2.PushBlocksRequest)


def iter_pull(responses: Iterable[cache_pb2.PullBlocksResponse], max_block_bytes: int,
              summary: cache_pb2.PullSummary) -> Iterator[Block]:
    """Yield each block of a PullBlocks stream as soon as it is complete and verified; `summary`
    is filled in when the stream ends. A block failing its checksum raises IntegrityError.
    Consuming blocks one at a time (e.g. copying each into a KV pool) lets the allocator reuse
    one block's buffers for the next instead of faulting in fresh pages for the whole pull."""

    def chunks() -> Iterator[common_pb2.BlockChunk]:
        for response in responses:
            if response.WhichOneof("item") == "summary":
                summary.CopyFrom(response.summary)
                return
            yield response.chunk

    for header, payload in reassemble_blocks(chunks(), max_block_bytes):
        yield verified(header, payload)


def verified(header: common_pb2.BlockRef, payload: bytes | bytearray) -> Block:
    """The consumer's one check of a pulled block: its bytes against its header's checksum."""
    if checksum(payload) != header.checksum:
        raise IntegrityError(f"{describe_key(block_key(header))}: checksum mismatch after pull")
    return header, payload


def read_pull(responses: Iterable[cache_pb2.PullBlocksResponse], max_block_bytes: int) -> PullResult:
    """Reassemble and verify a whole PullBlocks stream into a list."""
    summary = cache_pb2.PullSummary()
    blocks = list(iter_pull(responses, max_block_bytes, summary))
    return PullResult(blocks, summary.num_blocks_sent, summary.stop_reason)


class StoreClient:
    """A channel and stub to one store; cheap to keep per store address."""

    def __init__(self, target: str, layout: KVLayout, timeout_s: float | None = 30.0,
                 credentials: grpc.ChannelCredentials | None = None, metadata: Sequence[tuple[str, str]] = (),
                 bulk: bool = True):
        self.target = target
        self.layout = layout
        self.timeout_s = timeout_s
        self.bulk = bulk and credentials is None  # the bulk socket is plain TCP: never beside a TLS channel
        self.channel = make_channel(target, credentials=credentials, metadata=metadata)
        self.stub = cache_pb2_grpc.CacheStoreStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def push_blocks(self, fingerprint: bytes, blocks: Iterable[Block], lease_seconds: int = 0,
                    max_chunk_bytes: int = MAX_CHUNK_BYTES) -> cache_pb2.PushBlocksResponse:
        requests = push_requests(fingerprint, self.layout, blocks, lease_seconds, max_chunk_bytes)
        return self.stub.PushBlocks(requests, timeout=self.timeout_s)

    def pull_stream(self, fingerprint: bytes, keys: Sequence[bytes | str], max_chunk_bytes: int = 0,
                    timeout_s: float | None = None, bulk: bool = False) -> grpc.Call:
        """The raw response stream (cancel it with `.cancel()`); `timeout_s` caps the client's timeout.
        `bulk` asks for the bulk data path (a BulkOffer first, where the store has one)."""
        request = cache_pb2.PullBlocksRequest(fingerprint=fingerprint, blocks=[key_ref(k) for k in keys],
                                              max_chunk_bytes=max_chunk_bytes, bulk=bulk)
        return self.stub.PullBlocks(request, timeout=self._timeout(timeout_s))

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s or timeout_s)

    def pull_blocks(self, fingerprint: bytes, keys: Sequence[bytes | str], max_chunk_bytes: int = 0) -> PullResult:
        """The whole pull as a list (simple; see iter_blocks for the faster streaming form)."""
        summary = cache_pb2.PullSummary()
        blocks = list(self.iter_blocks(fingerprint, keys, summary, max_chunk_bytes))
        return PullResult(blocks, summary.num_blocks_sent, summary.stop_reason)

    def iter_blocks(self, fingerprint: bytes, keys: Sequence[bytes | str], summary: cache_pb2.PullSummary,
                    max_chunk_bytes: int = 0, timeout_s: float | None = None,
                    into: Callable[[int], memoryview] | None = None) -> Iterator[Block]:
        """Verified blocks as they arrive; `summary` is filled in at the end. By the bulk path where
        it is on; if it fails, the blocks not yet delivered come over the gRPC stream. With `into`,
        block i's bytes land in `into(i)` (received straight into it on the bulk path, copied there
        from the stream's message otherwise) and the yielded payload is that view."""
        delivered = 0
        if self.bulk:
            try:
                for block in self._bulk_pull(fingerprint, keys, summary, max_chunk_bytes, timeout_s, into):
                    yield block
                    delivered += 1
                return
            except (OSError, IntegrityError) as exc:  # the bulk path's own failures; an RPC error is final
                log.warning("bulk pull from %s failed after %d of %d blocks (%s); pulling the rest over the "
                            "gRPC stream", self.target, delivered, len(keys), exc)
        rest = cache_pb2.PullSummary()
        stream = self.pull_stream(fingerprint, keys[delivered:], max_chunk_bytes, timeout_s)
        try:
            for position, (header, payload) in enumerate(iter_pull(stream, self.layout.block_nbytes, rest), delivered):
                yield header, _placed(payload, into, position)
        finally:
            stream.cancel()  # no-op after a complete stream; frees the store's pins after an error
        summary.num_blocks_sent, summary.stop_reason = delivered + rest.num_blocks_sent, rest.stop_reason

    def _bulk_pull(self, fingerprint: bytes, keys: Sequence[bytes | str], summary: cache_pb2.PullSummary,
                   max_chunk_bytes: int, timeout_s: float | None,
                   into: Callable[[int], memoryview] | None) -> Iterator[Block]:
        stream = self.pull_stream(fingerprint, keys, max_chunk_bytes, timeout_s, bulk=True)
        try:
            first = next(stream, None)
            if first is None or first.WhichOneof("item") != "bulk":  # no bulk path there: a plain stream
                responses = itertools.chain([first] if first else [], stream)
                for position, (header, payload) in enumerate(iter_pull(responses, self.layout.block_nbytes, summary)):
                    yield header, _placed(payload, into, position)
                return
            received = 0
            for header, payload in receive_blocks(store_host(self.target), first.bulk, self.layout.block_nbytes,
                                                  self._timeout(timeout_s), into):
                yield verified(header, payload)
                received += 1
            ending = next(stream, None)
            if ending is None or ending.WhichOneof("item") != "summary" or ending.summary.num_blocks_sent != received:
                raise IntegrityError(f"bulk pull: {received} blocks received, the store's summary says "
                                     f"{ending.summary.num_blocks_sent if ending else 'nothing'}")
            summary.CopyFrom(ending.summary)
        finally:
            stream.cancel()  # frees the store's pins if the bulk transfer failed

    def lookup(self, fingerprint: bytes, block_hashes: Sequence[bytes]) -> int:
        request = cache_pb2.LookupRequest(fingerprint=fingerprint, block_hashes=block_hashes)
        return self.stub.Lookup(request, timeout=self.timeout_s).num_prefix_blocks

    def stats(self) -> cache_pb2.StatsResponse:
        return self.stub.Stats(cache_pb2.StatsRequest(), timeout=self.timeout_s)


def _placed(payload: bytes, into: Callable[[int], memoryview] | None, position: int) -> bytes | memoryview:
    if into is None:
        return payload
    destination = into(position)
    destination[:] = payload
    return destination
