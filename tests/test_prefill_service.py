"""Prefill service against a real Redis, a real cache store and the real SmolLM2 model."""

import random
import threading

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from kvcluster.engine.engine import EngineConfig, load_engine
from kvcluster.kv.blocks import prefix_hashes
from kvcluster.model.llama import PrefillSeq
from kvcluster.proto import common_pb2, prefill_pb2, prefill_pb2_grpc
from kvcluster.rpc.store_client import StoreClient
from prefill_service.config import PrefillConfig
from prefill_service.server import create_server
from tests.cluster_fixtures import channel_to, running_redis, start_store

GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
BS = 16


def words(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(200, 40_000) for _ in range(n)]


@pytest.fixture(scope="module")
def engine():
    """Without the worker-local cache, so every reuse here goes through the store (the second tier;
    tests/test_prefix_cache.py covers the first)."""
    return load_engine(device="cpu", dtype="float32", config=EngineConfig(kv_capacity_bytes=128 << 20, max_prefill_tokens=64,
                                                                          prefix_caching=False))


@pytest.fixture(scope="module")
def cluster(engine):
    with running_redis() as redis_server:
        store = start_store(redis_server.url, blocks=512)
        registry = CollectorRegistry()
        config = PrefillConfig(port=0, metrics_port=-1, redis_url=redis_server.url, store_timeout_seconds=3.0)
        prefill, port = create_server(config, engine=engine, registry=registry)
        prefill.start()
        stub = prefill_pb2_grpc.PrefillServiceStub(channel_to(port))
        yield {"redis": redis_server, "store": store, "prefill": prefill, "stub": stub, "registry": registry}
        prefill.stop(0.5)
        store.stop(0.5)


def call(cluster, token_ids, request_id="r", **kw) -> prefill_pb2.PrefillResponse:
    response = cluster["stub"].Prefill(prefill_pb2.PrefillRequest(request_id=request_id, token_ids=token_ids,
                                                                  sampling=GREEDY, **kw), timeout=120)
    cluster["store"].flush_index()
    return response


def fallbacks(cluster, reason: str) -> float:
    return cluster["registry"].get_sample_value("kvcluster_fallbacks_total", {"reason": reason}) or 0.0


