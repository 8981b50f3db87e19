"""The fleet simulator (bench/fleet_sim.py) on a slice of the Mooncake conversation trace, and the
in-process prefix index it routes with (kvcluster/kv/prefix_index.py) against the Redis one."""

import dataclasses
import random

import pytest

from bench.fleet_sim import (POLICIES, TRACES_DIR, CostModel, FleetConfig, FleetSim, TraceRequest, ceiling_hit_ratio,
                             load_trace, simulate)
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


def shared_host_ttfts(arrivals: list[float], replicas_per_host: int, host_cores: float, threads: int) -> list[float]:
    """TTFTs of one cold 4-block prompt per arrival, on as many replicas (round robin: one each), one token each."""
    requests = [TraceRequest(at, 4 * 512, 1, tuple(bytes([i, b]) * 8 for b in range(4)))
                for i, at in enumerate(arrivals)]
    config = FleetConfig("round_robin", replicas=len(arrivals), replica_blocks=64, store_shards=1,
                         store_blocks_per_shard=1, cost=dataclasses.replace(COST, threads=threads),
                         replicas_per_host=replicas_per_host, host_cores=host_cores)
    sim = FleetSim(config)
    sim.run(requests)
    return [sim.per_request[i]["ttft_s"] for i in range(len(requests))]


def test_replicas_sharing_a_host_slow_each_other_down_by_its_cores_over_their_threads():
    """Processor sharing: two 2-thread replicas busy at once on a 2-core host each take twice as long
    as one alone; on hosts of their own (the default, a GPU fleet) or with enough cores, not at all;
    a prefill that a second one joins halfway goes on at half speed (alone: W; together: 1.5 W, 1.5 W)."""
    alone = COST.prefill(4 * 512)
    assert shared_host_ttfts([0.0], 2, 2, 2) == pytest.approx([alone])
    assert shared_host_ttfts([0.0, 0.0], 2, 2, 2) == pytest.approx([2 * alone, 2 * alone])
    assert shared_host_ttfts([0.0, 0.0], 1, 0, 2) == pytest.approx([alone, alone])   # one replica per host
    assert shared_host_ttfts([0.0, 0.0], 1, 2, 2) == pytest.approx([alone, alone])   # 2 cores each
    assert shared_host_ttfts([0.0, 0.0], 2, 4, 2) == pytest.approx([alone, alone])   # enough cores for both
    assert shared_host_ttfts([0.0, 0.0], 2, 2, 1) == pytest.approx([alone, alone])   # 1 thread each
    assert shared_host_ttfts([0.0, 0.0, 0.0, 0.0], 2, 2, 2) == pytest.approx([2 * alone] * 4)  # 2 hosts of 2
    assert shared_host_ttfts([0.0, alone / 2], 2, 2, 2) == pytest.approx([1.5 * alone, 1.5 * alone])
    assert FleetConfig("round_robin", 2, 1, 1, 1, COST).speed(2) == 1.0


def test_one_replica_per_host_is_the_default_and_sharing_only_slows_the_fleet(trace_slice):
    shared = dataclasses.replace(config("cache_aware"), replicas_per_host=2, host_cores=2,
                                 cost=dataclasses.replace(COST, threads=2))
    unshared = dataclasses.replace(shared, host_cores=0)
    assert simulate(trace_slice, unshared) == simulate(trace_slice, config("cache_aware"))
    slow, fast = simulate(trace_slice, shared), simulate(trace_slice, unshared)
    assert slow["ttft_s"]["p50"] > fast["ttft_s"]["p50"]
    assert slow["makespan_s"] >= fast["makespan_s"]


CONTEXT_COST = dataclasses.replace(COST, context_s_per_token=5e-6, attend_s_per_token_pair=6e-7)


def test_a_prefill_after_cached_tokens_costs_the_context_terms_more():
    """N new tokens after C cached: C x context_s_per_token + N x C x attend_s_per_token_pair more
    than the flat model; nothing more without cached tokens; a decode step adds each sequence's."""
    for new, cached in ((1, 0), (16, 1024), (64, 2048), (256, 256)):
        extra = cached * 5e-6 + new * cached * 6e-7
        assert CONTEXT_COST.prefill(new, cached) == pytest.approx(COST.prefill(new) + extra)
        assert COST.prefill(new, cached) == COST.prefill(new)
    assert CONTEXT_COST.decode_step(2, [100, 3000]) == pytest.approx(COST.decode_step(2) + 3100 * (5e-6 + 6e-7))


def test_the_context_terms_slow_a_cached_turn_in_the_simulator_by_exactly_their_cost():
    """A second turn whose first 4 blocks the replica holds: its TTFT grows by the terms at C = 4
    blocks, N = its one computed block; the cold first turn's (C = 0) not at all."""
    turn = tuple(bytes([b]) * 16 for b in range(5))
    requests = [TraceRequest(0.0, 4 * 512, 1, turn[:4]), TraceRequest(100.0, 5 * 512, 1, turn)]

    def ttfts(cost: CostModel) -> list[float]:
        sim = FleetSim(FleetConfig("round_robin", 1, 64, 1, 1, cost))
        sim.run(requests)
        return [sim.per_request[i]["ttft_s"] for i in range(2)]

    flat, context = ttfts(COST), ttfts(CONTEXT_COST)
    assert context[0] == pytest.approx(flat[0])
    assert context[1] - flat[1] == pytest.approx(2048 * 5e-6 + 512 * 2048 * 6e-7)


def test_zero_context_terms_leave_the_summaries_as_they_were(trace_slice, results):
    """The default (both 0) is the model before the terms: the same figures on the trace slice; with
    them every TTFT percentile grows (the trace's turns carry long cached contexts)."""
    explicit = dataclasses.replace(config("cache_aware"),
                                   cost=dataclasses.replace(COST, context_s_per_token=0.0, attend_s_per_token_pair=0.0))
    assert simulate(trace_slice, explicit) == results["cache_aware"]
    slower = simulate(trace_slice, dataclasses.replace(config("cache_aware"), cost=CONTEXT_COST))
    for q in ("p50", "p90", "p99"):
        assert slower["ttft_s"][q] > results["cache_aware"]["ttft_s"][q]


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
