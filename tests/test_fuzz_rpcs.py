"""Property-based fuzzing of every RPC against a running cluster (issue 13).

Hypothesis draws requests from the whole space each RPC accepts (extreme floats, huge and
negative integers, empty and very long strings, unicode, out-of-range token ids, wrong
fingerprints and layouts, broken chunk sequences, missing or wrong tokens) and sends them to real
servers. For every call: the answer is OK, or INVALID_ARGUMENT whose details open with a field of
the request, or RESOURCE_EXHAUSTED, or UNAUTHENTICATED for an internal RPC sent without the token;
never INTERNAL, UNKNOWN or a hang. Meanwhile a well-behaved greedy Generate runs in a loop and must
get its exact tokens every time.

Each test runs a fixed number of derandomized examples without shrinking, collects every call that
broke the contract and fails once at the end, listing each kind of failure with the smallest
request that showed it. Healthy streams are read for a few messages and then cancelled, so a valid
request with a large max_tokens costs no more than a small one.
"""

import math
import re

import grpc
import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st

from kvcluster.engine.sampling import MIN_TOP_P
from kvcluster.kv.blocks import checksum
from kvcluster.kv.wire import MAX_CHUNK_BYTES
from kvcluster.proto import cache_pb2, common_pb2, decode_pb2, prefill_pb2
from tests.fuzz_cluster import (CALL_TIMEOUT_S, WITH_TOKEN, Offences, Outcome, SteadyStream, cluster, finish_stream,
                                finish_unary, problem_with, steady, verdict)
from tests.store_fixtures import SMOLLM2_LAYOUT

pytestmark = pytest.mark.slow

VOCAB = 49152
BLOCK_BYTES = SMOLLM2_LAYOUT.block_nbytes
STREAM_READ = 8  # messages read from a healthy stream before cancelling it


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck),
                    print_blob=False)


def describe(message) -> str:
    """The message as one line of text, long runs of one character and long texts shortened."""
    text = text_format.MessageToString(message, as_one_line=True, as_utf8=True)
    text = re.sub(r"(.)\1{15,}", lambda run: f"{run.group(1)}…×{len(run.group(0))}", text)
    return text if len(text) <= 500 else f"{text[:300]} …({len(text)} chars)… {text[-150:]}"


def run_probe(steady: SteadyStream, probe) -> tuple[Offences, list]:
    """Run a @given probe; then let the steady stream finish the round it is in, so the effects of
    the last examples reach it too."""
    offences = Offences()
    before = len(steady.failures)
    probe(offences)
    steady.wait_for_rounds(steady.rounds + 1, timeout_s=CALL_TIMEOUT_S)
    return offences, steady.failures[before:]


# ---- strategies ------------------------------------------------------------------------------

INT32 = st.integers(-2**31, 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
# Every float32 that validation might let through yet the math might choke on, and plain outlaws.
EDGE_FLOATS = [0.0, -0.0, 1e-45, 1e-44, 1e-40, 1.1754944e-38, 1e-37, 1e-30, 1e-8, 1e-3, 0.5, 0.99999994, 1.0,
               1.0000001, 2.0, 99.99999, 100.0, 100.00001, 1e30, 3.4028235e38, math.inf, -math.inf, math.nan,
               -1e-45, -1.0]
WILD_FLOAT = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(width=32))
TOKEN_ID = st.integers(0, VOCAB - 1)
WILD_TOKEN_ID = st.one_of(TOKEN_ID, st.sampled_from([VOCAB, 65535, 2**31, 2**32 - 1]), UINT32)
SHORT_TEXT = st.text(max_size=24)


