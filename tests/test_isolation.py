"""One request's failure never fails another; every leak and bound of issue 13, with counts and
pins back to zero afterwards."""

import math
import threading
from dataclasses import replace

import grpc
import pytest
from prometheus_client import CollectorRegistry

from cache_store.pool import LeaseBudgetExceeded, StorePool
from decode_service.config import DecodeConfig
from decode_service.server import create_server as create_decode
from kvcluster.client import Client
from kvcluster.engine.engine import EngineConfig, load_engine
from kvcluster.engine.sampling import SamplingParams
from kvcluster.errors import InvalidArgument, RequestFailed
from kvcluster.kv.block_io import batch_to_payloads
from kvcluster.kv.blocks import prefix_hashes
from kvcluster.kv.index import RedisIndex
from kvcluster.model.llama import PrefillSeq
from kvcluster.proto import cache_pb2, common_pb2, prefill_pb2, prefill_pb2_grpc
from kvcluster.rpc.store_client import StoreClient, make_ref
from kvcluster.worker.engine_worker import EngineWorker
from prefill_service.config import PrefillConfig
from prefill_service.server import create_server as create_prefill
from tests.cluster_fixtures import SMOLLM_BLOCK_BYTES, channel_to, running_redis, start_store
from tests.conftest import make_tiny_engine
from tests.store_fixtures import (BIG_LAYOUT, SMALL_LAYOUT, fingerprint_for, held_pull, make_blocks,  # noqa: F401
                                  redis_server, redis_url, store_config, store_factory, tail_block, wait_until)
from tests.test_engine_tiny import prompt

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
FP = fingerprint_for(SMALL_LAYOUT)


# ---- validation: every number the sampling math cannot take is refused at admission -------------

@pytest.mark.parametrize("field, value", [
    ("temperature", 1e-45), ("temperature", 1e-30), ("temperature", 5e-5), ("temperature", math.nan),
    ("temperature", math.inf), ("temperature", -0.5), ("temperature", 101.0), ("top_p", 1e-45),
    ("top_p", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 10**9)])
def test_sampling_numbers_the_math_cannot_take_are_rejected_with_their_range(field, value):
    with pytest.raises(InvalidArgument, match=rf"sampling\.{field}: must be .*\d.*got"):
        replace(SamplingParams(), **{field: value}).validate(vocab_size=49152, max_tokens_limit=8192)


def test_the_edges_of_the_ranges_are_accepted_as_the_wire_carries_them():
    wire = common_pb2.SamplingParams(temperature=1e-4, top_p=1e-6)  # float32: 1e-4 becomes 9.99999975e-05
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=wire.temperature),
                   SamplingParams(temperature=100), SamplingParams(top_p=wire.top_p), SamplingParams(top_k=49152)):
        params.validate(vocab_size=49152, max_tokens_limit=8192)


# ---- the engine fails only the culprit --------------------------------------------------------

def run_to_end(engine, seqs) -> None:
    while any(s.finish_reason is None for s in seqs):
        engine.step()


def solo_outputs(tokenizer, prompts) -> list[list[int]]:
    engine = make_tiny_engine(tokenizer)
    return [engine.generate_batch([p], GREEDY)[0] for p in prompts]


def test_a_sampling_failure_fails_only_its_request(tokenizer):
    prompts = [prompt(20 + 7 * i, seed=i) for i in range(3)]
    expected = solo_outputs(tokenizer, prompts)
    engine = make_tiny_engine(tokenizer)
    seqs = [engine.add_request(p, GREEDY) for p in prompts]
    # Past validation (as a bug or a new parameter might let through): logits / 1e-45 overflow.
    seqs[1].params = replace(GREEDY, temperature=1e-45)
    run_to_end(engine, seqs)
    (failed_id, error), = engine.take_failures()
    assert failed_id == seqs[1].request_id and isinstance(error, InvalidArgument) and error.field == "sampling"
    assert [seqs[0].output_ids, seqs[2].output_ids] == [expected[0], expected[2]]
    assert engine.blocks.num_used == 0 and not engine.has_work()


def test_a_forward_failure_fails_only_its_request(tokenizer):
    prompts = [prompt(30 + 5 * i, seed=10 + i) for i in range(3)]
    expected = solo_outputs(tokenizer, prompts)
    engine = make_tiny_engine(tokenizer)
    seqs = [engine.add_request(p, GREEDY) for p in prompts]
    for _ in range(len(seqs)):  # prompts share steps up to PACK_TOKENS: all run within three steps
        engine.step()
        if all(s in engine.running for s in seqs):
            break
    assert all(s in engine.running for s in seqs)
    seqs[0].output_ids[-1] = engine.model_config.vocab_size + 5  # its next decode input: the forward raises
    run_to_end(engine, seqs[1:])
    (failed_id, error), = engine.take_failures()
    assert failed_id == seqs[0].request_id and isinstance(error, RequestFailed)
    assert [seqs[1].output_ids, seqs[2].output_ids] == expected[1:]
    assert not engine.has_work()


