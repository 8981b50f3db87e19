"""Engine speed: prefill tok/s at 512 and 1024 prompt tokens, decode tok/s at batch 1, 4, 8.

Targets on the 2-core CPU: prefill >= 400 tok/s at 1024 tokens; batch-8 decode >= 4x batch-1.
Run: `python -m bench.engine [--quick] [--model FILE] [--device cuda]`.
"""

import argparse
import random

from bench.common import median_seconds, write_result
from kvcluster.model.engine import Engine, EngineConfig, load_engine
from kvcluster.model.llama import PrefillSeq
from kvcluster.model.sampling import SamplingParams

PREFILL_TARGET_TOK_S = 400.0
BATCH8_TARGET_RATIO = 4.0


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40_000) for _ in range(length)]


def prefill_tok_s(engine: Engine, length: int, repeats: int) -> float:
    ids = random_prompt(length, seed=length)
    slots = engine.pool.allocate(-(-length // engine.config.block_size))
    try:
        seconds = median_seconds(lambda: engine.model.prefill(engine.pool.kv, [PrefillSeq(ids, 0, slots)]), repeats)
    finally:
        engine.pool.free(slots)
    return length / seconds


def decode_tok_s(engine: Engine, batch: int, steps: int, repeats: int) -> float:
    """Tokens per second of pure decode steps for `batch` running sequences (prefill excluded)."""
    params = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(random_prompt(128 + 8 * i, seed=i), params) for i in range(batch)]
    while engine.waiting:
        engine.step()

    def run_steps() -> None:
        for _ in range(steps):
            engine.step()

    seconds = median_seconds(run_steps, repeats)
    for seq in seqs:
        engine.abort(seq.request_id)
    return batch * steps / seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--name", default="engine", help="results file name (bench/results/NAME.json)")
    args = parser.parse_args(argv)
    repeats, steps = (1, 4) if args.quick else (3, 16)
    engine = load_engine(args.model, args.device, EngineConfig(kv_capacity_bytes=512 << 20))
    prefill = {n: prefill_tok_s(engine, n, repeats) for n in (512, 1024)}
    decode = {b: decode_tok_s(engine, b, steps, repeats) for b in (1, 4, 8)}
    ratio = decode[8] / decode[1]
    result = {
        "model": str(engine.model.config), "dtype": engine.layout.dtype, "quick": args.quick,
        "prefill_tok_s": {str(n): round(v, 1) for n, v in prefill.items()},
        "decode_tok_s": {str(b): round(v, 1) for b, v in decode.items()},
        "ratios": {
            "prefill_1024_tok_s": {"value": round(prefill[1024], 1), "target": f">= {PREFILL_TARGET_TOK_S:g}",
                                   "met": prefill[1024] >= PREFILL_TARGET_TOK_S},
            "decode_batch8_over_batch1": {"value": round(ratio, 2), "target": f">= {BATCH8_TARGET_RATIO:g}",
                                          "met": ratio >= BATCH8_TARGET_RATIO},
        },
    }
    path = write_result(args.name, result)
    for n, v in prefill.items():
        print(f"prefill {n:>5} tokens: {v:8.1f} tok/s")
    for b, v in decode.items():
        print(f"decode batch {b:>2}:     {v:8.1f} tok/s")
    print(f"batch-8 / batch-1 decode: {ratio:.2f}x (target >= {BATCH8_TARGET_RATIO:g}x)  -> {path}")
    return result


if __name__ == "__main__":
    main()
