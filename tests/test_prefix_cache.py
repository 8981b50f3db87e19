"""The worker-local prefix cache (the first KV tier): shared, reference-counted blocks in the
paged pool, LRU eviction, in-flight deduplication, one-token warm forwards, and the two tiers
through a real cluster (Redis, a cache store, prefill and decode with the real SmolLM2)."""

import random
import threading
from dataclasses import replace

import pytest
import torch

from kvcluster.engine.engine import EngineConfig
from kvcluster.engine.sampling import SamplingParams
from kvcluster.engine.scheduler import PACK_TOKENS
from kvcluster.kv.block_manager import BlockManager
from kvcluster.proto import common_pb2, decode_pb2
from tests.cluster_fixtures import in_process_cluster
from tests.conftest import make_tiny_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
BS = 16


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(200, 40_000) for _ in range(n)]


def no_cache(engine, prompt, params=GREEDY) -> list[int]:
    return [e.token_id for e in engine.generate_no_cache(prompt, params)]


def check_pool(blocks: BlockManager) -> None:
    """Every slot is exactly one of: referenced, free, evictable (a cached block nobody uses)."""
    blocks.check()


# ---- the pool's bookkeeping ------------------------------------------------------------------

def small_pool(blocks: int = 6) -> BlockManager:
    return BlockManager(blocks)


def test_matched_blocks_are_shared_and_kept_after_release_until_evicted():
    pool = small_pool(4)
    a = pool.allocate(2)
    assert pool.register(b"h0", a[0]) and pool.register(b"h1", a[1])
    assert not pool.register(b"h0", a[1])  # a hash lives in one slot
    shared = pool.match([b"h0", b"h1", b"h2"])
    assert shared == a and pool.refs(a[0]) == 2
    pool.free(a)
    pool.free(shared)
    assert pool.num_used == 0 and pool.num_free == 4 and pool.num_cached == 2  # kept, evictable
    assert pool.peek([b"h0", b"h1"]) == 2
    taken = pool.allocate(3)  # 2 free slots, then the least recently used cached block
    assert pool.evictions == 1 and pool.peek([b"h0"]) == 0 and pool.peek([b"h1"]) == 1 and pool.num_cached == 1
    pool.free(taken)
    check_pool(pool)


def test_least_recently_used_block_is_evicted_first():
    pool = small_pool(3)
    slots = pool.allocate(3)
    for i, slot in enumerate(slots):
        pool.register(f"h{i}".encode(), slot)
    pool.free(slots)                   # all evictable, LRU order h0, h1, h2
    pool.free(pool.match([b"h0"]))     # h0 used again: now the most recent
    pool.allocate(1)
    assert pool.peek([b"h0"]) == 1 and pool.peek([b"h1"]) == 0 and pool.peek([b"h2"]) == 1


def test_releasing_a_slot_twice_is_refused():
    pool = small_pool(2)
    slots = pool.allocate(1)
    pool.free(slots)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.free(slots)


# ---- the engine ------------------------------------------------------------------------------

def test_concurrent_sequences_share_the_physical_blocks_of_their_common_prefix(tokenizer):
    engine = make_tiny_engine(tokenizer)
    prefix = tokens(48, seed=1)
    prompts = [prefix + tokens(10, seed=2), prefix + tokens(7, seed=3)]
    first = engine.add_request(prompts[0], GREEDY)
    engine.step()  # the first prompt is computed and its 3 full blocks registered
    second = engine.add_request(prompts[1], GREEDY)
    assert second.block_table[:3] == first.block_table[:3] and second.num_computed == 48
    assert all(engine.blocks.refs(s) == 2 for s in first.block_table[:3])
    while engine.has_work():
        engine.step()
    assert [first.output_ids, second.output_ids] == [no_cache(engine, p) for p in prompts]
    assert second.sources.local_cache == 48 and second.sources.computed == 7
    assert engine.blocks.num_used == 0 and engine.blocks.num_cached == 3  # 62 and 59 tokens: 3 full blocks, shared
    check_pool(engine.blocks)


