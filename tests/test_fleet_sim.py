"""The fleet simulator (bench/fleet_sim.py) on a slice of the Mooncake conversation trace, and the
in-process prefix index it routes with (kvcluster/kv/prefix_index.py) against the Redis one."""

import dataclasses
import random

import pytest

from bench.fleet_sim import (POLICIES, TRACES_DIR, CostModel, FleetConfig, ceiling_hit_ratio, load_trace,
                             simulate)
from kvcluster.kv.block_manager import BlockManager
from kvcluster.kv.index import RedisIndex, StoreRef, worker_namespace
from kvcluster.kv.prefix_index import PrefixIndex
from tests.cluster_fixtures import running_redis

TRACE = TRACES_DIR / "mooncake_conversation_trace.jsonl"
COST = CostModel("test", "made up", prefill_s_per_token=30e-6, decode_step_s={1: 0.007, 32: 0.03},
                 pull_s_per_block=0.003, max_batch=32)

pytestmark = pytest.mark.skipif(not TRACE.exists(), reason="the Mooncake traces are not on this machine")


@pytest.fixture(scope="module")
def trace_slice():
    return load_trace(TRACE, limit=1000)


def config(policy: str, replica_blocks: int = 4096, store_blocks: int = 4096) -> FleetConfig:
    return FleetConfig(policy, replicas=4, replica_blocks=replica_blocks, store_shards=2,
                       store_blocks_per_shard=store_blocks, cost=COST)


@pytest.fixture(scope="module")
def results(trace_slice):
    return {policy: simulate(trace_slice, config(policy)) for policy in POLICIES}


def test_cache_aware_finds_more_of_the_prompt_locally_than_round_robin(results):
    aware, rr = results["cache_aware"], results["round_robin"]
    assert aware["tier_share"]["local"] > 1.5 * rr["tier_share"]["local"]
    assert aware["hit_ratio"] >= rr["hit_ratio"]


def test_cache_aware_weighs_the_held_prefix_against_queued_prefill_and_does_not_herd(trace_slice):
    """16 replicas of 64 blocks: the default weight (a held token = a queued prefill token) keeps the
    replicas' busy time even and TTFT no worse than round robin; a held token worth 1000 queued ones
    (as the old score, a block worth a queued request, did) herds turns onto the replica holding them."""
    def run(policy: str, weight: float = 1.0) -> dict:
        return simulate(trace_slice, dataclasses.replace(config(policy), replicas=16, replica_blocks=64,
                                                          overlap_weight=weight))
    aware, rr, herding = run("cache_aware"), run("round_robin"), run("cache_aware", 1000.0)
    assert aware["ttft_s"]["p50"] <= rr["ttft_s"]["p50"] < herding["ttft_s"]["p50"]
    assert aware["load_imbalance"] < 1.4 < herding["load_imbalance"]
    assert aware["tier_share"]["local"] > rr["tier_share"]["local"]


def test_no_policy_beats_the_infinite_cache_and_every_block_is_in_one_tier(trace_slice, results):
    ceiling = ceiling_hit_ratio(trace_slice)
    blocks = sum(len(r.block_hashes) for r in trace_slice)
    for result in results.values():
        assert result["ceiling"] == round(ceiling, 4)
        assert result["hit_ratio"] <= ceiling + 1e-9
        assert sum(result["tier_blocks"].values()) == blocks == result["blocks"]


def test_a_bigger_store_only_adds_hits_and_no_store_means_only_local_ones(trace_slice, results):
    no_store = simulate(trace_slice, config("round_robin", store_blocks=1))
    assert no_store["tier_blocks"]["store"] <= 2 * len(trace_slice)  # one block per shard at most
    assert no_store["hit_ratio"] < results["round_robin"]["hit_ratio"]


def test_the_run_is_deterministic(trace_slice, results):
    again = simulate(trace_slice, config("cache_aware"))
    assert again == results["cache_aware"]


def test_every_request_gets_a_first_token_and_ttft_is_ordered(trace_slice, results):
    for result in results.values():
        assert result["requests"] == len(trace_slice)
        ttft = result["ttft_s"]
        assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"]
        assert result["load_imbalance"] >= 1.0


def test_prefix_index_follows_a_block_managers_events():
    index = PrefixIndex()
    pool = BlockManager(num_blocks=2)
    pool.listener = index.sink("a")
    a, b = StoreRef("a", "x"), StoreRef("b", "y")
    hashes = [bytes([i]) * 16 for i in range(3)]
    slots = pool.allocate(2)
    pool.register(hashes[0], slots[0])
    pool.register(hashes[1], slots[1])
    assert index.held_prefix(hashes, [a, b]) == [2, 0]
    pool.free(slots)
    pool.register(hashes[2], pool.allocate(1)[0])  # evicts hashes[0]: nothing leading is held
    assert index.held_prefix(hashes, [a, b]) == [0, 0]
    assert index.held_prefix(hashes[1:], [b, a]) == [0, 2]


def test_prefix_index_answers_as_the_redis_index_does():
    rng = random.Random(7)
    hashes = [rng.randbytes(16) for _ in range(12)]
    local = PrefixIndex()
    with running_redis() as server:
        redis_index = RedisIndex(server.url, worker_namespace("t29", "decode"), kv_events=True)
        members = []
        for m in range(6):
            epoch = redis_index.register(f"w{m}", f"127.0.0.1:{m}", ttl_s=30)
            held = [h for h in hashes if rng.random() < 0.8]
            redis_index.add_entries(f"w{m}", epoch, held)
            local.sink(f"w{m}").blocks_added(held)
            members.append(next(s for s in redis_index.live_stores() if s.store_id == f"w{m}"))
        for start in range(0, 6):
            prompt = hashes[start:]
            assert local.held_prefix(prompt, members) == redis_index.held_prefix(prompt, members)
        local.drop_member("w0")
        assert local.held_prefix(hashes, members)[0] == 0
        redis_index.close()


def test_router_scale_routes_the_probe_to_the_replica_holding_all_of_it():
    from bench.router_scale import CONVERSATION_BLOCKS, SYSTEM_BLOCKS, measure
    with running_redis() as server:
        result = measure(replicas=8, blocks_per_replica=SYSTEM_BLOCKS + CONVERSATION_BLOCKS + 5, rounds=40,
                         redis_url=server.url)
    assert result["distinct_blocks"] == SYSTEM_BLOCKS + 8 * (CONVERSATION_BLOCKS + 5)
    for source in ("prefix_index", "redis_held_prefix"):
        assert result[source]["overlap_of_chosen"] == result["prompt_blocks"] == SYSTEM_BLOCKS + CONVERSATION_BLOCKS
