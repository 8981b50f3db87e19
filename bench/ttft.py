"""TTFT vs prompt length through the real cluster: cold, full-prefix hit, half-prefix hit.

Per length and repetition a fresh random prompt (never seen by the cache) is sent cold, then the
same prompt again (every full block cached), then a prompt sharing its first half (half cached),
so the three cases run side by side under the same machine noise. TTFT is measured by the client:
from sending Generate until the first token arrives. The warm request is served from the decode
worker's own pool (the first KV tier, issue 15): no lookup hit to pull, no Prefill call, one token
computed. Headline: cold / warm at 1024 tokens, target >= 25x.
"""

import random
import statistics
from dataclasses import dataclass

from bench.common import at_least, progress
from bench.context import BenchContext, gpu_note
from bench.plots import line_plot
from bench.workload import Timed, random_tokens, timed_generate
from kvcluster.client import Client

NAME = "ttft"
HEADLINE_TOKENS = 1024
COLD_OVER_WARM_TARGET = 25.0
COLD_OVER_HALF_TARGET = 1.5  # half the prompt cached should save a good part of its prefill
CASES = ("cold", "half", "warm")
SERVER_TIMINGS = ("first_token_ms", "lookup_ms", "prefill_ms", "kv_pull_ms")


@dataclass(frozen=True)
class Sizes:
    lengths: tuple[int, ...]
    repeats: int


SIZES = {"full": Sizes((128, 256, 512, 1024, 2048), 3),
         "quick": Sizes((128, 512, 1024), 1),
         "tiny": Sizes((128, 256), 1)}


def measure_length(client: Client, rng: random.Random, length: int) -> dict[str, Timed]:
    """One repetition at one length: cold, then the same prompt warm, then a half-cached one."""
    prompt = random_tokens(rng, length)
    cold = timed_generate(client, prompt, max_tokens=1)
    warm = timed_generate(client, prompt, max_tokens=1)
    half = timed_generate(client, prompt[:length // 2] + random_tokens(rng, length - length // 2), max_tokens=1)
    return {"cold": cold, "warm": warm, "half": half}


def summarize(runs: list[dict[str, Timed]]) -> dict:
    """Medians over repetitions of one length, per case."""
    def median_ms(case: str, field: str) -> float:
        return round(statistics.median(getattr(r[case].usage.timing, field) for r in runs), 2)

    return {case: {"ttft_ms": round(1000 * statistics.median(r[case].ttft_s for r in runs), 2),
                   # the decode service's own account: where the time to the first token went
                   **{f"server_{field}": median_ms(case, field) for field in SERVER_TIMINGS},
                   "cached_tokens": min(r[case].cached_tokens for r in runs),
                   "bytes_pulled": max(r[case].usage.bytes_pulled for r in runs)}
            for case in CASES}


def run(ctx: BenchContext) -> dict:
    sizes = ctx.pick(SIZES)
    rng = random.Random()  # unseeded: a prompt of this run was never cached by an earlier one
    target = ctx.cluster().decode_target
    runs: dict[int, list[dict[str, Timed]]] = {n: [] for n in sizes.lengths}
    with Client(target) as client:
        progress(NAME, "warm-up request (first calls pay one-time costs)")
        measure_length(client, rng, min(max(sizes.lengths), 512))
        for rep in range(sizes.repeats):
            for length in sizes.lengths:
                result = measure_length(client, rng, length)
                runs[length].append(result)
                progress(NAME, f"rep {rep + 1}/{sizes.repeats} {length:>5} tokens: " + "  ".join(
                    f"{case} {1000 * result[case].ttft_s:7.1f} ms" for case in CASES))
    by_length = {n: summarize(r) for n, r in runs.items()}
    headline = HEADLINE_TOKENS if HEADLINE_TOKENS in by_length else max(by_length)
    at = by_length[headline]
    cold_over_warm = at["cold"]["ttft_ms"] / at["warm"]["ttft_ms"]
    cold_over_half = at["cold"]["ttft_ms"] / at["half"]["ttft_ms"]
    payload = {
        "lengths": list(sizes.lengths), "repeats": sizes.repeats, "max_tokens": 1,
        "ttft": {str(n): v for n, v in by_length.items()},
        "ratios": {
            "ttft_cold_over_warm": {**at_least(cold_over_warm, COLD_OVER_WARM_TARGET), "at_tokens": headline},
            "ttft_cold_over_half": {**at_least(cold_over_half, COLD_OVER_HALF_TARGET), "at_tokens": headline},
        },
        "gpu": gpu_note(),
    }
    ctx.write(NAME, payload)
    lengths = list(by_length)
    line_plot(ctx.results_dir / f"{NAME}.png", f"Time to first token through the cluster (median of {sizes.repeats})",
              "prompt tokens", "TTFT (ms, log scale)",
              {case: (lengths, [by_length[n][case]["ttft_ms"] for n in lengths]) for case in CASES},
              log_x=True, log_y=True)
    return payload
