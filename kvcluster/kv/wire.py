"""Blocks on the wire: a block's bytes <-> a run of BlockChunk messages, and KVLayout <-> proto.

A block travels as one or more chunks of at most MAX_CHUNK_BYTES: the first chunk carries the
BlockRef header, the last has `last=True` (a block that fits in one chunk sends a single chunk
with both). Chunks of different blocks never interleave within a stream.

Copies: splitting slices a memoryview (a block that fits one chunk is handed to protobuf as the
same bytes object); reassembly returns the chunk's own bytes for a one-chunk block and joins only
when a block spans several chunks. protobuf `bytes` fields accept nothing but `bytes`, so each
chunk of a multi-chunk block costs one copy when it is built.
"""

from collections.abc import Iterable, Iterator

from google.protobuf.message import Message

from kvcluster.errors import IntegrityError, InvalidArgument
from kvcluster.kv.pool import KVLayout
from kvcluster.proto import common_pb2

MAX_CHUNK_BYTES = 1 << 20


def layout_to_proto(layout: KVLayout) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(num_layers=layout.num_layers, block_size=layout.block_size,
                               num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                               dtype=layout.dtype, version=layout.version)


def layout_from_proto(message: common_pb2.KVLayout) -> KVLayout:
    return KVLayout(num_layers=message.num_layers, block_size=message.block_size,
                    num_kv_heads=message.num_kv_heads, head_dim=message.head_dim,
                    dtype=message.dtype, version=message.version)


def block_key(ref: common_pb2.BlockRef, field: str = "block") -> bytes | str:
    """The block's key: its chained hash (full block) or its request key (tail block). `field` is
    where the reference sits in the caller's message, for the error."""
    which = ref.WhichOneof("key")
    if which is None:
        raise InvalidArgument(field, "a block reference needs block_hash or request_key")
    return getattr(ref, which)


def key_ref(key: bytes | str) -> common_pb2.BlockRef:
    """A reference carrying only a key (what PullBlocksRequest and BlockPushResult hold)."""
    return common_pb2.BlockRef(block_hash=key) if isinstance(key, bytes) else common_pb2.BlockRef(request_key=key)


def describe_key(key: bytes | str) -> str:
    """Short printable form of a block key for error messages and logs."""
    return f"hash {key.hex()[:16]}" if isinstance(key, bytes) else f"request key {key!r}"


def check_chunk_limit(max_chunk_bytes: int) -> int:
    """0 means the default; anything above MAX_CHUNK_BYTES is refused."""
    if max_chunk_bytes == 0:
        return MAX_CHUNK_BYTES
    if not 0 < max_chunk_bytes <= MAX_CHUNK_BYTES:
        raise InvalidArgument("max_chunk_bytes", f"{max_chunk_bytes} is outside [1, {MAX_CHUNK_BYTES}]")
    return max_chunk_bytes


def block_chunks(header: common_pb2.BlockRef, payload: bytes | memoryview,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES, envelope: type[Message] | None = None) -> Iterator[Message]:
    """The chunks of one block, header on the first, `last` on the final one. With `envelope`
    (PushBlocksRequest, PullBlocksResponse), each chunk is built in place inside a new envelope
    message instead of being copied into one afterwards."""
    max_chunk_bytes = check_chunk_limit(max_chunk_bytes)
    size = len(payload)
    view = memoryview(payload).cast("B") if size > max_chunk_bytes else None
    for start in range(0, max(size, 1), max_chunk_bytes):
        end = min(start + max_chunk_bytes, size)
        message = envelope() if envelope is not None else common_pb2.BlockChunk()
        chunk = message.chunk if envelope is not None else message
        if start == 0:
            chunk.header.CopyFrom(header)
        # bytes(b) of a bytes object is that same object: a one-chunk block is not copied here.
        chunk.data = bytes(payload) if view is None else bytes(view[start:end])
        chunk.last = end == size
        yield message


