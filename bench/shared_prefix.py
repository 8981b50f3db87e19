"""Shared-prefix workload under load: the cluster with its cache vs the same cluster without it.

N client threads send a fixed number of requests each, back to back (a closed loop, so the load
is bounded). 80% of the requests are a shared system prompt followed by a short random user turn;
the rest are random prompts of the same length. The same workload, built afresh for every phase
(a new system prompt, so each cache phase starts cold), runs once with the cache and once with
`bypass_cache=True` (nothing read, nothing written) per round; rounds alternate which goes first.
Recorded per mode: requests/s, generated and prompt tokens/s, TTFT p50/p99, token hit ratio
(cached prompt tokens / prompt tokens), where the prompt tokens came from (the decode worker's own
pool, the store, the prefill service, computed by decode), and the reusable hit ratio: cached
tokens / the prompt tokens some earlier request of the phase had computed (the shared system
prompt's full blocks in every shared request but the first). The plain ratio cannot reach 1: a
fifth of the requests share nothing and every user turn is new, so its ceiling here is about 0.7.
Targets (issue 15): throughput >= 3x and TTFT p50 >= 4x better with the cache, TTFT p99 with the
cache no worse than without, reusable hit ratio >= 0.85.
"""

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bench.common import at_least, percentile, progress
from bench.context import BenchContext
from bench.plots import bar_plot
from bench.workload import Timed, random_tokens, timed_generate
from kvcluster.client import Client

NAME = "shared_prefix"
SHARED_FRACTION = 0.8
THROUGHPUT_TARGET = 3.0
TTFT_TARGET = 4.0
P99_TARGET = 1.0       # bypass p99 / cache p99: the cache must not make the tail worse
HIT_RATIO_TARGET = 0.85
SOURCES = ("local_cache", "store", "prefill", "local_computed")
MODES = ("cache", "bypass")


@dataclass(frozen=True)
class Sizes:
    clients: int
    requests_per_client: int
    system_tokens: int
    user_tokens: tuple[int, int]  # a user turn's length is drawn from this range
    max_tokens: int
    rounds: int


SIZES = {"full": Sizes(8, 5, 512, (32, 64), 16, 2),
         "quick": Sizes(4, 3, 512, (32, 64), 8, 1),
         "tiny": Sizes(2, 2, 64, (16, 32), 2, 1)}