@pytest.mark.parametrize("length", [64, 70])
def test_a_fully_cached_prompt_computes_only_what_is_new(tokenizer, length):
    """At a block boundary every block is cached: one token is recomputed in a private copy of the
    last block, which stays untouched for the others sharing it."""
    engine = make_tiny_engine(tokenizer)
    prompt = tokens(length, seed=4)
    cold = engine.generate_batch([prompt], GREEDY)[0]
    before = engine.tokens_computed
    cached_kv = engine.pool.kv.clone()
    warm = engine.add_request(prompt, GREEDY)
    shared_tail = engine.blocks._slot_of[warm.block_hashes[-1]] if length % BS == 0 else None
    while engine.has_work():
        engine.step()
    assert warm.output_ids == cold == no_cache(engine, prompt)
    assert engine.tokens_computed - before == (1 if length % BS == 0 else length % BS)
    assert warm.sources.local_cache == length - (engine.tokens_computed - before)
    if shared_tail is not None:  # copy-on-write: the shared block's bytes did not change
        assert torch.equal(engine.pool.kv[shared_tail], cached_kv[shared_tail])
    check_pool(engine.blocks)


@pytest.mark.parametrize("budget", [512, 48])
def test_concurrent_cold_prompts_with_one_prefix_compute_it_once(tokenizer, budget):
    """8 prompts sharing a 320-token prefix (the tiny model's context is 512) arrive together: the
    first computes the prefix, the others wait for its blocks instead of computing them again
    (counted in tokens, not time). With the default budget the first prompt fills its steps alone
    (PACK_TOKENS); with chunks smaller than that, the others share its steps and are deferred while
    it computes the blocks they need (in-flight deduplication). The cluster test below does the
    issue's 512 tokens."""
    engine = make_tiny_engine(tokenizer, max_batch=8, max_prefill_tokens=budget)
    prefix = tokens(320, seed=5)
    suffixes = [tokens(random.Random(i).randrange(8, 60), seed=10 + i) for i in range(8)]
    prompts = [prefix + s for s in suffixes]
    outputs = engine.generate_batch(prompts, GREEDY)
    budget = 1.25 * (320 + sum(map(len, suffixes)))
    assert engine.tokens_computed <= budget, f"{engine.tokens_computed} prompt tokens computed, budget {budget:.0f}"
    assert engine.deferrals > 0 or budget >= PACK_TOKENS
    assert outputs == [no_cache(engine, p) for p in prompts]
    check_pool(engine.blocks)


def test_a_thousand_mixed_requests_with_cancels_leak_and_double_free_nothing(tokenizer):
    """Shared prefixes, a pool small enough to evict and preempt, cancels at random points: every
    slot ends free or evictable, never released twice (the pool raises on that)."""
    engine = make_tiny_engine(tokenizer, kv_blocks=40, max_batch=6, max_prefill_tokens=96)
    rng = random.Random(7)
    prefixes = [tokens(rng.randrange(16, 120), seed=100 + i) for i in range(6)]
    live = []
    for i in range(1000):
        prompt = rng.choice(prefixes)[:rng.randrange(1, 121)] + tokens(rng.randrange(0, 20), seed=1000 + i)
        prompt = prompt[:200] or [5]
        params = replace(GREEDY, max_tokens=rng.randrange(1, 6))
        live.append(engine.add_request(prompt, params, keep_blocks=rng.random() < 0.1))
        for _ in range(rng.randrange(0, 3)):
            engine.step()
        if rng.random() < 0.2 and live:
            engine.abort(rng.choice(live).request_id)
        for seq in [s for s in live if s.finish_reason is not None and s.keep_blocks]:
            engine.release(seq)  # the owner of kept blocks gives them back
            seq.keep_blocks = False
        if i % 50 == 0:
            check_pool(engine.blocks)
    while engine.has_work():
        engine.step()
    for seq in [s for s in live if s.keep_blocks]:
        engine.release(seq)
    assert engine.blocks.num_used == 0 and engine.blocks.evictions > 0
    assert not engine.take_failures()
    check_pool(engine.blocks)


def test_eviction_under_pressure_keeps_outputs_exact(tokenizer):
    engine = make_tiny_engine(tokenizer, kv_blocks=24, max_batch=4, max_prefill_tokens=128)
    rng = random.Random(8)
    prefixes = [tokens(96, seed=200 + i) for i in range(4)]
    prompts = [rng.choice(prefixes) + tokens(rng.randrange(1, 30), seed=300 + i) for i in range(24)]
    params = replace(GREEDY, max_tokens=6)
    outputs = []
    for start in range(0, len(prompts), 4):  # waves of 4: cached blocks are evicted between and within
        outputs += engine.generate_batch(prompts[start:start + 4], params)
    assert engine.blocks.evictions > 0
    assert outputs == [no_cache(engine, p, params) for p in prompts]
    check_pool(engine.blocks)


