"""Shared-prefix workload under load: the cluster with its cache vs the same cluster without it.

N client threads send a fixed number of requests each, back to back (a closed loop, so the load
is bounded). 80% of the requests are a shared system prompt followed by a short random user turn;
the rest are random prompts of the same length. The same workload, built afresh for every phase
(a new system prompt, so each cache phase starts cold), runs once with the cache and once with
`bypass_cache=True` (nothing read, nothing written) per round; rounds alternate which goes first.
Recorded per mode: requests/s, generated and prompt tokens/s, TTFT p50/p99, token hit ratio
(cached prompt tokens / prompt tokens). Targets (chosen for this bench, the issue sets none):
throughput and TTFT p50 both >= 2x better with the cache, token hit ratio >= 0.5.
"""

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bench.common import at_least, percentile, progress
from bench.context import BenchContext
from bench.plots import bar_plot
from bench.workload import Timed, random_tokens, timed_generate
from kvcluster.client import Client

NAME = "shared_prefix"
SHARED_FRACTION = 0.8
THROUGHPUT_TARGET = 2.0
TTFT_TARGET = 2.0
HIT_RATIO_TARGET = 0.5
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


def summarize(wall_s: float, timings: list[Timed]) -> dict:
    prompt = sum(t.usage.prompt_tokens for t in timings)
    ttfts = [t.ttft_s for t in timings]
    return {"requests": len(timings), "wall_s": round(wall_s, 3),
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
    timings: dict[str, list[Timed]] = {mode: [] for mode in MODES}
    for rnd in range(sizes.rounds):
        for mode in (MODES if rnd % 2 == 0 else MODES[::-1]):
            wall, phase = run_phase(target, build_workload(rng, sizes), sizes.max_tokens, bypass=mode == "bypass")
            walls[mode] += wall
            timings[mode] += phase
            row = summarize(wall, phase)
            progress(NAME, f"round {rnd + 1}/{sizes.rounds} {mode:<6}: {row['requests_per_s']:.2f} req/s, "
                     f"TTFT p50 {row['ttft_p50_ms']:.0f} ms p99 {row['ttft_p99_ms']:.0f} ms, "
                     f"hit ratio {row['token_hit_ratio']:.2f}")
    result = {mode: summarize(walls[mode], timings[mode]) for mode in MODES}
    cache, bypass = result["cache"], result["bypass"]
    payload = {
        "clients": sizes.clients, "requests_per_client": sizes.requests_per_client, "rounds": sizes.rounds,
        "shared_fraction": SHARED_FRACTION, "system_tokens": sizes.system_tokens,
        "user_tokens": list(sizes.user_tokens), "max_tokens": sizes.max_tokens, "result": result,
        "ratios": {
            "throughput_cache_over_bypass": at_least(cache["requests_per_s"] / bypass["requests_per_s"], THROUGHPUT_TARGET),
            "ttft_p50_bypass_over_cache": at_least(bypass["ttft_p50_ms"] / cache["ttft_p50_ms"], TTFT_TARGET),
            "token_hit_ratio": at_least(cache["token_hit_ratio"], HIT_RATIO_TARGET, digits=3),
        },
    }
    ctx.write(NAME, payload)
    bar_plot(ctx.results_dir / f"{NAME}.png",
             f"{sizes.clients} clients, {int(100 * SHARED_FRACTION)}% share a {sizes.system_tokens}-token system prompt",
             "value (units in the group name)", ["requests / s", "TTFT p50 (s)", "TTFT p99 (s)", "token hit ratio"],
             {f"{mode} ({'cache on' if mode == 'cache' else 'bypass_cache'})":
                 [result[mode]["requests_per_s"], result[mode]["ttft_p50_ms"] / 1000,
                  result[mode]["ttft_p99_ms"] / 1000, result[mode]["token_hit_ratio"]] for mode in MODES})
    return payload