def encoded_block_chunks(header: common_pb2.BlockRef, payload: bytes | memoryview,
                         max_chunk_bytes: int = MAX_CHUNK_BYTES, envelope: type[Message] | None = None) -> Iterator[bytes]:
    """`block_chunks` already serialized: the same messages as wire bytes, each built with one copy
    of its slice of `payload` (which may be a view of a pool) and no protobuf message around the
    data. Protobuf parsers accept fields in any order, so the data field is appended after the
    serialized header and `last` (a server registers PullBlocks with `pass_encoded`)."""
    max_chunk_bytes = check_chunk_limit(max_chunk_bytes)
    view = memoryview(payload).cast("B")
    size = len(view)
    outer = _tag(envelope.DESCRIPTOR.fields_by_name["chunk"].number) if envelope is not None else b""
    for start in range(0, max(size, 1), max_chunk_bytes):
        end = min(start + max_chunk_bytes, size)
        head = common_pb2.BlockChunk(header=header if start == 0 else None, last=end == size).SerializeToString()
        data_field = _DATA_TAG + _varint(end - start)
        inner_size = len(head) + len(data_field) + end - start
        prefix = outer + _varint(inner_size) if envelope is not None else b""
        yield b"".join((prefix, head, data_field, view[start:end]))


def pass_encoded(message: Message | bytes) -> bytes:
    """A response serializer that sends pre-encoded messages (bytes) as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _tag(field_number: int) -> bytes:
    return _varint(field_number << 3 | 2)  # wire type 2: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_DATA_TAG = _tag(common_pb2.BlockChunk.DESCRIPTOR.fields_by_name["data"].number)


class _PartialBlock:
    """The chunks received so far of the block being reassembled."""

    def __init__(self, header: common_pb2.BlockRef):
        self.header = header
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes, max_block_bytes: int) -> None:
        self.size += len(data)
        if self.size > max_block_bytes:
            raise InvalidArgument("chunk.data", f"{describe_key(block_key(self.header))} exceeds "
                                  f"the block size limit of {max_block_bytes} bytes")
        self.parts.append(data)

    def payload(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


def reassemble_blocks(chunks: Iterable[common_pb2.BlockChunk],
                      max_block_bytes: int) -> Iterator[tuple[common_pb2.BlockRef, bytes]]:
    """Yield (header, payload) per complete block. A broken stream raises a typed error:
    a chunk over MAX_CHUNK_BYTES or a block over `max_block_bytes` -> InvalidArgument;
    a chunk without a header, a header inside a block, or a stream ending mid-block ->
    IntegrityError. Nothing of an incomplete block is ever yielded."""
    partial: _PartialBlock | None = None
    for chunk in chunks:
        data = chunk.data  # each read of a protobuf bytes field makes a new copy: read it once
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidArgument("chunk.data", f"{len(data)} bytes exceeds the limit of {MAX_CHUNK_BYTES}")
        partial = _start_or_continue(partial, chunk)
        partial.add(data, max_block_bytes)
        if chunk.last:
            yield partial.header, partial.payload()
            partial = None
    if partial is not None:
        raise IntegrityError(f"chunk.last: truncated block: the stream ended after {partial.size} bytes of "
                             f"{describe_key(block_key(partial.header))}, before a chunk with last set")


def _start_or_continue(partial: _PartialBlock | None, chunk: common_pb2.BlockChunk) -> _PartialBlock:
    has_header = chunk.HasField("header")
    if partial is None:
        if not has_header:
            raise IntegrityError("chunk.header: the first chunk of a block must carry its BlockRef header")
        block_key(chunk.header, "chunk.header")  # validates that the header names a block
        return _PartialBlock(chunk.header)
    if has_header:
        raise IntegrityError(f"chunk.header: truncated block: {describe_key(block_key(partial.header))} ended after "
                             f"{partial.size} bytes without a last chunk, and another block began")
    return partial
