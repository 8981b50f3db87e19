"""The deterministic mode's cost: batch-invariant numerics vs the fastest kernels, side by side.

For float32 and bfloat16: prefill tok/s at 512, 1,024 and 2,048 tokens and decode tok/s at batch
1, 8 and 16, each measured alternately on two engines over the same weights (deterministic on,
off), as ratios on ÷ off (1.0 = free). Also whether each mode's logits of one prompt are bitwise
the same alone and inside a batch of four (on: by construction; off: as it happens).

Batch-invariant numerics are the default (the fast kernels are an opt-out that breaks the
exactness guarantee); the target is that they cost at most 5% (worst ratio >= 0.95) in every
figure of both dtypes.
Run alone: `python -m bench.determinism [--quick]`; `python -m bench.suite` runs it as `determinism`.
"""

import argparse
import statistics

import torch

from bench.common import at_least, progress, write_result
from bench.context import BenchContext
from bench.engine import decode_tok_s, prefill_tok_s, random_prompt
from bench.plots import bar_plot
from kvcluster.engine.engine import Engine, EngineConfig, load_engine
from kvcluster.model.llama import PrefillSeq

NAME = "determinism"
COST_TARGET = 0.95  # worst on ÷ off throughput: exactness by default may cost at most 5%
# (alternations, decode steps, prefill lengths, decode batches, dtypes)
BOTH = ("float32", "bfloat16")
SUITE_SIZES = {"full": (3, 16, (512, 1024, 2048), (1, 8, 16), BOTH), "quick": (1, 4, (512, 1024, 2048), (1, 8, 16), BOTH),
               "tiny": (1, 2, (128,), (1, 4), ("float32",))}


def batch_invariant(engine: Engine) -> bool:
    """Whether a prompt's logits are bitwise the same alone and with three others in its forward."""
    prompts = [random_prompt(200 + 37 * i, seed=100 + i) for i in range(4)]
    bs = engine.config.block_size
    tables = [engine.blocks.allocate(-(-len(p) // bs)) for p in prompts]
    try:
        alone = engine.model.prefill(engine.pool.kv, [PrefillSeq(prompts[0], 0, tables[0])])[0]
        mixed = engine.model.prefill(engine.pool.kv, [PrefillSeq(p, 0, t) for p, t in zip(prompts, tables)])[0]
    finally:
        for table in tables:
            engine.blocks.free(table)
    return bool(torch.equal(alone, mixed))


def measure(dtype: str, alternations: int, steps: int, lengths=(512, 1024, 2048), batches=(1, 8, 16),
            model: str | None = None) -> dict:
    engines = {mode: load_engine(model, "cpu", EngineConfig(kv_capacity_bytes=384 << 20, deterministic=mode == "on"),
                                 dtype) for mode in ("on", "off")}
    figures: dict[str, dict[str, list[float]]] = {mode: {} for mode in engines}
    for _ in range(alternations):  # on, off, on, off: both see the same machine load
        for mode, engine in engines.items():
            for n in lengths:
                figures[mode].setdefault(f"prefill_{n}", []).append(prefill_tok_s(engine, n, 1))
            for b in batches:
                figures[mode].setdefault(f"decode_b{b}", []).append(decode_tok_s(engine, b, steps, 1))
    tok_s = {mode: {k: round(statistics.median(v), 1) for k, v in f.items()} for mode, f in figures.items()}
    return {
        "dtype": dtype, "alternations": alternations, "steps": steps,
        "numerics": {mode: e.model.numerics for mode, e in engines.items()},
        "tok_s": tok_s,
        "on_over_off": {k: round(tok_s["on"][k] / tok_s["off"][k], 3) for k in tok_s["on"]},
        "bitwise_alone_vs_batch": {mode: batch_invariant(e) for mode, e in engines.items()},
    }


def summarize(per_dtype: dict[str, dict]) -> dict:
    ratios = {}
    for dtype, result in per_dtype.items():
        worst = min(result["on_over_off"].values())
        ratios[f"{dtype}_worst_on_over_off"] = at_least(worst, COST_TARGET)
    return ratios


def run(ctx: BenchContext) -> dict:
    alternations, steps, lengths, batches, dtypes = ctx.pick(SUITE_SIZES)
    per_dtype = {}
    for dtype in dtypes:
        progress(NAME, f"{dtype}: prefill {lengths} and decode batch {batches}, deterministic on vs off")
        per_dtype[dtype] = measure(dtype, alternations, steps, lengths, batches, ctx.model)
        progress(NAME, f"{dtype}: on/off " + ", ".join(f"{k} {v}" for k, v in per_dtype[dtype]["on_over_off"].items()))
    result = {"per_dtype": per_dtype, "ratios": summarize(per_dtype)}
    ctx.write(NAME, result)
    labels = list(next(iter(per_dtype.values()))["on_over_off"])
    bar_plot(ctx.results_dir / f"{NAME}.png", "Deterministic mode: throughput on ÷ off (1.0 = free)", "ratio",
             labels, {dtype: [r["on_over_off"][k] for k in labels] for dtype, r in per_dtype.items()})
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    alternations, steps, lengths, batches, dtypes = SUITE_SIZES["quick" if args.quick else "full"]
    per_dtype = {dtype: measure(dtype, alternations, steps, lengths, batches, args.model) for dtype in dtypes}
    result = {"per_dtype": per_dtype, "ratios": summarize(per_dtype), "quick": args.quick}
    path = write_result(NAME, result)
    for dtype, r in per_dtype.items():
        print(dtype, "on/off:", r["on_over_off"], "bitwise alone==batch:", r["bitwise_alone_vs_batch"])
    print("->", path)
    return result


if __name__ == "__main__":
    main()
