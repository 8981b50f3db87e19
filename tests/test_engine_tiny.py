"""Paged-KV mechanics on a seeded tiny llama: block boundaries, batching, export/import, preemption."""

import random

import pytest
import torch

from kvcluster.engine.sampling import SamplingParams
from kvcluster.kv.block_manager import BlockManager
from kvcluster.model.llama import DecodeSeq, PrefillSeq
from tests.conftest import make_tiny_engine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prompt(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


@pytest.mark.parametrize("length", [1, 15, 16, 17, 33, 100])
def test_cached_equals_uncached_across_block_boundaries(tiny_engine, length):
    ids = prompt(length, seed=length)
    cached = [e.token_id for e in tiny_engine.generate(ids, GREEDY)]
    uncached = [e.token_id for e in tiny_engine.generate_no_cache(ids, GREEDY)]
    assert len(cached) == GREEDY.max_tokens
    assert cached == uncached
    assert tiny_engine.blocks.num_used == 0


def test_batched_decode_of_different_lengths_equals_each_alone(tiny_engine):
    prompts = [prompt(n, seed=n) for n in (3, 16, 29, 70)]
    batched = tiny_engine.generate_batch(prompts, GREEDY)
    alone = [tiny_engine.generate_batch([p], GREEDY)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(b) for b in batched}) == 4


def test_batched_decode_logits_match_single(tiny_engine):
    eng = tiny_engine
    seqs = []
    for n in (5, 17, 40):
        slots = eng.blocks.allocate(4)
        eng.model.prefill(eng.pool.kv, [PrefillSeq(prompt(n, n), 0, slots)])
        seqs.append(DecodeSeq(token_id=7, position=n, block_table=slots))
    batch = eng.model.decode(eng.pool.kv, seqs)
    for i, s in enumerate(seqs):
        single = eng.model.decode(eng.pool.kv, [s])
        torch.testing.assert_close(batch[i], single[0], rtol=1e-5, atol=1e-5)


def test_chunked_prefill_matches_unchunked(tokenizer):
    ids = prompt(150, seed=7)
    whole = make_tiny_engine(tokenizer).generate_batch([ids], GREEDY)
    chunked = make_tiny_engine(tokenizer, max_prefill_tokens=32).generate_batch([ids], GREEDY)
    assert whole == chunked


def test_preemption_by_recompute_keeps_outputs(tokenizer):
    prompts = [prompt(60, seed=s) for s in range(4)]
    roomy = make_tiny_engine(tokenizer).generate_batch(prompts, GREEDY)
    # 4 prompts of 60 tokens take 16 blocks; growing past 64 tokens needs 20: someone is preempted.
    tight = make_tiny_engine(tokenizer, kv_blocks=18)
    assert tight.generate_batch(prompts, GREEDY) == roomy
    assert tight.num_preemptions > 0
    assert tight.blocks.num_used == 0


def test_export_import_into_fresh_pool_gives_bitwise_identical_logits(tokenizer):
    a, b = make_tiny_engine(tokenizer), make_tiny_engine(tokenizer)
    ids = prompt(37, seed=3)
    slots_a = a.blocks.allocate(3)
    a.model.prefill(a.pool.kv, [PrefillSeq(ids, 0, slots_a)])
    slots_b = list(reversed(b.blocks.allocate(5)[2:]))  # different slot numbers in the fresh pool
    for sa, sb in zip(slots_a, slots_b):
        payload = a.pool.export_block(sa)
        assert len(payload) == a.layout.block_nbytes
        b.pool.import_block(sb, payload)
    for step, token in enumerate([11, 12, 13]):
        la = a.model.decode(a.pool.kv, [DecodeSeq(token, 37 + step, slots_a)])
        lb = b.model.decode(b.pool.kv, [DecodeSeq(token, 37 + step, slots_b)])
        assert torch.equal(la, lb)


def test_pool_allocate_and_free(tiny_engine):
    blocks: BlockManager = tiny_engine.blocks
    total = blocks.num_blocks
    taken = blocks.allocate(total)
    assert taken is not None and blocks.num_free == 0
    assert blocks.allocate(1) is None
    blocks.free(taken)
    assert blocks.num_free == total
    assert tiny_engine.pool.kv.shape == (total, *tiny_engine.layout.block_shape)


def test_abort_frees_blocks(tiny_engine):
    seq = tiny_engine.add_request(prompt(40), GREEDY)
    tiny_engine.step()
    assert tiny_engine.blocks.num_used > 0
    assert tiny_engine.abort(seq.request_id)
    assert tiny_engine.blocks.num_used == 0 and not tiny_engine.has_work()