def reusable_tokens(workload: list[list[list[int]]], sizes: Sizes, block_size: int = 16) -> int:
    """Prompt tokens an ideal cache serves in one phase: the system prompt's full blocks in every
    request that starts with it, except the first one (someone computes it once)."""
    heads = Counter(tuple(p[:sizes.system_tokens]) for prompts in workload for p in prompts)
    _, shared = heads.most_common(1)[0]
    return (shared - 1) * (sizes.system_tokens // block_size * block_size)


def build_workload(rng: random.Random, sizes: Sizes) -> list[list[list[int]]]:
    """Each client's prompts, in the order it sends them."""
    total = sizes.clients * sizes.requests_per_client
    num_shared = round(SHARED_FRACTION * total)
    shared = [i < num_shared for i in range(total)]
    rng.shuffle(shared)
    system = random_tokens(rng, sizes.system_tokens)
    prompts = []
    for is_shared in shared:
        user = rng.randint(*sizes.user_tokens)
        prompts.append(system + random_tokens(rng, user) if is_shared else random_tokens(rng, sizes.system_tokens + user))
    return [prompts[c::sizes.clients] for c in range(sizes.clients)]


def run_phase(target: str, workload: list[list[list[int]]], max_tokens: int, bypass: bool) -> tuple[float, list[Timed]]:
    """All clients at once; (wall seconds, every request's timing)."""

    def one_client(prompts: list[list[int]]) -> list[Timed]:
        with Client(target) as client:
            return [timed_generate(client, p, max_tokens, bypass_cache=bypass) for p in prompts]

    with ThreadPoolExecutor(len(workload), thread_name_prefix="bench-client") as pool:
        start = time.perf_counter()
        per_client = list(pool.map(one_client, workload))
        wall = time.perf_counter() - start
    return wall, [t for timings in per_client for t in timings]


def summarize(wall_s: float, timings: list[Timed], reusable: int) -> dict:
    prompt = sum(t.usage.prompt_tokens for t in timings)
    ttfts = [t.ttft_s for t in timings]
    cached = sum(t.cached_tokens for t in timings)
    computed = prompt - cached + sum(t.usage.completion_tokens for t in timings)
    return {"reusable_hit_ratio": round(cached / reusable, 3) if reusable else 0.0, "computed_tokens": computed,
            "prompt_tokens_by_source": {src: sum(getattr(t.usage, f"{src}_tokens") for t in timings) for src in SOURCES},
            "requests": len(timings), "wall_s": round(wall_s, 3),
            "requests_per_s": round(len(timings) / wall_s, 3),
            "generated_tok_per_s": round(sum(t.usage.completion_tokens for t in timings) / wall_s, 2),
            "prompt_tok_per_s": round(prompt / wall_s, 1),
            "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1), "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
            "token_hit_ratio": round(sum(t.cached_tokens for t in timings) / prompt, 3),
            "requests_with_hit": sum(t.cached_tokens > 0 for t in timings)}


def run(ctx: BenchContext) -> dict:
    sizes = ctx.pick(SIZES)
    target = ctx.cluster().decode_target
    rng = random.Random()
    walls = {mode: 0.0 for mode in MODES}
    reusable = {mode: 0 for mode in MODES}
    timings: dict[str, list[Timed]] = {mode: [] for mode in MODES}
    for rnd in range(sizes.rounds):
        for mode in (MODES if rnd % 2 == 0 else MODES[::-1]):
            workload = build_workload(rng, sizes)
            wall, phase = run_phase(target, workload, sizes.max_tokens, bypass=mode == "bypass")
            walls[mode] += wall
            timings[mode] += phase
            reusable[mode] += reusable_tokens(workload, sizes)
            row = summarize(wall, phase, reusable_tokens(workload, sizes))
            progress(NAME, f"round {rnd + 1}/{sizes.rounds} {mode:<6}: {row['requests_per_s']:.2f} req/s, "
                     f"TTFT p50 {row['ttft_p50_ms']:.0f} ms p99 {row['ttft_p99_ms']:.0f} ms, "
                     f"hit ratio {row['token_hit_ratio']:.2f} (reusable {row['reusable_hit_ratio']:.2f})")
    result = {mode: summarize(walls[mode], timings[mode], reusable[mode]) for mode in MODES}
    cache, bypass = result["cache"], result["bypass"]
    payload = {
        "clients": sizes.clients, "requests_per_client": sizes.requests_per_client, "rounds": sizes.rounds,
        "shared_fraction": SHARED_FRACTION, "system_tokens": sizes.system_tokens,
        "user_tokens": list(sizes.user_tokens), "max_tokens": sizes.max_tokens, "result": result,
        "ratios": {
            "throughput_cache_over_bypass": at_least(cache["requests_per_s"] / bypass["requests_per_s"], THROUGHPUT_TARGET),
            "ttft_p50_bypass_over_cache": at_least(bypass["ttft_p50_ms"] / cache["ttft_p50_ms"], TTFT_TARGET),
            "ttft_p99_bypass_over_cache": at_least(bypass["ttft_p99_ms"] / cache["ttft_p99_ms"], P99_TARGET),
            "reusable_hit_ratio": at_least(cache["reusable_hit_ratio"], HIT_RATIO_TARGET, digits=3),
        },
        # The most the cache can buy if every computed token (uncached prompt tokens and output tokens)
        # cost the same; a decode step's tokens cost more (each step reads every weight), so below it.
        "computed_tokens_bypass_over_cache": round(bypass["computed_tokens"] / max(1, cache["computed_tokens"]), 2),
        # cached / all prompt tokens, and the most an ideal cache could reach on this workload
        "token_hit_ratio": cache["token_hit_ratio"],
        "token_hit_ratio_ceiling": round(reusable["cache"] / max(1, sum(t.usage.prompt_tokens for t in timings["cache"])), 3),
    }
    ctx.write(NAME, payload)
    bar_plot(ctx.results_dir / f"{NAME}.png",
             f"{sizes.clients} clients, {int(100 * SHARED_FRACTION)}% share a {sizes.system_tokens}-token system prompt",
             "value (units in the group name)", ["requests / s", "TTFT p50 (s)", "TTFT p99 (s)", "token hit ratio"],
             {f"{mode} ({'cache on' if mode == 'cache' else 'bypass_cache'})":
                 [result[mode]["requests_per_s"], result[mode]["ttft_p50_ms"] / 1000,
                  result[mode]["ttft_p99_ms"] / 1000, result[mode]["token_hit_ratio"]] for mode in MODES})
    return payload
