"""Blocks <-> BlockChunk messages: splitting, reassembly and every way a stream can be broken."""

import os

import pytest

from kvcluster.errors import IntegrityError, InvalidArgument
from kvcluster.kv.pool import KVLayout
from kvcluster.kv.wire import (MAX_CHUNK_BYTES, block_chunks, block_key, check_chunk_limit, encoded_block_chunks,
                            layout_from_proto, layout_to_proto, pass_encoded, reassemble_blocks)
from kvcluster.proto import cache_pb2, common_pb2

HEADER = common_pb2.BlockRef(block_hash=b"h" * 16, checksum=7, num_tokens=16, token_ids=list(range(16)))


def header(name: str) -> common_pb2.BlockRef:
    return common_pb2.BlockRef(request_key=name, num_tokens=1, token_ids=[1])


def test_a_block_within_the_limit_is_one_chunk_with_header_and_last():
    payload = os.urandom(1000)
    chunks = list(block_chunks(HEADER, payload))
    assert len(chunks) == 1
    assert chunks[0].HasField("header") and chunks[0].last
    assert chunks[0].header == HEADER and chunks[0].data == payload


def test_a_large_block_splits_into_chunks_of_at_most_1_mib():
    payload = os.urandom(3 * MAX_CHUNK_BYTES + 5)
    chunks = list(block_chunks(HEADER, payload))
    assert [len(c.data) for c in chunks] == [MAX_CHUNK_BYTES] * 3 + [5]
    assert [c.HasField("header") for c in chunks] == [True, False, False, False]
    assert [c.last for c in chunks] == [False, False, False, True]
    assert [(h, p) for h, p in reassemble_blocks(chunks, len(payload))] == [(HEADER, payload)]


def test_several_blocks_round_trip_through_small_chunks_in_envelopes():
    blocks = [(header(f"r{i}"), os.urandom(100 + i)) for i in range(3)]
    messages = [m for h, p in blocks for m in block_chunks(h, p, 32, envelope=cache_pb2.PullBlocksResponse)]
    assert all(isinstance(m, cache_pb2.PullBlocksResponse) and len(m.chunk.data) <= 32 for m in messages)
    assert list(reassemble_blocks((m.chunk for m in messages), 1000)) == blocks


def test_a_memoryview_payload_is_accepted():
    payload = os.urandom(300)
    chunks = list(block_chunks(HEADER, memoryview(payload), 128))
    assert b"".join(c.data for c in chunks) == payload


def test_chunk_limit_zero_means_default_and_above_1_mib_is_refused():
    assert check_chunk_limit(0) == MAX_CHUNK_BYTES
    assert check_chunk_limit(4096) == 4096
    with pytest.raises(InvalidArgument, match=f"max_chunk_bytes.*{MAX_CHUNK_BYTES}"):
        check_chunk_limit(MAX_CHUNK_BYTES + 1)


def test_a_chunk_without_header_starting_a_block_is_rejected():
    chunk = common_pb2.BlockChunk(data=b"x" * 10, last=True)
    with pytest.raises(IntegrityError, match="header"):
        list(reassemble_blocks([chunk], 100))


def test_a_stream_ending_mid_block_is_truncated_and_yields_nothing_of_it():
    good = list(block_chunks(header("good"), b"a" * 64, 16))
    cut = list(block_chunks(header("cut"), b"b" * 64, 16))[:-1]
    seen = []
    with pytest.raises(IntegrityError, match="truncated.*48 bytes.*'cut'"):
        for block in reassemble_blocks(good + cut, 100):
            seen.append(block)
    assert [h.request_key for h, _ in seen] == ["good"]


def test_a_new_header_before_the_last_chunk_is_truncation():
    first = list(block_chunks(header("first"), b"a" * 64, 16))[:2]
    second = list(block_chunks(header("second"), b"b" * 16, 16))
    with pytest.raises(IntegrityError, match="truncated.*'first'"):
        list(reassemble_blocks(first + second, 100))


def test_an_oversize_chunk_is_invalid_and_names_the_limit():
    chunk = common_pb2.BlockChunk(header=HEADER, data=bytes(MAX_CHUNK_BYTES + 1), last=True)
    with pytest.raises(InvalidArgument, match=f"chunk.data.*{MAX_CHUNK_BYTES}"):
        list(reassemble_blocks([chunk], 4 * MAX_CHUNK_BYTES))


def test_a_block_larger_than_allowed_is_stopped_before_it_is_buffered():
    chunks = block_chunks(header("big"), b"z" * 100, 40)
    with pytest.raises(InvalidArgument, match="block size limit of 64"):
        list(reassemble_blocks(chunks, 64))


def test_a_header_without_key_is_invalid():
    chunk = common_pb2.BlockChunk(header=common_pb2.BlockRef(checksum=1), data=b"x", last=True)
    with pytest.raises(InvalidArgument, match="block_hash or request_key"):
        list(reassemble_blocks([chunk], 10))


def test_block_key_is_the_hash_or_the_request_key():
    assert block_key(HEADER) == b"h" * 16
    assert block_key(header("req-1")) == "req-1"


def test_layout_round_trips_through_proto():
    layout = KVLayout(30, 16, 3, 64, "float16")
    assert layout_from_proto(layout_to_proto(layout)) == layout


@pytest.mark.parametrize("size,limit", [(0, MAX_CHUNK_BYTES), (1000, MAX_CHUNK_BYTES), (737_280, MAX_CHUNK_BYTES),
                                        (737_280, 100_000), (3 * MAX_CHUNK_BYTES + 5, MAX_CHUNK_BYTES), (300, 128)])
@pytest.mark.parametrize("envelope", [None, cache_pb2.PullBlocksResponse, cache_pb2.PushBlocksRequest])
def test_pre_encoded_chunks_parse_as_the_same_messages(size, limit, envelope):
    payload = os.urandom(size)
    kind = envelope or common_pb2.BlockChunk
    expected = list(block_chunks(HEADER, payload, limit, envelope))
    encoded = list(encoded_block_chunks(HEADER, memoryview(payload), limit, envelope))
    assert all(isinstance(message, bytes) for message in encoded)
    assert [kind.FromString(message) for message in encoded] == expected
    chunks = [cache_pb2.PullBlocksResponse.FromString(m).chunk for m in encoded] if envelope is cache_pb2.PullBlocksResponse else []
    if chunks:
        assert [(h, bytes(p)) for h, p in reassemble_blocks(chunks, size)] == [(HEADER, payload)]


def test_pre_encoded_chunks_read_a_pool_view_and_pass_through_the_serializer():
    pool = bytearray(os.urandom(4096))
    view = memoryview(pool)[1024:2048].toreadonly()  # a slot of a pool, not a bytes object
    (message,) = encoded_block_chunks(HEADER, view, envelope=cache_pb2.PullBlocksResponse)
    assert pass_encoded(message) is message
    assert cache_pb2.PullBlocksResponse.FromString(message).chunk.data == bytes(pool[1024:2048])
    summary = cache_pb2.PullBlocksResponse(summary=cache_pb2.PullSummary(num_blocks_sent=1))
    assert pass_encoded(summary) == summary.SerializeToString()
