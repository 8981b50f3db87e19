"""Exactness by construction (batch-invariant numerics, the default configuration: no switch is set).

24 prompts of 16 to 1,500 tokens (longer than the prefill chunk, so chunked prefill runs), greedy,
in float32 and in bfloat16, along every path a token can take:
- in process, one at a time with the cache off: the reference tokens and the logits of every step;
- in process, in random batch mixes with another prefill chunk size and the local cache on, then
  again warm (every prompt's blocks cached): every sampled logit row bitwise equal to the reference;
- the no-cache recompute (the whole sequence from scratch for every token) for 6 prompts;
- through a real cluster (Redis, cache store, prefill, decode): cold, in random concurrent mixes,
  then warm, in another mix: every token equal to the reference.
float32's cluster sends every cold prompt through the prefill service (the hand-off path); bfloat16's
decides from measured costs (local compute for short prompts, hand-off for long ones).

Then seeded sampling cold == warm == no-cache through both clusters; through the float32 cluster a
stop string spanning the hand-off (prefill's first token + decode's second) and a multi-byte
character split across it.
"""

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.client import Client
from kvcluster.engine.engine import EngineConfig, load_engine
from kvcluster.engine.sampling import SamplingParams
from kvcluster.model.tokenizer import ChatMessage

NUM_PROMPTS = 24           # lengths geometric over 16..1,500: short, one-chunk and multi-chunk prompts
LENGTHS = [round(16 * (1500 / 16) ** (i / (NUM_PROMPTS - 1))) for i in range(NUM_PROMPTS)]  # 16 .. 1,500
OUTPUT_TOKENS = 8           # per prompt (the 32, cut to stay in the suite's time budget: fewer
                            # tokens, never fewer kinds of path)
NO_CACHE = 6                # prompts (every third, 16 to 309 tokens) also checked against the no-cache recompute ...
NO_CACHE_TOKENS = 4         # ... for this many tokens (it recomputes the whole sequence per token)
GREEDY = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
CHUNK = 256                 # the reference engine's prefill chunk; the mixes use MIX_CHUNK
MIX_CHUNK = 96


def make_prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(16)
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in LENGTHS]


class LogitsLog:
    """Every sampled logit row of an engine, by (request id, output index)."""

    def __init__(self, engine):
        self.rows: dict[tuple[str, int], torch.Tensor] = {}
        engine.logits_observer = self

    def __call__(self, seqs, logits) -> None:
        for seq, row in zip(seqs, logits):
            self.rows[(seq.request_id, len(seq.output_ids))] = row.clone()


def run_mixed(engine, prompts: list[list[int]], rng: random.Random, tag: str, use_cache: bool) -> dict[int, list[int]]:
    """All prompts through the engine in random order, joining the batch in random groups while
    others are mid-prefill or mid-decode."""
    order = rng.sample(range(len(prompts)), len(prompts))
    seqs = {}
    while order or any(s.finish_reason is None for s in seqs.values()):
        for i in order[:rng.randint(1, 6)]:
            seqs[i] = engine.add_request(prompts[i], GREEDY, f"{tag}{i}", use_cache=use_cache)
        order = order[len([i for i in order if i in seqs]):]
        for _ in range(rng.randint(1, 4)):
            engine.step()
    return {i: s.output_ids for i, s in seqs.items()}


def through_cluster(target: str, prompts: list[list[int]], rng: random.Random):
    order = rng.sample(range(len(prompts)), len(prompts))
    results = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        with Client(target) as client:
            c = client.generate(token_ids=prompts[i], max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
        with lock:
            results[i] = c

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, order))
    return results


# 24 prompts x 2 dtypes in process and through two multi-process clusters: minutes.
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def case(request):
    dtype = request.param
    engine = load_engine(device="cpu", dtype=dtype, config=EngineConfig(
        kv_capacity_bytes=(768 << 20) if dtype == "float32" else (384 << 20), max_prefill_tokens=CHUNK,
        max_batch=16))
    assert engine.model.numerics == "batch-invariant"
    prompts = make_prompts(engine.model_config.vocab_size)
    log = LogitsLog(engine)
    reference = {}
    for i, p in enumerate(prompts):  # one at a time, nothing cached
        seq = engine.add_request(p, GREEDY, f"ref{i}", use_cache=False)
        while seq.finish_reason is None:
            engine.step()
        reference[i] = seq.output_ids
    # float32: every cold prompt through the prefill service; bfloat16: the measured local/prefill split.
    env = {"KVC_LOCAL_PREFILL_MAX_TOKENS": "0"} if dtype == "float32" else {}
    with Cluster(ClusterPorts.any_free(), dtype=dtype, extra_env=env, log_stream=open("/dev/null", "w")) as cluster:
        yield dtype, engine, prompts, reference, log, cluster


