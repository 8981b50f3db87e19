"""Decode speed and memory of each shipped model (SmolLM2-135M, Gemma 3 270M), in process: decode tok/s
at batch 1 and 8 (prefill excluded, greedy, batch-invariant numerics, the default) in float32 and
bfloat16, and the resident memory of a process serving it (Python and the torch runtime, the weights,
their packed copies and the rope tables; the KV pool excluded: size it with `--kv-capacity-bytes`). One engine at a time, each in a fresh process, so the figures of one never
carry (or reuse) the memory of another.

Run: `python -m bench.models [--quick]` (not part of `make bench`: it loads four engines). Ratio: each
model's batch-8 over batch-1 decode tok/s in float32 (continuous batching; target >= 4, as bench/engine.py).
docs/models.md and docs/performance.md quote bench/results/models.json.
"""

import argparse
import gc
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import psutil

from bench.common import at_least, progress
from bench.context import BenchContext, gpu_note
from bench.engine import decode_tok_s
from bench.plots import bar_plot
from kvcluster.engine.engine import EngineConfig, load_engine

NAME = "models"
MODELS = ("smollm2", "gemma3")
DTYPES = ("float32", "bfloat16")
BATCHES = (1, 8)
KV_BYTES = 256 << 20  # room for 8 sequences of SmolLM2 (0.7 MB per 16-token block)
SIZES = {"full": (16, 3), "quick": (8, 1), "tiny": (2, 1)}  # decode steps, repeats


def measure_one(model: str, dtype: str, steps: int, repeats: int) -> dict:
    engine = load_engine(model, "cpu", EngineConfig(kv_capacity_bytes=KV_BYTES), dtype)
    engine.pool.kv.fill_(0)  # every page of the pool resident, so subtracting its size is exact
    resident = psutil.Process().memory_info().rss - engine.pool.kv.numel() * engine.pool.kv.element_size()
    row = {"process_mb": round(resident / 2**20), "kv_bytes_per_token": engine.layout.block_nbytes // engine.block_size}
    for batch in BATCHES:
        row[f"decode_tok_s_batch{batch}"] = round(decode_tok_s(engine, batch, steps, repeats), 1)
    del engine
    gc.collect()
    return row


def run(ctx: BenchContext) -> dict:
    steps, repeats = ctx.pick(SIZES)
    rows = {}
    for model in MODELS:
        for dtype in DTYPES:
            progress(NAME, f"{model} {dtype}: decode batch {BATCHES}, {steps} steps, {repeats} repeats")
            # A fresh interpreter each: in one process a later engine reuses memory an earlier one
            # freed, and its figure reads low (SmolLM2 bf16 read 163 MB that way).
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as one:
                rows[f"{model} {dtype}"] = one.submit(measure_one, model, dtype, steps, repeats).result()
            progress(NAME, f"  {rows[f'{model} {dtype}']}")
    ratios = {f"{model}_batch8_over_batch1_fp32": at_least(rows[f"{model} float32"]["decode_tok_s_batch8"]
                                                          / rows[f"{model} float32"]["decode_tok_s_batch1"], 4.0)
              for model in MODELS}
    result = {"steps": steps, "repeats": repeats, "models": rows, "ratios": ratios, "gpu": gpu_note()}
    ctx.write(NAME, result)
    bar_plot(ctx.results_dir / f"{NAME}.png", "Decode tok/s of the shipped models (this CPU, in process)",
             "tokens / s", list(rows), {f"batch {b}": [row[f"decode_tok_s_batch{b}"] for row in rows.values()]
                                        for b in BATCHES})
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with BenchContext(mode="quick" if args.quick else "full") as ctx:
        run(ctx)
