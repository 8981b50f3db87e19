"""The scheduler's contract on a seeded tiny llama: every step within its token budget, decodes
never starved by a long prompt (counted in steps), prefill chunks mixed into decode steps without
changing a bit, preemption by recompute token-identical, and no slot leaked by 1,000 mixed
requests with cancels."""

import random

import pytest

from kvcluster.engine.sampling import SamplingParams
from kvcluster.engine.scheduler import PACK_TOKENS
from tests.conftest import make_tiny_engine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


def alone(tokenizer, prompts, params) -> list[list[int]]:
    """Each prompt run by itself on a fresh engine, nothing cached: the reference."""
    engine = make_tiny_engine(tokenizer, prefix_caching=False)
    return [engine.generate_batch([p], params, use_cache=False)[0] for p in prompts]


def test_every_step_stays_within_its_token_budget_and_batch(tokenizer):
    budget, max_batch = 40, 6
    engine = make_tiny_engine(tokenizer, max_prefill_tokens=budget, max_batch=max_batch)
    rng = random.Random(7)
    kinds = set()
    for i in range(40):
        engine.add_request(prompt(rng.randint(1, 150), i), SamplingParams(max_tokens=rng.randint(1, 10),
                                                                          temperature=0.0, ignore_eos=True))
        for _ in range(rng.randint(0, 3)):
            engine.step()
            plan = engine.last_plan
            assert plan.num_tokens <= budget and len(plan.items) <= max_batch
            kinds.add(plan.kind)
    while engine.has_work():
        running_before = len(engine.running)
        engine.step()
        plan = engine.last_plan
        assert plan.num_tokens <= budget and len(plan.items) <= max_batch
        assert plan.decode_tokens == min(running_before, max_batch)  # every stream that can run, runs
        kinds.add(plan.kind)
    assert {"mixed", "decode", "prefill"} <= kinds
    assert engine.blocks.num_used == 0