def test_bypassing_requests_neither_read_nor_fill_the_local_cache(tokenizer):
    engine = make_tiny_engine(tokenizer)
    prompt = tokens(64, seed=9)
    seq = engine.add_request(prompt, GREEDY, use_cache=False)
    while engine.has_work():
        engine.step()
    assert engine.blocks.num_cached == 0 and seq.sources.computed == 64


# ---- two tiers through a real cluster --------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    with in_process_cluster(EngineConfig(kv_capacity_bytes=160 << 20, max_prefill_tokens=512), 512,
                            dict(store_timeout_seconds=5.0),
                            dict(store_timeout_seconds=5.0, prefill_timeout_seconds=60.0, max_batch=8,
                                 disaggregation="always")) as running:
        yield running


def generate(cluster, prompt: list[int], max_tokens: int = 4, **kw) -> tuple[list[int], decode_pb2.Usage]:
    ids, usage = [], None
    for response in cluster["stub"].Generate(decode_pb2.GenerateRequest(
            token_ids=decode_pb2.TokenIds(ids=prompt), sampling=common_pb2.SamplingParams(
                temperature=0.0, max_tokens=max_tokens, ignore_eos=True), **kw), timeout=300):
        ids.extend(response.token_ids)
        if response.HasField("usage"):
            usage = response.usage
    return ids, usage


def reference(engine, prompt: list[int], max_tokens: int = 4) -> list[int]:
    """The in-process engine's greedy tokens with no cache at all (the cluster runs the same kernels)."""
    return [e.token_id for e in engine.generate(prompt, replace(GREEDY, max_tokens=max_tokens), use_cache=False)]


def sources_add_up(usage: decode_pb2.Usage) -> bool:
    return (usage.local_cache_tokens + usage.store_tokens == usage.cached_tokens
            and usage.prefill_tokens + usage.local_computed_tokens == usage.computed_tokens
            and usage.cached_tokens + usage.computed_tokens == usage.prompt_tokens)


def computed_tokens(cluster) -> float:
    prefill = cluster["prefill_registry"].get_sample_value("kvcluster_prefill_tokens_total", {"source": "computed"})
    local = cluster["decode_registry"].get_sample_value("kvcluster_prompt_tokens_total", {"source": "local_computed"})
    return (prefill or 0.0) + (local or 0.0)


def test_warm_request_is_served_from_the_decode_workers_own_pool(cluster, smollm_engine):
    prompt = tokens(1024, seed=20)
    cold_ids, cold = generate(cluster, prompt)
    warm_ids, warm = generate(cluster, prompt)
    assert cold_ids == warm_ids == reference(smollm_engine, prompt)
    assert cold.prefill_tokens == 1024 and sources_add_up(cold)
    assert warm.local_cache_tokens == 1023 and warm.local_computed_tokens == 1 and sources_add_up(warm)
    assert warm.bytes_pulled == 0 and warm.timing.prefill_ms == 0


def test_eight_concurrent_cold_requests_compute_their_shared_prefix_once(cluster, smollm_engine):
    """The issue's count: 8 cold requests sharing a 512-token prefix compute at most 1.25 x (512 +
    their suffixes) prompt tokens, in the prefill and decode workers together."""
    prefix = tokens(512, seed=30)
    suffixes = [tokens(24 + 4 * i, seed=40 + i) for i in range(8)]
    before = computed_tokens(cluster)
    results: dict[int, tuple[list[int], decode_pb2.Usage]] = {}

    def one(i: int) -> None:
        results[i] = generate(cluster, prefix + suffixes[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(8))
    spent = computed_tokens(cluster) - before
    budget = 1.25 * (512 + sum(map(len, suffixes)))
    assert spent <= budget, f"{spent:.0f} prompt tokens computed for 8 requests, budget {budget:.0f}"
    assert all(sources_add_up(usage) for _, usage in results.values())
    for i, (ids, _) in results.items():
        assert ids == reference(smollm_engine, prefix + suffixes[i])


def test_a_short_new_turn_is_computed_locally_without_a_prefill_call(cluster, smollm_engine):
    # 19 full blocks of history, then 12 new tokens: under one block, which the measured local-prefill
    # threshold never goes below (it is at least a block), so the decision does not hang on timings.
    history = tokens(304, seed=50)
    generate(cluster, history)
    prompt = history + tokens(12, seed=51)
    ids, usage = generate(cluster, prompt)
    assert ids == reference(smollm_engine, prompt)
    assert usage.local_cache_tokens == 304 and usage.prefill_tokens == 0 and usage.timing.prefill_ms == 0
    assert sources_add_up(usage)