def mostly(valid: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """About five draws in six from `valid`: a request must pass most checks to reach the deeper ones.
    Hypothesis favours the ends of an integer range, so a value from its middle picks `wild`."""
    return st.integers(0, 5).flatmap(lambda pick: wild if pick == 3 else valid)


SAMPLING = st.fixed_dictionaries({}, optional={
    "max_tokens": mostly(st.integers(1, 4), st.one_of(st.sampled_from(
        [0, -1, -2**31, 2**31 - 1, 5, 64, 1440, 1500, 8191, 8192, 8193, 10**6]), INT32)),
    "temperature": mostly(st.one_of(st.just(0.0), st.floats(0.0625, 2.0, width=32), st.sampled_from(
        [1e-45, 1e-44, 1e-40, 1e-38, 1e-37, 1e-30, 1e-3, 100.0])), WILD_FLOAT),
    "top_p": mostly(st.floats(MIN_TOP_P, 1.0, width=32), WILD_FLOAT),
    "top_k": mostly(st.one_of(st.integers(0, 100), st.sampled_from([VOCAB - 1, VOCAB, 2**31 - 1])), INT32),
    "seed": UINT64,
    "stop": mostly(st.lists(st.text(min_size=1, max_size=8), max_size=3), st.lists(st.one_of(
        st.text(max_size=8), st.sampled_from(["", "\n", "x" * 256, "x" * 257, "🙂" * 300])), max_size=18)),
    "stop_token_ids": mostly(st.lists(TOKEN_ID, max_size=4), st.lists(WILD_TOKEN_ID, max_size=20)),
    "ignore_eos": st.booleans(),
}).map(lambda fields: common_pb2.SamplingParams(**fields))

PROMPT = mostly(st.text(min_size=1, max_size=160), st.sampled_from(
    ["", " ", "\x00", "<|im_start|>", "<|im_end|>" * 3, "\ufeff\u202e\u200b", " token" * 9000, "🙂" * 2000]))
ROLE = mostly(st.sampled_from(["system", "user", "assistant"]),
              st.one_of(st.sampled_from(["", "robot", "User", "user\x00"]), SHORT_TEXT))
CHAT_MESSAGE = st.builds(decode_pb2.ChatMessage, role=ROLE, content=st.text(max_size=80))
MESSAGES = mostly(st.lists(CHAT_MESSAGE, min_size=1, max_size=3), st.lists(CHAT_MESSAGE, max_size=0)).map(
    lambda items: decode_pb2.ChatMessages(messages=items))
TOKEN_IDS = mostly(st.lists(TOKEN_ID, min_size=1, max_size=48),
                   st.one_of(st.lists(WILD_TOKEN_ID, max_size=48), st.sampled_from([[5] * 8191, [5] * 8192])))


@st.composite
def generate_requests(draw) -> decode_pb2.GenerateRequest:
    request = decode_pb2.GenerateRequest(request_id=draw(st.one_of(SHORT_TEXT, st.just("r" * 300))),
                                         bypass_cache=draw(st.booleans()))
    which = draw(st.sampled_from(["prompt", "messages", "token_ids", "prompt", "messages", "token_ids", None]))
    if which == "prompt":
        request.prompt = draw(PROMPT)
    elif which == "messages":
        request.messages.CopyFrom(draw(MESSAGES))
    elif which == "token_ids":
        request.token_ids.ids.extend(draw(TOKEN_IDS))
    if draw(st.integers(0, 9)):  # mostly with sampling params; sometimes none at all
        request.sampling.CopyFrom(draw(SAMPLING))
    return request


# Five calls in six carry the token: Hypothesis favours the ends of a sampled list, so a plain
# sampled_from picked "wrong" or "none" for over half of the calls and left too few OK answers.
AUTH = mostly(st.just("token"), st.sampled_from(["none", "wrong"]))


def metadata_for(auth: str):
    return {"token": WITH_TOKEN, "none": (), "wrong": ((WITH_TOKEN[0][0], "not-the-token"),)}[auth]


@st.composite
def prefill_requests(draw) -> prefill_pb2.PrefillRequest:
    request = prefill_pb2.PrefillRequest(request_id=draw(mostly(SHORT_TEXT, st.just("r" * 300))),
                                         token_ids=draw(TOKEN_IDS), bypass_cache=draw(st.booleans()))
    if draw(st.integers(0, 9)):
        request.sampling.CopyFrom(draw(SAMPLING))
    return request


REAL_LAYOUT = common_pb2.KVLayout(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype="float32", version=1)
LAYOUT = mostly(st.just(REAL_LAYOUT), st.builds(
    common_pb2.KVLayout, num_layers=st.one_of(st.just(30), UINT32), block_size=st.one_of(st.just(16), UINT32),
    num_kv_heads=st.one_of(st.just(3), UINT32), head_dim=st.one_of(st.just(64), UINT32),
    dtype=st.one_of(st.sampled_from(["float32", "bfloat16", "float16", "int8", ""]), SHORT_TEXT),
    version=st.one_of(st.just(1), UINT32)))
WILD_FINGERPRINT = st.one_of(st.binary(max_size=40), st.binary(min_size=16, max_size=16))
PAYLOAD_SIZES = [0, 1, BLOCK_BYTES - 1, BLOCK_BYTES + 1, MAX_CHUNK_BYTES + 1]


def fingerprints(real: bytes) -> st.SearchStrategy:
    return mostly(st.just(real), WILD_FINGERPRINT)


@st.composite
def block_refs(draw, for_push: bool) -> common_pb2.BlockRef:
    ref = common_pb2.BlockRef()
    key = draw(mostly(st.sampled_from(["hash", "hash", "request_key"]), st.sampled_from(["wild hash", "wild key", "none"])))
    if key == "hash":
        ref.block_hash = draw(st.binary(min_size=16, max_size=16))
    elif key == "wild hash":
        ref.block_hash = draw(st.binary(max_size=33))
    elif key == "request_key":
        ref.request_key = draw(st.text(min_size=1, max_size=40))
    elif key == "wild key":
        ref.request_key = draw(st.sampled_from(["", "k" * 257, "\x00"]))
    if for_push:
        ref.num_tokens = draw(mostly(st.integers(1, 16), st.one_of(st.just(0), st.just(17), UINT32)))
        matching = min(ref.num_tokens, 17)  # a wild num_tokens (up to 2**32 - 1) gets at most 17 ids
        ref.token_ids.extend(draw(mostly(st.lists(TOKEN_ID, min_size=matching, max_size=matching),
                                         st.lists(WILD_TOKEN_ID, max_size=17))))
        ref.store_id, ref.store_address = draw(SHORT_TEXT), draw(SHORT_TEXT)
    return ref


@st.composite
def push_streams(draw, fingerprint: bytes) -> list[cache_pb2.PushBlocksRequest]:
    """A PushBlocks request stream: mostly an opening and a few blocks, most of them well formed."""
    messages = []
    if draw(mostly(st.just(True), st.just(False))):
        opening = cache_pb2.PushOpen(fingerprint=draw(fingerprints(fingerprint)), layout=draw(LAYOUT),
                                     lease_seconds=draw(mostly(st.integers(0, 600), UINT32)))
        messages.append(cache_pb2.PushBlocksRequest(open=opening))
    for _ in range(draw(st.integers(0, 3))):
        if draw(mostly(st.just(False), st.just(True))):  # a second opening mid-stream
            messages.append(cache_pb2.PushBlocksRequest(open=cache_pb2.PushOpen(fingerprint=fingerprint)))
            continue
        header = draw(block_refs(for_push=True))
        if header.WhichOneof("key") == "block_hash" and len(header.block_hash) == 16:
            header.num_tokens = draw(mostly(st.just(16), st.integers(0, 17)))
            del header.token_ids[:]
            header.token_ids.extend(draw(st.lists(TOKEN_ID, min_size=header.num_tokens, max_size=header.num_tokens)))
        size = draw(mostly(st.just(BLOCK_BYTES), st.sampled_from(PAYLOAD_SIZES)))
        payload = draw(st.binary(min_size=1, max_size=1)) * size
        header.checksum = draw(mostly(st.just(checksum(payload)), UINT64))
        chunk = common_pb2.BlockChunk(data=payload, last=draw(mostly(st.just(True), st.just(False))))
        if draw(mostly(st.just(True), st.just(False))):
            chunk.header.CopyFrom(header)
        messages.append(cache_pb2.PushBlocksRequest(chunk=chunk))
    return messages


# ---- Generate --------------------------------------------------------------------------------

def generate_outcome(cluster, request: decode_pb2.GenerateRequest) -> tuple[Outcome, str | None]:
    """Send one Generate; also check a healthy stream's own promises (token count, finish reason)."""
    messages = []
    call = cluster.generate.Generate(request, timeout=CALL_TIMEOUT_S)
    outcome = finish_stream(call, STREAM_READ, messages.append)
    if outcome.code != grpc.StatusCode.OK or outcome.stopped_early:
        return outcome, None
    tokens = sum(len(m.token_ids) for m in messages)
    limit = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 128
    if not messages or messages[-1].finish_reason == decode_pb2.FINISH_REASON_UNSPECIFIED:
        return outcome, "OK stream ended without a finish reason"
    if tokens > limit or messages[-1].usage.completion_tokens != tokens:
        return outcome, f"OK stream gave {tokens} tokens for max_tokens {limit} (usage says {messages[-1].usage.completion_tokens})"
    return outcome, None


@example(request=decode_pb2.GenerateRequest(prompt="Hi", sampling=common_pb2.SamplingParams(temperature=1e-45,
                                                                                             max_tokens=2)))
@example(request=decode_pb2.GenerateRequest(prompt="Hi", sampling=common_pb2.SamplingParams(max_tokens=10**6)))
@example(request=decode_pb2.GenerateRequest(prompt=" token" * 9000, sampling=common_pb2.SamplingParams(max_tokens=1)))
@example(request=decode_pb2.GenerateRequest(token_ids=decode_pb2.TokenIds(ids=[1, VOCAB]),
                                            sampling=common_pb2.SamplingParams(max_tokens=1)))
@given(request=generate_requests())
def _generate_example(cluster, steady, offences, request):
    with steady.beside(describe(request)):
        outcome, own_problem = generate_outcome(cluster, request)
    problem = own_problem or problem_with(outcome, decode_pb2.GenerateRequest.DESCRIPTOR)
    offences.record(problem, outcome, describe(request), request.ByteSize())


def test_generate_answers_every_request_with_a_named_status(cluster, steady):
    probe = fuzz_settings(100)(_generate_example)
    offences, hurt = run_probe(steady, lambda found: probe(cluster, steady, found))
    assert offences.calls >= 100
    assert offences.codes["OK"] >= 30  # the fuzzing does get past validation into the engine
    assert not offences and not hurt, verdict(offences, steady, hurt)


# ---- Prefill ---------------------------------------------------------------------------------

@example(request=prefill_pb2.PrefillRequest(token_ids=[1, 2, 3], sampling=common_pb2.SamplingParams(temperature=1e-40)),
         auth="token")
@example(request=prefill_pb2.PrefillRequest(token_ids=[1, 2, 3]), auth="none")
@given(request=prefill_requests(), auth=AUTH)
def _prefill_example(cluster, steady, offences, request, auth):
    with steady.beside(f"Prefill[{auth}] {describe(request)}"):
        outcome = finish_unary(lambda: cluster.prefill_stub.Prefill(request, timeout=CALL_TIMEOUT_S,
                                                                    metadata=metadata_for(auth)))
    problem = problem_with(outcome, prefill_pb2.PrefillRequest.DESCRIPTOR, authenticated=auth == "token")
    answer = outcome.response
    if problem is None and answer is not None and not (
            answer.first_token_id < VOCAB and answer.num_prompt_tokens == len(request.token_ids)):
        problem = f"OK answer is wrong: first token {answer.first_token_id}, {answer.num_prompt_tokens} prompt tokens"
    offences.record(problem, outcome, f"[{auth}] {describe(request)}", request.ByteSize())


def test_prefill_answers_every_request_with_a_named_status(cluster, steady):
    probe = fuzz_settings(60)(_prefill_example)
    offences, hurt = run_probe(steady, lambda found: probe(cluster, steady, found))
    assert offences.calls >= 50 and offences.codes["OK"] >= 20
    assert not offences and not hurt, verdict(offences, steady, hurt)


# ---- the cache store -------------------------------------------------------------------------

@st.composite
def valid_push_streams(draw, fingerprint: bytes) -> list[cache_pb2.PushBlocksRequest]:
    """A well-formed PushBlocks stream (an opening, 1-3 whole blocks): a share of every run is one,
    so that enough streams are stored to prove the fuzzing reaches the store's pool."""
    messages = [cache_pb2.PushBlocksRequest(open=cache_pb2.PushOpen(fingerprint=fingerprint, layout=REAL_LAYOUT,
                                                                      lease_seconds=30))]
    for _ in range(draw(st.integers(1, 3))):
        tokens = draw(st.lists(TOKEN_ID, min_size=16, max_size=16))
        payload = draw(st.binary(min_size=1, max_size=1)) * BLOCK_BYTES
        header = common_pb2.BlockRef(block_hash=draw(st.binary(min_size=16, max_size=16)), num_tokens=16,
                                     token_ids=tokens, checksum=checksum(payload))
        messages.append(cache_pb2.PushBlocksRequest(chunk=common_pb2.BlockChunk(data=payload, last=True, header=header)))
    return messages


@given(data=st.data(), auth=AUTH)
def _push_example(cluster, steady, offences, data, auth):
    valid = data.draw(st.integers(0, 2)) == 0  # a third or more (Hypothesis favours the ends of a range)
    messages = data.draw(valid_push_streams(cluster.fingerprint) if valid else push_streams(cluster.fingerprint))
    text = f"[{auth}] " + " | ".join(describe(m)[:300] for m in messages)
    with steady.beside("PushBlocks " + text):
        outcome = finish_unary(lambda: cluster.store_stub.PushBlocks(iter(messages), timeout=CALL_TIMEOUT_S,
                                                                     metadata=metadata_for(auth)))
    problem = problem_with(outcome, cache_pb2.PushBlocksRequest.DESCRIPTOR, authenticated=auth == "token")
    answer = outcome.response
    if problem is None and answer is not None and (
            answer.num_stored + answer.num_duplicate + answer.num_rejected != len(answer.results)):
        problem = f"OK answer does not add up: {describe(answer)}"
    offences.record(problem, outcome, text, sum(m.ByteSize() for m in messages))


def test_push_blocks_answers_every_stream_with_a_named_status(cluster, steady):
    probe = fuzz_settings(90)(_push_example)
    offences, hurt = run_probe(steady, lambda found: probe(cluster, steady, found))
    assert offences.calls >= 60 and offences.codes["OK"] >= 10, dict(offences.codes)
    assert not offences and not hurt, verdict(offences, steady, hurt)


@st.composite
def pull_requests(draw, fingerprint: bytes, held: list[bytes]) -> cache_pb2.PullBlocksRequest:
    request = cache_pb2.PullBlocksRequest(fingerprint=draw(fingerprints(fingerprint)), max_chunk_bytes=draw(mostly(
        st.sampled_from([0, 1, 4096, MAX_CHUNK_BYTES]), st.one_of(st.sampled_from([MAX_CHUNK_BYTES + 1, 2**32 - 1]), UINT32))))
    for _ in range(draw(st.integers(0, 6))):
        if held and draw(st.booleans()):
            request.blocks.append(common_pb2.BlockRef(block_hash=draw(st.sampled_from(held))))
        else:
            request.blocks.append(draw(block_refs(for_push=False)))
    if draw(mostly(st.just(False), st.just(True))):
        request.blocks.extend(common_pb2.BlockRef(block_hash=bytes(16)) for _ in range(4097))
    return request


@given(data=st.data(), auth=AUTH)
def _pull_example(cluster, steady, offences, held, data, auth):
    request = data.draw(pull_requests(cluster.fingerprint, held))
    with steady.beside(f"PullBlocks[{auth}] {describe(request)}"):
        call = cluster.store_stub.PullBlocks(request, timeout=CALL_TIMEOUT_S, metadata=metadata_for(auth))
        outcome = finish_stream(call, 12)
    problem = problem_with(outcome, cache_pb2.PullBlocksRequest.DESCRIPTOR, authenticated=auth == "token")
    offences.record(problem, outcome, f"[{auth}] {describe(request)}", request.ByteSize())


def test_pull_blocks_answers_every_request_with_a_named_status(cluster, steady):
    held = cluster.steady_block_hashes()
    probe = fuzz_settings(60)(_pull_example)
    offences, hurt = run_probe(steady, lambda found: probe(cluster, steady, found, held))
    assert offences.calls >= 60 and offences.codes["OK"] >= 15
    assert not offences and not hurt, verdict(offences, steady, hurt)


@given(data=st.data())
def _lookup_example(cluster, steady, offences, held, data):
    hashes = data.draw(st.lists(mostly(st.sampled_from(held), st.binary(max_size=33)), max_size=8))
    if data.draw(mostly(st.just(False), st.just(True))):
        hashes += [bytes(16)] * 4097
    request = cache_pb2.LookupRequest(fingerprint=data.draw(fingerprints(cluster.fingerprint)), block_hashes=hashes)
    with steady.beside(f"Lookup {describe(request)}"):
        outcome = finish_unary(lambda: cluster.store_stub.Lookup(request, timeout=CALL_TIMEOUT_S, metadata=WITH_TOKEN))
    problem = problem_with(outcome, cache_pb2.LookupRequest.DESCRIPTOR)
    if problem is None and outcome.response is not None and outcome.response.num_prefix_blocks > len(hashes):
        problem = f"OK answer counts more blocks than asked: {describe(outcome.response)}"
    offences.record(problem, outcome, describe(request), request.ByteSize())


def test_lookup_and_stats_answer_every_request_with_a_named_status(cluster, steady):
    held = cluster.steady_block_hashes()
    probe = fuzz_settings(40)(_lookup_example)
    offences, hurt = run_probe(steady, lambda found: probe(cluster, steady, found, held))
    stats = cluster.store_stub.Stats(cache_pb2.StatsRequest(), timeout=CALL_TIMEOUT_S, metadata=WITH_TOKEN)
    assert stats.layout.num_layers == 30 and stats.blocks_used <= stats.blocks_capacity
    assert offences.calls >= 40 and offences.codes["OK"] >= 15
    assert not offences and not hurt, verdict(offences, steady, hurt)


def test_the_steady_stream_was_exact_all_along(steady):
    steady.wait_for_rounds(steady.rounds + 1, timeout_s=CALL_TIMEOUT_S)
    assert steady.rounds >= 5
    assert not steady.failures, steady.report()