def test_the_worker_delivers_a_failure_to_its_stream_only(tokenizer):
    engine = make_tiny_engine(tokenizer)
    worker = EngineWorker(engine).start()
    try:
        good_prompt = prompt(40, seed=3)
        expected = solo_outputs(tokenizer, [good_prompt])[0]

        def poisoned(eng):
            seq = eng.add_request(prompt(25, seed=4), GREEDY)
            seq.params = replace(GREEDY, temperature=1e-45)
            return seq

        results: dict[str, object] = {}

        def good() -> None:
            results["good"] = [e.token_id for e in worker.stream(lambda eng: eng.add_request(good_prompt, GREEDY))]

        thread = threading.Thread(target=good)
        thread.start()
        with pytest.raises(InvalidArgument, match="sampling"):
            list(worker.stream(poisoned))
        thread.join(60)
        assert results["good"] == expected
        assert worker.call(lambda eng: eng.blocks.num_used) == 0
    finally:
        worker.stop()


def test_a_full_pool_makes_a_prompt_wait_not_fail(tokenizer):
    """Blocks kept for their owner (a finished prefill awaiting export) fill the pool: the next
    prompt waits (the worker does not spin), then runs once they are released."""
    engine = make_tiny_engine(tokenizer, kv_blocks=6)
    holder = engine.add_request(prompt(70, seed=1), replace(GREEDY, max_tokens=1), keep_blocks=True)
    run_to_end(engine, [holder])
    assert engine.blocks.num_free == 1
    waiting = engine.add_request(prompt(40, seed=2), replace(GREEDY, max_tokens=2))
    assert engine.step() == [] and engine.last_step == ("idle", 0) and not engine.take_failures()
    engine.release(holder)
    run_to_end(engine, [waiting])
    assert len(waiting.output_ids) == 2 and engine.blocks.num_used == 0


# ---- leaks and bounds in the services -----------------------------------------------------------

@pytest.fixture(scope="module")
def small_engine():
    """SmolLM2 with a 4-block pool: a 64-token prompt's 3 cached blocks fit, the prompt does not."""
    return load_engine(device="cpu", dtype="float32", config=EngineConfig(
        kv_capacity_bytes=4 * SMOLLM_BLOCK_BYTES, max_prefill_tokens=32))


def test_prefill_refused_after_importing_blocks_leaks_no_slot(small_engine):
    ids = prompt(64, seed=5)
    bs = small_engine.config.block_size
    # The store holds the prompt's first 3 blocks, computed by this very engine.
    slots = small_engine.blocks.allocate(4)
    small_engine.model.prefill(small_engine.pool.kv, [PrefillSeq(ids, 0, slots)])
    payloads = batch_to_payloads(small_engine.read_blocks(slots[:3]))
    small_engine.blocks.free(slots)
    hashes = prefix_hashes(small_engine.fingerprint, ids, bs)
    blocks = [(make_ref(payload, ids[i * bs:(i + 1) * bs], hashes[i]), payload) for i, payload in enumerate(payloads)]
    with running_redis() as redis_server:
        store = start_store(redis_server.url, blocks=16)
        client = StoreClient(f"127.0.0.1:{store.port}", small_engine.layout)
        assert client.push_blocks(small_engine.fingerprint, blocks).num_stored == 3
        client.close()
        assert store.flush_index()
        prefill, port = create_prefill(PrefillConfig(port=0, metrics_port=-1, redis_url=redis_server.url,
                                                     store_wait_seconds=2.0), engine=small_engine,
                                       registry=CollectorRegistry())
        prefill.start()
        try:
            stub = prefill_pb2_grpc.PrefillServiceStub(channel_to(port))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Prefill(prefill_pb2.PrefillRequest(request_id="leak", token_ids=ids, sampling=common_pb2.SamplingParams(
                    temperature=0.0)), timeout=60)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert prefill.worker.call(lambda eng: eng.blocks.num_free) == 4
        finally:
            prefill.stop(0)
            store.stop(0)


