"""The batch-invariant matmul (csrc/invariant_linear.cpp) against what `Linear` does today.

Per dtype and SmolLM2-135M shape: row count M, today's Linear (few_rows_linear up to 3 rows, then
oneDNN with the weight reordered once) in ms, invariant_linear in ms, and their ratio; the two are
timed alternately, each time a median of the repetitions and the ratio the median of the paired
per-repetition ratios (the machine is noisy). Then,
with --model-level, the whole model: decode steps at batch 1/8/16 and one 512-token prefill with
the model's fast and batch-invariant numerics (LlamaModel's `deterministic` off and on).

Run: `OMP_WAIT_POLICY=PASSIVE python -m bench.invariant_linear [--reps 7] [--dtype float32]
[--cold] [--model-level]`. --cold: up to 16 rows, every call on another copy of the weights, so
they come from memory as in the model's decode rather than from the L3 cache.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from kvcluster.model.kernels import few_rows_linear_op  # noqa: E402
from kvcluster.model.llama import Linear  # noqa: E402

# SmolLM2-135M: hidden 576, 9 heads + 2x3 KV heads of 64, intermediate 1536, vocab 49152.
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ROWS = (1, 2, 3, 8, 16, 64, 256, 512, 1024)
LM_HEAD_ROWS = (1, 2, 3, 8, 16, 64)  # lm_head only ever sees the last token of each sequence


def timed(fn, budget_s: float = 0.02) -> float:
    """Seconds per call of fn, averaged over enough calls to fill ~budget_s (budget 0: one call)."""
    n = 1
    if budget_s > 0:
        start = time.perf_counter()
        fn()
        n = max(1, int(budget_s / max(time.perf_counter() - start, 1e-7)))
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def compare(fns: list, reps: int, budget_s: float = 0.02) -> tuple[list[float], float]:
    """Median seconds per call of each fn, the fns timed in turn within each repetition (the order
    alternating), and the median of the per-repetition ratios fns[1] / fns[0]: paired, so a burst
    of load from other processes moves both sides of a ratio."""
    samples = [[] for _ in fns]
    for fn in fns:
        fn()
    for rep in range(reps):
        order = list(range(len(fns)))[:: 1 if rep % 2 == 0 else -1]
        for i in order:
            samples[i].append(timed(fns[i], budget_s))
    ratio = statistics.median(b / a for a, b in zip(samples[0], samples[1]))
    return [statistics.median(s) for s in samples], ratio


class Rotating:
    """Calls the Linears in turn: with enough copies of a weight, each call reads it from memory, as
    the model's decode does (30 layers of weights do not fit in L3), not from the cache."""

    def __init__(self, linears: list):
        self.linears, self.i = linears, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.i = (self.i + 1) % len(self.linears)
        return self.linears[self.i](x)


def kernel_table(dtype: torch.dtype, reps: int, shapes: list[str], cold: bool = False) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name in shapes:
        N, K = SHAPES[name]
        copies = max(1, int(160e6 / (N * K * dtype.itemsize))) if cold else 1
        weights = [(torch.randn(N, K, generator=gen) / K**0.5).to(dtype) for _ in range(copies)]
        old = Rotating([Linear.make(w, few_rows_linear_op()) for w in weights])
        new = Rotating([Linear.make(w, invariant=True) for w in weights])
        assert new.linears[0].invariant is not None, "invariant_linear op unavailable"
        print(f"\n{dtype} {name} N={N} K={K}" + (f" (weights from memory: {copies} copies)" if cold else ""))
        print(f"{'M':>5} {'Linear ms':>10} {'invariant ms':>13} {'ratio':>6}")
        for m in LM_HEAD_ROWS if name == "lm_head" else ROWS:
            if cold and m > 16:
                continue  # compute-bound: where the weights come from does not matter
            x = torch.randn(m, K, generator=gen).to(dtype)
            (t_old, t_new), ratio = compare([lambda: old(x), lambda: new(x)], reps, budget_s=0.01)
            rows.append({"dtype": str(dtype), "shape": name, "M": m, "old_ms": t_old * 1e3, "new_ms": t_new * 1e3,
                         "ratio": ratio})
            print(f"{m:>5} {t_old * 1e3:>10.4f} {t_new * 1e3:>13.4f} {ratio:>6.2f}", flush=True)
    return rows


def model_level(dtype_name: str, reps: int) -> dict:
    """Decode-step and 512-token prefill seconds of the SmolLM2 model, fast and batch-invariant numerics."""
    from bench.engine import random_prompt
    from kvcluster.kv.dtypes import DTYPES
    from kvcluster.engine.engine import Engine, EngineConfig
    from kvcluster.model.llama import LlamaModel, PrefillSeq
    from kvcluster.model.loader import load_model
    from kvcluster.engine.sampling import SamplingParams
    from kvcluster.model.tokenizer import Tokenizer

    loaded = load_model(None)
    engines = {}
    for det in (False, True):
        model = LlamaModel(loaded.config, loaded.weights, "cpu", DTYPES[dtype_name], deterministic=det)
        engines[det] = Engine(model, Tokenizer(loaded.tokenizer), b"bench", EngineConfig(kv_capacity_bytes=256 << 20))
    out = {}
    ids = random_prompt(512, seed=512)

    def prefill(engine):
        slots = engine.blocks.allocate(-(-len(ids) // engine.config.block_size))
        try:
            engine.model.prefill(engine.pool.kv, [PrefillSeq(ids, 0, slots)])
        finally:
            engine.blocks.free(slots)

    t, ratio = compare([lambda e=engines[d]: prefill(e) for d in (False, True)], reps, budget_s=0)
    out["prefill_512"] = {"off_ms": t[0] * 1e3, "on_ms": t[1] * 1e3, "ratio": ratio}
    print(f"\nmodel {dtype_name}: prefill 512 tokens: off {t[0] * 1e3:.1f} ms, on {t[1] * 1e3:.1f} ms, ratio {ratio:.2f}",
          flush=True)
    params = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)
    for batch in (1, 8, 16):
        prompts = [random_prompt(128 + 8 * i, seed=i) for i in range(batch)]
        running = {}
        for det, engine in engines.items():
            running[det] = [engine.add_request(p, params) for p in prompts]
            while engine.waiting:
                engine.step()
        steps = 8
        t, ratio = compare([lambda e=engines[d]: [e.step() for _ in range(steps)] for d in (False, True)], reps, budget_s=0)
        t = [s / steps for s in t]
        for det, engine in engines.items():
            for seq in running[det]:
                engine.abort(seq.request_id)
        out[f"decode_b{batch}"] = {"off_ms": t[0] * 1e3, "on_ms": t[1] * 1e3, "ratio": ratio}
        print(f"model {dtype_name}: decode step batch {batch:>2}: off {t[0] * 1e3:.2f} ms, on {t[1] * 1e3:.2f} ms, "
              f"ratio {ratio:.2f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-level", action="store_true", help="also time the whole model, fast and batch-invariant numerics")
    parser.add_argument("--no-kernels", action="store_true", help="skip the per-shape table")
    parser.add_argument("--cold", action="store_true",
                        help="rows <= 16 only, each call on another copy of the weights (read from memory, as in the model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    with torch.inference_mode():
        for name in dtypes:
            if not args.no_kernels:
                kernel_table(getattr(torch, name), args.reps, args.shapes.split(","), args.cold)
            if args.model_level:
                model_level(name, args.reps)


if __name__ == "__main__":
    main()