def reference_kv(engine, token_ids) -> torch.Tensor:
    """K/V of the full blocks as the in-process engine computes them, in the same prefill chunks
    as the worker (matmul rounding on this CPU depends on the row count): [blocks, *block_shape]."""
    n_blocks = -(-len(token_ids) // BS)
    slots = engine.blocks.allocate(n_blocks)
    chunk = engine.config.max_prefill_tokens
    try:
        for start in range(0, len(token_ids), chunk):
            engine.model.prefill(engine.pool.kv, [PrefillSeq(token_ids[start:start + chunk], start, slots)])
        return engine.pool.kv[slots[: len(token_ids) // BS]].clone()
    finally:
        engine.blocks.free(slots)


def first_token_alone(engine, token_ids) -> int:
    slots = engine.blocks.allocate(-(-len(token_ids) // BS))
    try:
        return int(engine.model.prefill(engine.pool.kv, [PrefillSeq(token_ids, 0, slots)]).argmax())
    finally:
        engine.blocks.free(slots)


def test_cold_then_warm_reuses_all_but_the_last_block(cluster, engine):
    ids = words(100, seed=1)
    cold = call(cluster, ids)
    assert cold.num_cached_tokens == 0 and cold.num_computed_tokens == 100 and cold.bytes_pushed > 0
    warm = call(cluster, ids)
    assert warm.num_cached_tokens >= 100 - BS
    assert 1 <= warm.num_computed_tokens <= BS
    assert warm.bytes_pulled == (warm.num_cached_tokens // BS) * 737_280
    assert warm.first_token_id == cold.first_token_id == first_token_alone(engine, ids)
    # the response lists every prompt block: 6 full by hash, the 4-token tail by request key
    keys = [b.WhichOneof("key") for b in warm.blocks]
    assert keys == ["block_hash"] * 6 + ["request_key"] and warm.blocks[-1].num_tokens == 4
    assert all(b.store_address for b in warm.blocks)


def test_full_hit_at_a_block_boundary_computes_only_the_last_token(cluster, engine):
    """Every block cached: the last block is copied to a private slot and only its last token is
    recomputed (its logits give the first token)."""
    ids = words(64, seed=2)
    cold = call(cluster, ids)
    warm = call(cluster, ids)
    assert warm.num_cached_tokens == 63 and warm.num_computed_tokens == 1
    assert warm.first_token_id == cold.first_token_id == first_token_alone(engine, ids)


def test_shared_prefix_reuses_exactly_the_shared_blocks(cluster):
    prefix = words(64, seed=3)
    call(cluster, prefix + words(30, seed=4))
    second = call(cluster, prefix + words(25, seed=5))
    assert second.num_cached_tokens == 64
    assert second.num_computed_tokens == 25


def test_pushed_blocks_equal_in_process_kv_bitwise(cluster, engine):
    ids = words(80, seed=6)
    response = call(cluster, ids)
    hashes = prefix_hashes(engine.fingerprint, ids, BS)
    assert [b.block_hash for b in response.blocks] == hashes
    client = StoreClient(f"127.0.0.1:{cluster['store'].port}", engine.layout)
    pulled = client.pull_blocks(engine.fingerprint, hashes)
    client.close()
    assert len(pulled.blocks) == 5
    expected = reference_kv(engine, ids)
    for i, (header, payload) in enumerate(pulled.blocks):
        assert list(header.token_ids) == ids[i * BS:(i + 1) * BS]
        got = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(engine.layout.block_shape)
        assert torch.equal(got, expected[i])


def test_four_concurrent_prefills_equal_sequential(cluster):
    prompts = [words(n, seed=100 + n) for n in (20, 47, 130, 75)]
    sequential = [call(cluster, p, request_id=f"s{i}", bypass_cache=True).first_token_id for i, p in enumerate(prompts)]
    results: dict[int, prefill_pb2.PrefillResponse] = {}

    def run(i: int) -> None:
        results[i] = cluster["stub"].Prefill(prefill_pb2.PrefillRequest(
            request_id=f"c{i}", token_ids=prompts[i], sampling=GREEDY, bypass_cache=True), timeout=120)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i].first_token_id for i in range(4)] == sequential
    assert [results[i].num_computed_tokens for i in range(4)] == [20, 47, 130, 75]
    batches = cluster["registry"].get_sample_value("kvcluster_prefill_batch_size_count")
    assert batches and batches > 0


@pytest.mark.parametrize("token_ids, field", [
    ([], "token_ids"),
    ([5, 49152], "token_ids"),
    ([7] * 8192, "token_ids"),
])
def test_bad_input_is_invalid_argument_naming_the_field(cluster, token_ids, field):
    with pytest.raises(grpc.RpcError) as err:
        cluster["stub"].Prefill(prefill_pb2.PrefillRequest(token_ids=token_ids, sampling=GREEDY), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_shaping_fields_reach_the_first_token(cluster):
    """logit_bias, the repetition penalty and min_tokens (beyond the one token prefill samples) apply."""
    forced = 4321
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, repetition_penalty=1.5,
                                         logit_bias={forced: 100.0})
    response = cluster["stub"].Prefill(prefill_pb2.PrefillRequest(request_id="shaped", token_ids=words(40, seed=9),
                                                                  sampling=sampling), timeout=120)
    assert response.first_token_id == forced


def test_bad_sampling_is_invalid_argument(cluster):
    with pytest.raises(grpc.RpcError) as err:
        cluster["stub"].Prefill(prefill_pb2.PrefillRequest(
            token_ids=[5, 6], sampling=common_pb2.SamplingParams(top_p=1.5)), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.top_p" in err.value.details()


def test_store_down_falls_back_to_compute(cluster, engine):
    ids = words(70, seed=7)
    cold = call(cluster, ids)
    store = cluster["store"]
    store.stop(0.2, deregister=False)  # a crash: its index entries stay behind
    try:
        before = fallbacks(cluster, "store_unavailable")
        down = cluster["stub"].Prefill(prefill_pb2.PrefillRequest(token_ids=ids, sampling=GREEDY), timeout=60)
        assert down.first_token_id == cold.first_token_id
        assert down.num_cached_tokens == 0 and down.num_computed_tokens == 70
        assert fallbacks(cluster, "store_unavailable") > before
    finally:
        cluster["store"] = start_store(cluster["redis"].url, blocks=512, store_id=store.store_id, port=store.port)


def test_redis_down_falls_back_to_compute(cluster):
    ids = words(50, seed=8)
    cold = call(cluster, ids)
    cluster["redis"].stop()
    try:
        before = fallbacks(cluster, "redis_unavailable")
        down = cluster["stub"].Prefill(prefill_pb2.PrefillRequest(token_ids=ids, sampling=GREEDY), timeout=60)
        assert down.first_token_id == cold.first_token_id
        assert down.num_cached_tokens == 0
        assert fallbacks(cluster, "redis_unavailable") > before
    finally:
        cluster["redis"].restart()
