"""bfloat16 vs float32: the same engine, the same prompts, the two dtypes measured side by side.

Prefill tok/s at 1,024 tokens and decode tok/s at batch 1, 8 and 16 for each dtype, repetitions
alternating fp32 / bf16 so both see the same machine load; the ratios are bf16 ÷ fp32. A bare bf16
matmul of the model's shapes is 2.3-3.5x faster than fp32 on this CPU (AVX512-BF16); what the
engine gets of that is bounded by its per-step work that is not matmuls (attention plumbing,
Python), which the engine issue removes later. Target: bf16 faster than fp32 everywhere (> 1x).
"""

import contextlib
import statistics

from bench.common import at_least, progress
from bench.context import BenchContext, gpu_note
from bench.engine import prefill_tok_s, random_prompt, running_batch
from bench.plots import bar_plot
from kvcluster.engine.engine import Engine, EngineConfig, load_engine

NAME = "dtype_speed"
DTYPES = ("float32", "bfloat16")
PREFILL_TOKENS = 1024
# batches, steps, repeats, prefill tokens; tiny only checks that the measure runs and writes its files
SIZES = {"full": ((1, 8, 16), 16, 3, PREFILL_TOKENS), "quick": ((1, 8), 8, 1, PREFILL_TOKENS), "tiny": ((1, 8), 2, 1, 256)}
KV_BYTES = 256 << 20


def decode_rows(engines: dict[str, Engine], batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Decode tok/s of each dtype at `batch`, alternating dtypes between repetitions."""
    prompts = [random_prompt(128 + 8 * i, seed=i) for i in range(batch)]
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    with contextlib.ExitStack() as stack:
        timers = {name: stack.enter_context(running_batch(engine, prompts)) for name, engine in engines.items()}
        for timer in timers.values():
            timer(1)  # warm-up
        for _ in range(repeats):
            for name, timer in timers.items():
                seconds[name].append(timer(steps))
    return {name: round(batch * steps / statistics.median(values), 1) for name, values in seconds.items()}


def measure(engines: dict[str, Engine], batches: tuple[int, ...], steps: int, repeats: int,
            prefill_tokens: int = PREFILL_TOKENS) -> dict:
    prefill = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            prefill[name].append(prefill_tok_s(engine, prefill_tokens, 1))
    prefill_tok = {name: round(statistics.median(v), 1) for name, v in prefill.items()}
    decode = {str(b): decode_rows(engines, b, steps, repeats) for b in batches}
    ratios = {f"bf16_over_fp32_prefill_{prefill_tokens}": at_least(prefill_tok["bfloat16"] / prefill_tok["float32"], 1.0)}
    for b, row in decode.items():
        ratios[f"bf16_over_fp32_decode_batch{b}"] = at_least(row["bfloat16"] / row["float32"], 1.0)
    return {"prefill_tokens": prefill_tokens, "steps": steps, "repeats": repeats,
            "prefill_tok_s": prefill_tok, "decode_tok_s": decode, "ratios": ratios}


def run(ctx: BenchContext) -> dict:
    batches, steps, repeats, prefill_tokens = ctx.pick(SIZES)
    progress(NAME, f"prefill {prefill_tokens} tokens and decode batch {batches}, fp32 vs bf16, {repeats} repeats")
    engines = {name: load_engine(ctx.model, None, EngineConfig(kv_capacity_bytes=KV_BYTES), name) for name in DTYPES}
    try:
        result = measure(engines, batches, steps, repeats, prefill_tokens)
    finally:
        engines.clear()  # the fp32 and bf16 weights are not needed by later measures
    progress(NAME, "  ".join(f"{k} {v['value']}" for k, v in result["ratios"].items()))
    result["gpu"] = gpu_note()
    ctx.write(NAME, result)
    groups = [f"prefill {prefill_tokens}"] + [f"decode b{b}" for b in result["decode_tok_s"]]
    bars = {name: [result["prefill_tok_s"][name], *(row[name] for row in result["decode_tok_s"].values())]
            for name in DTYPES}
    bar_plot(ctx.results_dir / f"{NAME}.png", "Engine speed by dtype (same run, this CPU)", "tokens / s", groups, bars)
    return result