def test_every_path_gives_the_reference_tokens_and_logits(case):
    dtype, engine, prompts, reference, log, cluster = case
    rng = random.Random(dtype)
    assert max(LENGTHS) > CHUNK and max(LENGTHS) > MIX_CHUNK
    # In process: random batch mixes with another chunking, the local cache on (first cold, then warm).
    engine.config = replace(engine.config, max_prefill_tokens=MIX_CHUNK)
    try:
        for tag in ("mix", "warm"):
            outputs = run_mixed(engine, prompts, rng, tag, use_cache=True)
            assert outputs == reference, tag
            for i in range(NUM_PROMPTS):
                for step in range(OUTPUT_TOKENS):
                    assert torch.equal(log.rows[(f"{tag}{i}", step)], log.rows[(f"ref{i}", step)]), (tag, i, step)
        assert engine.blocks.num_cached > 0
    finally:
        engine.config = replace(engine.config, max_prefill_tokens=CHUNK)
    # The no-cache recompute: the same kernels, so the same bits.
    short = SamplingParams(max_tokens=NO_CACHE_TOKENS, temperature=0.0, ignore_eos=True)
    for i in range(0, 3 * NO_CACHE, 3):  # 16 to 309 tokens (the recompute is quadratic in the length)
        steps = []
        engine.logits_observer = lambda seqs, logits: steps.append(logits[0].clone())
        tokens = [e.token_id for e in engine.generate_no_cache(prompts[i], short)]
        engine.logits_observer = log
        assert tokens == reference[i][:NO_CACHE_TOKENS]
        assert all(torch.equal(row, log.rows[(f"ref{i}", step)]) for step, row in enumerate(steps)), i
    # Through the cluster: cold, then warm, each in a random concurrent mix.
    cold = through_cluster(cluster.decode_target, prompts, rng)
    assert {i: list(c.token_ids) for i, c in cold.items()} == reference
    warm = through_cluster(cluster.decode_target, prompts, rng)
    assert {i: list(c.token_ids) for i, c in warm.items()} == reference
    full_block_tokens = sum(n // 16 * 16 for n in LENGTHS)
    assert sum(c.usage.cached_tokens for c in warm.values()) >= 0.9 * full_block_tokens
    if dtype == "float32":  # every cold prompt was handed over by the prefill service
        assert all(c.usage.prefill_tokens > 0 for c in cold.values())


# ---- sampling (both clusters), stop strings and multi-byte text across the hand-off (float32) -----

def chat(engine, text: str) -> list[int]:
    return engine.tokenizer.encode_chat([ChatMessage("user", text)])


on_fp32_cluster = pytest.mark.parametrize("case", ["float32"], indirect=True)  # every cold prompt handed over


def test_seeded_sampling_cold_warm_and_no_cache_agree(case):
    dtype, engine, _, _, _, cluster = case
    prompt = chat(engine, "Tell a short story about a lighthouse keeper and a lost cache block. " * 6)
    params = dict(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=77, ignore_eos=True)
    with Client(cluster.decode_target) as client:
        cold, warm = (client.generate(token_ids=prompt, **params) for _ in range(2))
        other_seed = client.generate(token_ids=prompt, **params | {"seed": 78})
    expected = [e.token_id for e in engine.generate_no_cache(prompt, SamplingParams(**params))]
    assert warm.usage.cached_tokens > 0 and (cold.usage.prefill_tokens > 0 or dtype != "float32")
    assert list(cold.token_ids) == list(warm.token_ids) == expected
    assert list(other_seed.token_ids) != expected  # the seed really drives the draw


@on_fp32_cluster
def test_stop_string_spanning_the_hand_off(case):
    _, engine, _, _, _, cluster = case
    prompt = chat(engine, "Say 'naïve café' in a sentence.")
    greedy = dict(max_tokens=12, temperature=0.0)
    free = [e.token_id for e in engine.generate_no_cache(prompt, SamplingParams(**greedy))]
    first, second = engine.tokenizer.decode(free[:1]), engine.tokenizer.decode(free[:2])
    assert len(first) >= 2 and len(second) > len(first) + 1
    stop = second[len(first) - 1:len(first) + 2]  # last char of prefill's token + the start of decode's
    with Client(cluster.decode_target) as client:
        runs = [client.generate(token_ids=prompt, stop=[stop], **greedy) for _ in range(2)]
    for run in runs:
        assert run.text == first[:len(first) - 1] and run.finish_reason == "stop"
    assert runs[0].usage.prefill_tokens > 0 and runs[1].usage.cached_tokens > 0


@on_fp32_cluster
def test_multibyte_character_split_across_the_hand_off(case):
    _, engine, _, _, _, cluster = case
    prompt = chat(engine, "Write three emoji: 🚀")
    greedy = dict(max_tokens=9, temperature=0.0, ignore_eos=True)
    expected = [e.token_id for e in engine.generate_no_cache(prompt, SamplingParams(**greedy))]
    assert "\ufffd" in engine.tokenizer.decode(expected[:1])  # prefill's token is part of a character
    want = engine.tokenizer.decode(expected)
    assert "🚀" in want and "\ufffd" not in want
    with Client(cluster.decode_target) as client:
        for _ in range(2):  # cold (handed over), then warm
            pieces = [r.text for r in client.stream(token_ids=prompt, **greedy)]
            assert "".join(pieces) == want
            assert all("\ufffd" not in piece for piece in pieces)