def test_prefill_stops_computing_when_its_caller_leaves():
    big = load_engine(device="cpu", dtype="float32", config=EngineConfig(kv_capacity_bytes=96 << 20,
                                                                          max_prefill_tokens=32))
    prefill, port = create_prefill(PrefillConfig(port=0, metrics_port=-1, redis_url=""), engine=big,
                                   registry=CollectorRegistry())
    prefill.start()
    try:
        stub = prefill_pb2_grpc.PrefillServiceStub(channel_to(port))
        ids = prompt(1200, seed=6)  # 38 chunks of 32 tokens
        with pytest.raises(grpc.RpcError) as expired:
            stub.Prefill(prefill_pb2.PrefillRequest(request_id="gone", token_ids=ids,
                                                    sampling=common_pb2.SamplingParams(temperature=0.0)), timeout=0.5)
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The engine dropped the prompt (a 1200-token prefill takes seconds here, so it did not finish).
        assert wait_until(lambda: prefill.worker.call(lambda eng: not eng.has_work() and eng.blocks.num_used == 0),
                          timeout_s=2.0)
        # The same request id twice at once (callers' ids may repeat) both complete.
        outcomes = []
        threads = [threading.Thread(target=lambda: outcomes.append(stub.Prefill(prefill_pb2.PrefillRequest(
            request_id="same", token_ids=prompt(40, seed=7), sampling=common_pb2.SamplingParams(temperature=0.0)),
            timeout=60).first_token_id)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(outcomes) == 2 and outcomes[0] == outcomes[1]
    finally:
        prefill.stop(0)


def test_decode_drops_and_counts_pushes_beyond_its_queue(smollm_engine):
    with running_redis() as redis_server:
        store = start_store(redis_server.url, blocks=64)
        registry = CollectorRegistry()
        decode, port = create_decode(DecodeConfig(port=0, metrics_port=-1, redis_url=redis_server.url,
                                                  prefill_target="", max_pending_pushes=0, store_wait_seconds=2.0),
                                     engine=smollm_engine, registry=registry)
        decode.start()
        try:
            with Client(f"127.0.0.1:{port}") as client:
                for _ in range(2):
                    client.generate(prompt="Tell me about the sea. " * 8, max_tokens=4, temperature=0.0)
            decode.generator.flush_pushes()
            assert registry.get_sample_value("kvcluster_generated_pushes_dropped_total") == 2
            assert store.pool.stats().blocks_used == 0
            assert decode.worker.call(lambda eng: eng.blocks.num_used) == 0
        finally:
            decode.stop(0)
            store.stop(0)


def test_one_pusher_cannot_fill_a_pool_with_leased_tail_blocks():
    pool = StorePool(SMALL_LAYOUT, 8)  # a quarter: 2 leased blocks per pusher
    for i in range(2):
        header, payload = tail_block(SMALL_LAYOUT, f"a-{i}", seed=i)
        assert pool.store(f"a-{i}", FP, header, payload, 30.0, pusher="a")
    header, payload = tail_block(SMALL_LAYOUT, "a-2", seed=2)
    with pytest.raises(LeaseBudgetExceeded, match="already holds 2 leased"):
        pool.store("a-2", FP, header, payload, 30.0, pusher="a")
    assert pool.store("b-0", FP, *tail_block(SMALL_LAYOUT, "b-0", seed=3), 30.0, pusher="b")
    for i in range(2):  # completed pulls consume the leases
        pool.pin(FP, [f"a-{i}"], owner=i)
        pool.release(i, consumed=True)
    assert pool.leased_by("a") == 0 and pool.leased_by("b") == 1
    assert pool.store("a-2", FP, header, payload, 30.0, pusher="a")


def test_the_store_rejects_a_pushers_tail_block_beyond_its_budget(redis_url, store_factory):
    _, client = store_factory(store_config(redis_url, blocks=8))
    tails = [tail_block(SMALL_LAYOUT, f"req-{i}", seed=i) for i in range(3)]
    response = client.push_blocks(FP, tails)
    status = cache_pb2.BlockPushResult.Status
    assert [r.status for r in response.results] == [status.STORED, status.STORED, status.REJECTED]
    assert "leased tail blocks" in response.results[2].reason


def test_a_stalled_pull_is_cancelled_and_its_pins_released(redis_url, store_factory):
    fingerprint = fingerprint_for(BIG_LAYOUT)
    store, client = store_factory(store_config(redis_url, BIG_LAYOUT, blocks=4, stream_idle_seconds=0.5))
    blocks = make_blocks(BIG_LAYOUT, 3, fingerprint=fingerprint)
    client.push_blocks(fingerprint, blocks)
    with held_pull(f"127.0.0.1:{store.port}", fingerprint, [h.block_hash for h, _ in blocks]):
        assert client.stats().pinned_blocks == 3  # the reader stopped reading
        assert wait_until(lambda: client.stats().pinned_blocks == 0, timeout_s=20)
    assert store.servicer.watchdog.cancelled == 1


def test_index_entries_of_a_store_that_never_returns_are_collected(redis_url, store_factory):
    dead, client = store_factory(store_config(redis_url, store_id="gone", heartbeat_ttl_seconds=0.5))
    client.push_blocks(FP, make_blocks(SMALL_LAYOUT, 3))
    assert dead.flush_index()
    dead.stop(grace_s=0, deregister=False)  # a crash: entries stay behind
    index = RedisIndex(redis_url)
    try:
        assert wait_until(lambda: not index.redis.exists("kvc:alive:gone"))
        assert index.redis.sismember("kvc:stores", "gone") and index.redis.scard("kvc:entries:gone:1") == 3
        assert index.collect_dead_stores(grace_s=0.2) == []  # first sighting: stamped dead
        assert wait_until(lambda: index.collect_dead_stores(grace_s=0.2) == ["gone"], timeout_s=5)
        assert not index.redis.sismember("kvc:stores", "gone") and not index.redis.exists("kvc:store:gone")
        assert not index.redis.exists("kvc:entries:gone:1") and not index.redis.keys("kvc:blk:*")
    finally:
        index.close()
