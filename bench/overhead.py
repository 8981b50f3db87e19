"""Disaggregation overhead: cold end-to-end latency through the cluster vs the in-process engine.

The same requests (fresh random prompts, greedy, a fixed number of output tokens) go to
  - the cluster, cold: prefill service computes the prompt and pushes its blocks to the store,
    decode pulls them (the hand-off) and decodes;
  - the in-process engine (no gRPC, no processes, no hand-off): the baseline;
  - the cluster with `bypass_cache`: decode prefills locally, so what remains is the serving path
    itself (gRPC streaming, the engine thread) without the hand-off; it explains the gap.
They alternate request by request, never overlapping (2 cores). Ratio: the median over requests of
cluster time / in-process time on the same prompt (paired, so a burst of machine noise spoils one
pair, not the figure). Target <= 1.15x.
"""

import random
import statistics
import time
from dataclasses import dataclass

from bench.common import at_most, progress
from bench.context import BenchContext
from bench.plots import bar_plot
from bench.workload import random_tokens, timed_generate
from kvcluster.client import Client
from kvcluster.engine.engine import Engine
from kvcluster.engine.sampling import SamplingParams

NAME = "overhead"
CLUSTER_OVER_ENGINE_TARGET = 1.15
PATHS = ("in_process", "cluster", "cluster_bypass")


@dataclass(frozen=True)
class Sizes:
    lengths: tuple[int, ...]
    max_tokens: int
    repeats: int


SIZES = {"full": Sizes((256, 512, 1024), 32, 3),
         "quick": Sizes((256, 1024), 16, 1),
         "tiny": Sizes((128,), 4, 1)}


def in_process(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(TTFT, end-to-end) seconds of one request on the in-process engine."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first = None
    for _ in engine.generate(prompt, params):
        first = first or time.perf_counter()
    end = time.perf_counter()
    return first - start, end - start


def one_request(client: Client, engine: Engine, prompt: list[int], max_tokens: int, engine_first: bool) -> dict:
    """The three paths on one prompt; which of cluster / in-process goes first alternates."""
    timings = {}

    def cluster() -> None:
        timed = timed_generate(client, prompt, max_tokens)
        timings["cluster"] = (timed.ttft_s, timed.total_s)

    def local() -> None:
        timings["in_process"] = in_process(engine, prompt, max_tokens)

    for step in ((local, cluster) if engine_first else (cluster, local)):
        step()
    bypass = timed_generate(client, prompt, max_tokens, bypass_cache=True)
    timings["cluster_bypass"] = (bypass.ttft_s, bypass.total_s)
    return timings


def run(ctx: BenchContext) -> dict:
    sizes = ctx.pick(SIZES)
    engine = ctx.engine()
    rng = random.Random()
    samples: dict[int, list[dict]] = {n: [] for n in sizes.lengths}
    with Client(ctx.cluster().decode_target) as client:
        progress(NAME, "warm-up request on each path")
        one_request(client, engine, random_tokens(rng, min(sizes.lengths)), 2, engine_first=False)
        for rep in range(sizes.repeats):
            for i, length in enumerate(sizes.lengths):
                timings = one_request(client, engine, random_tokens(rng, length), sizes.max_tokens,
                                      engine_first=(rep + i) % 2 == 1)
                samples[length].append(timings)
                progress(NAME, f"rep {rep + 1}/{sizes.repeats} {length:>5} tokens: " + "  ".join(
                    f"{path} {1000 * timings[path][1]:7.1f} ms" for path in PATHS))
    pairs = [t["cluster"][1] / t["in_process"][1] for runs in samples.values() for t in runs]
    totals = {path: sum(t[path][1] for runs in samples.values() for t in runs) for path in PATHS}
    by_length = {str(n): {path: {"ttft_ms": round(1000 * statistics.median(t[path][0] for t in runs), 2),
                                 "e2e_ms": round(1000 * statistics.median(t[path][1] for t in runs), 2)}
                          for path in PATHS} for n, runs in samples.items()}
    payload = {
        "lengths": list(sizes.lengths), "max_tokens": sizes.max_tokens, "repeats": sizes.repeats,
        "median_by_length": by_length, "total_s": {path: round(v, 3) for path, v in totals.items()},
        "bypass_over_in_process": round(totals["cluster_bypass"] / totals["in_process"], 3),
        "cluster_over_in_process_per_request": [round(r, 3) for r in pairs],
        "ratios": {"cluster_over_in_process": at_most(statistics.median(pairs), CLUSTER_OVER_ENGINE_TARGET, digits=3)},
    }
    ctx.write(NAME, payload)
    bar_plot(ctx.results_dir / f"{NAME}.png",
             f"Cold end-to-end latency, {sizes.max_tokens} output tokens (median of {sizes.repeats})", "ms",
             [f"{n} tokens" for n in by_length],
             {path.replace("_", " "): [row[path]["e2e_ms"] for row in by_length.values()] for path in PATHS})
    return payload
