"""Byte-level mutation of valid requests, sent raw to a running cluster (issue 13).

Valid serialized requests of every RPC get bits flipped, bytes replaced, inserted, deleted,
duplicated, truncated or garbage fields appended (seeded, a fixed number per request) and go out
over the channel as raw bytes, skipping the client's serializer. Whatever the bytes: the answer is
OK, or INVALID_ARGUMENT whose details open with a field of the request (a message that no longer
parses included), or RESOURCE_EXHAUSTED; never INTERNAL, UNKNOWN or a hang. A well-behaved greedy
Generate runs in a loop meanwhile and must get its exact tokens every time.
"""

import random

import pytest
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from kvcluster.kv.blocks import checksum
from kvcluster.proto import cache_pb2, common_pb2, decode_pb2, prefill_pb2
from tests.fuzz_cluster import (CALL_TIMEOUT_S, WITH_TOKEN, Offences, SteadyStream, cluster, finish_stream,
                                finish_unary, problem_with, steady, verdict)
from tests.store_fixtures import SMOLLM2_LAYOUT

pytestmark = pytest.mark.slow

SEED = 1313
HOT_BYTES = 160  # a huge message (a block chunk) is mutated near its ends, where its structure is


def _raw(message) -> bytes:
    return message.SerializeToString()


def _sampling(**fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**fields)


GENERATE_SEEDS = [
    decode_pb2.GenerateRequest(prompt="Tell me a fact about owls.", sampling=_sampling(max_tokens=3, temperature=0.7,
                                                                                          top_p=0.9, top_k=40, seed=7)),
    decode_pb2.GenerateRequest(messages=decode_pb2.ChatMessages(messages=[
        decode_pb2.ChatMessage(role="system", content="Be brief."), decode_pb2.ChatMessage(role="user", content="Hi ü")]),
        sampling=_sampling(max_tokens=2, temperature=0.0, stop=["\n", "."], stop_token_ids=[2, 13])),
    decode_pb2.GenerateRequest(prompt="The lighthouse keeper wrote in the log that the fog came in at dusk, thick and "
                                      "cold, and that the horn sounded every thirty seconds until dawn.",
                               sampling=_sampling(max_tokens=2, temperature=0.0)),
    decode_pb2.GenerateRequest(request_id="abc", token_ids=decode_pb2.TokenIds(ids=[1, 504, 3726, 30, 2]),
                               sampling=_sampling(max_tokens=2, ignore_eos=True), bypass_cache=True),
]
PREFILL_SEEDS = [
    prefill_pb2.PrefillRequest(request_id="p1", token_ids=list(range(100, 120)), sampling=_sampling(temperature=0.0)),
    prefill_pb2.PrefillRequest(token_ids=[1, 2, 3], sampling=_sampling(temperature=0.8, top_p=0.5, seed=3),
                               bypass_cache=True),
]
LAYOUT = common_pb2.KVLayout(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype="float32", version=1)


def push_seed(fingerprint: bytes, seed: int) -> list[bytes]:
    """A valid push of one full block (and, for odd seeds, a tail block) as raw messages."""
    rng = random.Random(seed)
    payload = bytes([seed]) * SMOLLM2_LAYOUT.block_nbytes
    full = common_pb2.BlockRef(block_hash=rng.randbytes(16), checksum=checksum(payload), num_tokens=16,
                               token_ids=[rng.randrange(49152) for _ in range(16)])
    messages = [cache_pb2.PushBlocksRequest(open=cache_pb2.PushOpen(fingerprint=fingerprint, layout=LAYOUT)),
                cache_pb2.PushBlocksRequest(chunk=common_pb2.BlockChunk(header=full, data=payload, last=True))]
    if seed % 2:
        tail = common_pb2.BlockRef(request_key=f"mutant-tail-{seed}", checksum=checksum(payload), num_tokens=3,
                                   token_ids=[7, 8, 9])
        messages.append(cache_pb2.PushBlocksRequest(chunk=common_pb2.BlockChunk(header=tail, data=payload, last=True)))
    return [_raw(m) for m in messages]


