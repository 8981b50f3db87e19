"""Engine speed: prefill tok/s at 512 and 1024 prompt tokens, decode tok/s at batch 1, 4, 8, and a
warm request's floor: one forward of the last token after 1,023 cached tokens, beside the full
1,024-token prefill (their ratio bounds the cold / warm TTFT ratio from above).

Targets on the 2-core CPU: prefill >= 400 tok/s at 1024 tokens; batch-8 decode >= 4x batch-1;
full prefill >= 40x the warm forward.
Run alone: `python -m bench.engine [--quick] [--model FILE] [--device cuda]`; `python -m bench.suite`
runs it as the measure `engine`.
"""

import argparse
import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterator

from bench.common import at_least, median_seconds, progress, write_result
from bench.context import BenchContext, gpu_note
from bench.plots import bar_plot
from kvcluster.engine.engine import Engine, EngineConfig, load_engine
from kvcluster.engine.sampling import SamplingParams
from kvcluster.model.llama import PrefillSeq

PREFILL_TARGET_TOK_S = 400.0
BATCH8_TARGET_RATIO = 4.0
FULL_OVER_WARM_TARGET = 40.0
NAME = "engine"
PREFILL_LENGTHS = (512, 1024)  # the last is also the warm forward's context (its last token after the rest)
# (repeats, decode steps, prefill lengths); tiny only checks that the measure runs and writes its files
SUITE_SIZES = {"full": (3, 16, PREFILL_LENGTHS), "quick": (1, 4, PREFILL_LENGTHS), "tiny": (1, 2, (128, 256))}


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40_000) for _ in range(length)]


def prefill_tok_s(engine: Engine, length: int, repeats: int) -> float:
    ids = random_prompt(length, seed=length)
    slots = engine.blocks.allocate(-(-length // engine.config.block_size))
    try:
        seconds = median_seconds(lambda: engine.model.prefill(engine.pool.kv, [PrefillSeq(ids, 0, slots)]), repeats)
    finally:
        engine.blocks.free(slots)
    return length / seconds


def warm_forward_seconds(engine: Engine, repeats: int, length: int = PREFILL_LENGTHS[-1]) -> tuple[float, float]:
    """(seconds of one forward of the last of `length` tokens over the others cached, seconds of the full
    `length`-token prefill), alternated so both see the same machine load; the warm figure is a median of 5."""
    cached = length - 1
    ids = random_prompt(length, seed=cached)
    slots = engine.blocks.allocate(-(-len(ids) // engine.config.block_size))
    full, warm = [], []
    try:
        for _ in range(repeats):
            full.append(median_seconds(lambda: engine.model.prefill(engine.pool.kv, [PrefillSeq(ids, 0, slots)]), 1))
            last = [PrefillSeq(ids[cached:], cached, slots)]
            warm.append(median_seconds(lambda: engine.model.prefill(engine.pool.kv, last), 5))
    finally:
        engine.blocks.free(slots)
    return statistics.median(warm), statistics.median(full)


@contextlib.contextmanager
def running_batch(engine: Engine, prompts: list[list[int]],
                  params: SamplingParams = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)
                  ) -> Iterator[Callable[[int], float]]:
    """Admit `prompts` (by default greedy, EOS ignored) and prefill them all; yield a function that runs
    `steps` pure decode steps of the whole batch and returns their seconds. The sequences are aborted on exit."""
    seqs = [engine.add_request(p, params) for p in prompts]
    try:
        while engine.waiting:
            engine.step()

        def time_steps(steps: int) -> float:
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            return time.perf_counter() - start

        yield time_steps
    finally:
        for seq in seqs:
            engine.abort(seq.request_id)


def decode_tok_s(engine: Engine, batch: int, steps: int, repeats: int) -> float:
    """Tokens per second of pure decode steps for `batch` running sequences (prefill excluded)."""
    prompts = [random_prompt(128 + 8 * i, seed=i) for i in range(batch)]
    with running_batch(engine, prompts) as time_steps:
        seconds = median_seconds(lambda: time_steps(steps), repeats)
    return batch * steps / seconds


def measure(engine: Engine, repeats: int, steps: int, lengths: tuple[int, ...] = PREFILL_LENGTHS) -> dict:
    """Prefill tok/s at `lengths` (512 and 1024 tokens), decode tok/s at batch 1, 4, 8, and the targets' ratios."""
    prefill = {n: prefill_tok_s(engine, n, repeats) for n in lengths}
    decode = {b: decode_tok_s(engine, b, steps, repeats) for b in (1, 4, 8)}
    ratio = decode[8] / decode[1]
    longest = lengths[-1]
    warm, full = warm_forward_seconds(engine, repeats, longest)
    return {
        "model": str(engine.model.config), "dtype": engine.layout.dtype, "repeats": repeats, "steps": steps,
        "prefill_tok_s": {str(n): round(v, 1) for n, v in prefill.items()},
        "decode_tok_s": {str(b): round(v, 1) for b, v in decode.items()},
        "warm_forward_ms": {f"last_token_after_{longest - 1}_cached": round(warm * 1e3, 2),
                            f"full_{longest}_prefill": round(full * 1e3, 1)},
        "ratios": {
            "full_prefill_over_warm_forward": at_least(full / warm, FULL_OVER_WARM_TARGET, digits=1),
            f"prefill_{longest}_tok_s": at_least(prefill[longest], PREFILL_TARGET_TOK_S, digits=1),
            "decode_batch8_over_batch1": at_least(ratio, BATCH8_TARGET_RATIO),
        },
    }


def run(ctx: BenchContext) -> dict:
    """The suite measure: bench/results/engine.json and engine.png."""
    repeats, steps, lengths = ctx.pick(SUITE_SIZES)
    progress(NAME, f"prefill {'/'.join(map(str, lengths))} tokens and decode batch 1/4/8, {repeats} repeats of {steps} steps")
    result = measure(ctx.engine(), repeats, steps, lengths)
    progress(NAME, "prefill " + ", ".join(f"{n}: {v} tok/s" for n, v in result["prefill_tok_s"].items())
             + "; decode " + ", ".join(f"batch {b}: {v} tok/s" for b, v in result["decode_tok_s"].items()))
    result["gpu"] = gpu_note()
    ctx.write(NAME, result)
    bar_plot(ctx.results_dir / f"{NAME}.png", "In-process engine speed", "tokens / s",
             [*(f"prefill {n}" for n in lengths), "decode b1", "decode b4", "decode b8"],
             {"tok/s": [*result["prefill_tok_s"].values(), *result["decode_tok_s"].values()]})
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--name", default="engine", help="results file name (bench/results/NAME.json)")
    args = parser.parse_args(argv)
    repeats, steps = (1, 4) if args.quick else (3, 16)
    engine = load_engine(args.model, args.device, EngineConfig(kv_capacity_bytes=512 << 20))
    result = {**measure(engine, repeats, steps), "quick": args.quick}
    path = write_result(args.name, result)
    for n, v in result["prefill_tok_s"].items():
        print(f"prefill {n:>5} tokens: {v:8.1f} tok/s")
    for b, v in result["decode_tok_s"].items():
        print(f"decode batch {b:>2}:     {v:8.1f} tok/s")
    ratio = result["ratios"]["decode_batch8_over_batch1"]["value"]
    warm = result["warm_forward_ms"]
    print(f"warm forward {list(warm.values())[0]} ms, full prefill {list(warm.values())[1]} ms")
    print(f"batch-8 / batch-1 decode: {ratio:.2f}x (target >= {BATCH8_TARGET_RATIO:g}x)  -> {path}")
    return result


if __name__ == "__main__":
    main()