def test_a_long_prompt_arriving_during_decoding_never_stalls_running_streams(tokenizer):
    budget = 64
    engine = make_tiny_engine(tokenizer, max_prefill_tokens=budget)
    streams = [engine.add_request(prompt(20 + i, i), SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
               for i in range(3)]
    while any(len(s.output_ids) == 0 for s in streams):
        engine.step()
    long = engine.add_request(prompt(480, 99), GREEDY)
    chunks = 0
    while not long.output_ids:
        before = [len(s.output_ids) for s in streams]
        engine.step()
        chunks += 1
        # Each step of the long prompt's prefill also advanced every running stream by one token.
        assert [len(s.output_ids) for s in streams] == [n + 1 for n in before]
        assert engine.last_plan.kind == "mixed" and engine.last_plan.num_tokens <= budget
    assert chunks >= 480 // budget  # the prompt was chunked, its chunks shared steps with the decodes
    while engine.has_work():
        engine.step()
    reference = alone(tokenizer, [prompt(20 + i, i) for i in range(3)] + [prompt(480, 99)],
                      SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    assert [s.output_ids for s in streams] == reference[:3]
    assert long.output_ids == reference[3][:GREEDY.max_tokens]


def test_preempted_requests_finish_token_identical(tokenizer):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = [prompt(30 + 7 * i, 100 + i) for i in range(6)]
    tight = make_tiny_engine(tokenizer, kv_blocks=14, max_prefill_tokens=48)  # 6 x ~5 blocks do not fit
    seqs = [tight.add_request(p, params) for p in prompts]
    while tight.has_work():
        tight.step()
    assert tight.num_preemptions > 0 and any(s.preemptions for s in seqs)
    assert [s.output_ids for s in seqs] == alone(tokenizer, prompts, params)
    assert tight.blocks.num_used == 0
    tight.blocks.check()


def test_seeded_sampling_survives_preemption_and_mixing(tokenizer):
    params = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=1234)
    prompts = [prompt(25 + 9 * i, 200 + i) for i in range(5)]
    tight = make_tiny_engine(tokenizer, kv_blocks=12, max_prefill_tokens=32)
    seqs = [tight.add_request(p, params) for p in prompts]
    while tight.has_work():
        tight.step()
    assert tight.num_preemptions > 0
    assert [s.output_ids for s in seqs] == alone(tokenizer, prompts, params)


def test_no_slot_leaks_after_a_thousand_mixed_requests_with_cancels(tokenizer):
    engine = make_tiny_engine(tokenizer, kv_blocks=64, max_prefill_tokens=96, max_batch=8)
    rng = random.Random(11)
    shared = prompt(48, 5)  # a common prefix: cache hits, shared blocks, copy-on-write of the last one
    live, finished, cancelled = [], 0, 0
    for i in range(1000):
        ids = (shared[:rng.choice((16, 32, 48))] if rng.random() < 0.5 else []) + prompt(rng.randint(1, 60), 1000 + i)
        live.append(engine.add_request(ids, SamplingParams(max_tokens=rng.randint(1, 6), temperature=0.0,
                                                           ignore_eos=True), keep_blocks=rng.random() < 0.1))
        if rng.random() < 0.15:  # cancel a random live request, waiting or running
            victim = rng.choice(live)
            cancelled += engine.abort(victim.request_id)
        for _ in range(rng.randint(0, 2)):
            engine.step()
        for seq in [s for s in live if s.finish_reason is not None]:
            live.remove(seq)
            finished += 1
            if seq.keep_blocks:  # its owner releases it (a pusher, in the services)
                engine.release(seq)
    while engine.has_work():
        engine.step()
    for seq in live:
        if seq.keep_blocks:
            engine.release(seq)
    assert cancelled > 50 and finished + cancelled >= 1000 - len(live)
    assert engine.blocks.num_used == 0 and not engine.has_work()
    engine.blocks.check()
    assert engine.blocks.num_cached > 0  # the cache was exercised and keeps only what is evictable


@pytest.mark.parametrize("budget", [16, 37, 512])
def test_mixed_steps_give_the_tokens_of_each_request_alone(tokenizer, budget):
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [prompt(n, 300 + n) for n in (5, 70, 16, 130, 33)]
    engine = make_tiny_engine(tokenizer, max_prefill_tokens=budget)
    rng = random.Random(budget)
    seqs = []
    for p in prompts:  # arrivals interleaved with steps: every mix of chunks and decodes
        seqs.append(engine.add_request(p, params))
        for _ in range(rng.randint(0, 4)):
            engine.step()
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in seqs] == alone(tokenizer, prompts, params)


def test_prompts_that_fill_a_forward_start_one_at_a_time_and_short_ones_share_a_step(tokenizer):
    """Four 110-token prompts arriving together with room for all of them: each step takes one (its
    first token comes after its own work, not after all four), in arrival order; prompts under
    PACK_TOKENS share a step until they reach it. Tokens are each request's own either way."""
    engine = make_tiny_engine(tokenizer, max_prefill_tokens=512)
    prompts = [prompt(110, 500 + i) for i in range(4)]
    seqs = [engine.add_request(p, GREEDY) for p in prompts]
    first_token_step = {}
    step = 0
    while engine.has_work():
        engine.step()
        step += 1
        plan = engine.last_plan
        assert sum(1 for item in plan.items if not item.decode) <= 1
        for i, seq in enumerate(seqs):
            if seq.output_ids and i not in first_token_step:
                first_token_step[i] = step
    assert [first_token_step[i] for i in range(4)] == [1, 2, 3, 4]
    assert [s.output_ids for s in seqs] == alone(tokenizer, prompts, GREEDY)

    short = [engine.add_request(prompt(20, 600 + i), GREEDY) for i in range(4)]
    engine.step()
    assert [item.seq for item in engine.last_plan.items if not item.decode] == short[:PACK_TOKENS // 20 + 1]