EDITS = ["flip"] * 3 + ["replace"] * 3 + ["insert"] * 2 + ["delete"] * 2 + ["append field"] * 2 + [
    "truncate", "duplicate", "endless varint", "long length"]


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """One edit of `raw` (sometimes two or three); big messages are edited near their start and end."""
    data = bytearray(raw)
    for _ in range(rng.choices([1, 2, 3], weights=[6, 3, 1])[0]):
        pos, edit = _position(len(data), rng), rng.choice(EDITS)
        if edit == "flip" and data:
            data[pos % len(data)] ^= 1 << rng.randrange(8)
        elif edit == "replace" and data:
            data[pos % len(data)] = rng.choice([0x00, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif edit == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif edit == "delete" and data:
            del data[pos:pos + rng.randint(1, 8)]
        elif edit == "truncate":
            del data[pos:]
        elif edit == "duplicate" and data:
            start = rng.randrange(len(data))
            data[pos:pos] = data[start:start + rng.randint(1, 16)]
        elif edit == "append field":  # an unknown, mistyped or repeated field at the end
            data += bytes([rng.randrange(1, 256)]) + rng.randbytes(rng.randint(0, 10))
        elif edit == "endless varint" and data:
            data[pos % len(data):] = b"\xff" * rng.randint(1, 11)
        elif edit == "long length":  # a length prefix far past the end
            data[pos:pos] = bytes([0x12, 0xFF, 0xFF, 0xFF, 0x7F])
    return bytes(data)


def _position(size: int, rng: random.Random) -> int:
    if size <= 2 * HOT_BYTES:
        return rng.randint(0, size)
    return rng.randint(0, HOT_BYTES) if rng.random() < 0.75 else rng.randint(size - HOT_BYTES, size)


def mutants(seeds: list[bytes], per_seed: int, salt: int) -> list[bytes]:
    rng = random.Random(SEED * 1000 + salt)
    return [mutate(raw, rng) for raw in seeds for _ in range(per_seed)]


def parses(message_type, raw: bytes) -> bool:
    try:
        message_type.FromString(raw)
    except DecodeError:
        return False
    return True


class _Broken(Exception):
    """Raised by the wire walk where the bytes stop being a valid message."""


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(raw):
            raise _Broken
        byte = raw[pos]
        value, pos = value | (byte & 0x7F) << shift, pos + 1
        if not byte & 0x80:
            return value, pos
    raise _Broken  # longer than ten bytes


def _value(raw: bytes, pos: int, wire_type: int) -> tuple[bytes | None, int]:
    """Read one value: its payload for a length-delimited one, and where the next tag starts."""
    if wire_type == 0:
        return None, _varint(raw, pos)[1]
    if wire_type in (1, 5):
        end = pos + (8 if wire_type == 1 else 4)
        payload = None
    else:
        size, pos = _varint(raw, pos)
        end = pos + size
        payload = raw[pos:end]
    if end > len(raw):
        raise _Broken
    return payload, end


def blamed_field(descriptor, raw: bytes, prefix: str = "") -> str | None:
    """The dotted path of the field whose bytes make `raw` unparsable, or None when the damage lies
    in no field (a broken tag at the top level): the oracle for 'the error names the field'."""
    pos = 0
    while pos < len(raw):
        try:
            key, pos = _varint(raw, pos)
        except _Broken:
            return prefix.rstrip(".") or None
        number, wire_type = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number)
        if number == 0 or wire_type in (3, 4, 6, 7):  # a broken tag: blame what encloses it
            return prefix.rstrip(".") or None
        name = prefix + field.name if field is not None else (prefix.rstrip(".") or None)
        try:
            payload, pos = _value(raw, pos, wire_type)
        except _Broken:
            return name
        if field is not None and payload is not None and not _payload_is_valid(field, payload):
            if field.type == field.TYPE_MESSAGE:
                return blamed_field(field.message_type, payload, name + ".") or name
            return name
    return None


def _payload_is_valid(field, payload: bytes) -> bool:
    if field.type == field.TYPE_STRING:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True
    if field.type == field.TYPE_MESSAGE:
        try:
            GetMessageClass(field.message_type).FromString(payload)
        except DecodeError:
            return False
        return True
    if field.is_repeated and field.type != field.TYPE_BYTES:  # packed numbers
        try:
            pos = 0
            while pos < len(payload):
                pos = _varint(payload, pos)[1]
        except _Broken:
            return False
    return True


def raw_unary(cluster, service: str, method: str):
    return cluster.channels[service].unary_unary(method, request_serializer=None, response_deserializer=None)


def raw_stream(cluster, service: str, method: str):
    return cluster.channels[service].unary_stream(method, request_serializer=None, response_deserializer=None)


def send_all(steady: SteadyStream, label: str, payloads: list, send, message_type) -> tuple[Offences, list, int]:
    """Send each payload; judge every answer; let the steady stream finish its round afterwards."""
    offences, before, unparsable = Offences(), len(steady.failures), 0
    for payload in payloads:
        parts = payload if isinstance(payload, list) else [payload]
        broken = next((part for part in parts if not parses(message_type, part)), None)
        unparsable += broken is not None
        text = f"{label} " + " | ".join(part[:200].hex() + (f"…(+{len(part) - 200} bytes)" if len(part) > 200 else "")
                                        for part in parts)
        with steady.beside(text):
            outcome = send(payload)
        problem = problem_with(outcome, message_type.DESCRIPTOR)
        if problem == "INVALID_ARGUMENT naming no field" and broken is not None:
            blame = blamed_field(message_type.DESCRIPTOR, broken)
            # Damage outside any field (a broken tag at the top level) can only be blamed on the request.
            problem = None if blame is None and outcome.details.startswith("request:") else f"{problem} (the damage is in {blame})"
        offences.record(problem, outcome, text, sum(map(len, parts)))
    steady.wait_for_rounds(steady.rounds + 1, timeout_s=CALL_TIMEOUT_S)
    return offences, steady.failures[before:], unparsable


def test_mutated_generate_requests(cluster, steady):
    call = raw_stream(cluster, "decode", "/kvcluster.v1.DecodeService/Generate")
    payloads = mutants([_raw(m) for m in GENERATE_SEEDS], 40, salt=1)
    offences, hurt, unparsable = send_all(
        steady, "Generate", payloads, lambda raw: finish_stream(call(raw, timeout=CALL_TIMEOUT_S), 8),
        decode_pb2.GenerateRequest)
    assert unparsable >= 10  # the mutants do reach the parse-failure path
    assert not offences and not hurt, verdict(offences, steady, hurt)


def test_mutated_prefill_requests(cluster, steady):
    call = raw_unary(cluster, "prefill", "/kvcluster.v1.PrefillService/Prefill")
    payloads = mutants([_raw(m) for m in PREFILL_SEEDS], 40, salt=2)
    offences, hurt, unparsable = send_all(
        steady, "Prefill", payloads,
        lambda raw: finish_unary(lambda: call(raw, timeout=CALL_TIMEOUT_S, metadata=WITH_TOKEN)),
        prefill_pb2.PrefillRequest)
    assert unparsable >= 5
    assert not offences and not hurt, verdict(offences, steady, hurt)


def test_mutated_push_streams(cluster, steady):
    call = cluster.channels["cache_store"].stream_unary("/kvcluster.v1.CacheStore/PushBlocks",
                                                        request_serializer=None, response_deserializer=None)
    rng = random.Random(SEED + 3)
    streams = []
    for i in range(80):
        messages = push_seed(cluster.fingerprint, i)
        victim = rng.randrange(len(messages))
        messages[victim] = mutate(messages[victim], rng)
        streams.append(messages)
    offences, hurt, unparsable = send_all(
        steady, "PushBlocks", streams,
        lambda messages: finish_unary(lambda: call(iter(messages), timeout=CALL_TIMEOUT_S, metadata=WITH_TOKEN)),
        cache_pb2.PushBlocksRequest)
    assert unparsable >= 5
    assert not offences and not hurt, verdict(offences, steady, hurt)


def test_mutated_pull_lookup_and_stats_requests(cluster, steady):
    fingerprint = cluster.fingerprint
    held = cluster.steady_block_hashes()
    refs = [common_pb2.BlockRef(block_hash=held[0]), common_pb2.BlockRef(block_hash=bytes(range(16))),
            common_pb2.BlockRef(request_key="nobody-holds-this")]
    pulls = mutants([_raw(cache_pb2.PullBlocksRequest(fingerprint=fingerprint, blocks=refs, max_chunk_bytes=4096))], 40,
                    salt=4)
    lookups = mutants([_raw(cache_pb2.LookupRequest(fingerprint=fingerprint, block_hashes=[held[0], b"\x01" * 16]))],
                      30, salt=5)
    stats = mutants([b""], 15, salt=6)
    pull = raw_stream(cluster, "cache_store", "/kvcluster.v1.CacheStore/PullBlocks")
    lookup = raw_unary(cluster, "cache_store", "/kvcluster.v1.CacheStore/Lookup")
    stat = raw_unary(cluster, "cache_store", "/kvcluster.v1.CacheStore/Stats")
    results = [
        send_all(steady, "PullBlocks", pulls,
                 lambda raw: finish_stream(pull(raw, timeout=CALL_TIMEOUT_S, metadata=WITH_TOKEN), 12),
                 cache_pb2.PullBlocksRequest),
        send_all(steady, "Lookup", lookups,
                 lambda raw: finish_unary(lambda: lookup(raw, timeout=CALL_TIMEOUT_S, metadata=WITH_TOKEN)),
                 cache_pb2.LookupRequest),
        send_all(steady, "Stats", stats,
                 lambda raw: finish_unary(lambda: stat(raw, timeout=CALL_TIMEOUT_S, metadata=WITH_TOKEN)),
                 cache_pb2.StatsRequest),
    ]
    assert sum(unparsable for _, _, unparsable in results) >= 5
    report = "\n".join(verdict(offences, steady, hurt) for offences, hurt, _ in results if offences or hurt)
    assert not report, report


def test_the_steady_stream_was_exact_all_along(steady):
    steady.wait_for_rounds(steady.rounds + 1, timeout_s=CALL_TIMEOUT_S)
    assert steady.rounds >= 5
    assert not steady.failures, steady.report()
