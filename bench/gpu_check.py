"""The GPU check's cluster part (`make gpu-check` runs the CUDA tests first, then this): SmolLM2 on one
CUDA device, end to end, written to bench/results/gpu.json with the device's name.

1. The in-process engine on CUDA (the Triton kernels, batch-invariant numerics: required) generates
   the reference tokens of a few prompts, cache off.
2. A local cluster with every process on the GPU (KVC_DEVICE=cuda: the store's pool in GPU memory)
   serves each prompt cold, then again warm: both token-identical to the reference, the warm one
   with its full blocks cached. TTFT cold and warm are the client's medians.
3. Pull throughput from a cache store whose pool is on the GPU (bench.transfer's store pull of 64
   fp32 blocks, ~47 MB), and decode tokens/s of the in-process engine at batch 1, 8 and 16.
Exits 2 at once on a machine where torch sees no CUDA device; 1 when a check fails.

Run: `python -m bench.gpu_check [--dtype auto] [--tokens 16]` (scripts/gpu_check.sh bounds its time).
"""

import argparse
import random
import statistics
import sys
import time

import torch

from bench import transfer
from bench.common import RESULTS_DIR, progress, write_result
from bench.engine import decode_tok_s
from bench.workload import random_tokens
from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.client import Client
from kvcluster.engine.engine import EngineConfig, load_engine
from kvcluster.engine.sampling import SamplingParams
from kvcluster.worker.numerics import numerics_status

NAME = "gpu"
PROMPT_LENGTHS = (200, 600, 1000)
BATCHES = (1, 8, 16)


class CheckFailed(Exception):
    """A GPU check did not hold (exit status 1)."""


def streamed(client: Client, prompt: list[int], tokens: int) -> tuple[list[int], float, int]:
    """(token ids, TTFT seconds, cached prompt tokens) of one greedy request as the client sees it."""
    start, first, ids, cached = time.perf_counter(), None, [], 0
    for response in client.stream(token_ids=prompt, max_tokens=tokens, temperature=0.0, ignore_eos=True):
        if first is None and response.token_ids:
            first = time.perf_counter()
        ids += response.token_ids
        if response.finish_reason:
            cached = response.usage.cached_tokens
    return ids, (first or time.perf_counter()) - start, cached


def reference_tokens(engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return [[event.token_id for event in engine.generate(p, params, use_cache=False)] for p in prompts]


def cluster_rows(dtype: str, prompts: list[list[int]], reference: list[list[int]], tokens: int) -> dict:
    """Cold then warm through a GPU cluster; raises CheckFailed on any token difference."""
    rows = []
    (RESULTS_DIR / "tmp").mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / "tmp" / "gpu-cluster.log", "w") as log, \
            Cluster(ClusterPorts.any_free(), dtype=dtype, extra_env={"KVC_DEVICE": "cuda"}, log_stream=log) as cluster:
        with Client(cluster.decode_target) as client:
            for prompt, expected in zip(prompts, reference):
                cold, ttft_cold, _ = streamed(client, prompt, tokens)
                warm, ttft_warm, cached = streamed(client, prompt, tokens)
                if not cold == warm == expected:
                    raise CheckFailed(f"a {len(prompt)}-token prompt: cold {cold}, warm {warm}, engine {expected}")
                if cached < len(prompt) // 16 * 16:
                    raise CheckFailed(f"a {len(prompt)}-token prompt came back warm with only {cached} tokens cached")
                rows.append({"prompt_tokens": len(prompt), "ttft_cold_ms": round(1000 * ttft_cold, 2),
                             "ttft_warm_ms": round(1000 * ttft_warm, 2), "cached_tokens": cached})
                progress(NAME, f"{len(prompt)} tokens: cold == warm == engine; TTFT {rows[-1]['ttft_cold_ms']} ms "
                               f"cold, {rows[-1]['ttft_warm_ms']} ms warm")
    return {"requests": rows,
            "ttft_cold_ms_median": statistics.median(r["ttft_cold_ms"] for r in rows),
            "ttft_warm_ms_median": statistics.median(r["ttft_warm_ms"] for r in rows)}


def run(dtype: str, tokens: int) -> dict:
    engine = load_engine(device="cuda", dtype=dtype, config=EngineConfig(kv_capacity_bytes=2 << 30))
    numerics = numerics_status(engine)
    if not numerics.guaranteed:
        raise CheckFailed(f"the CUDA engine runs {numerics.mode} numerics: {numerics.reason}")
    progress(NAME, f"engine on {torch.cuda.get_device_name(0)}: {numerics.mode}, {numerics.dtype}, "
                   f"{engine.model.numerics_identity}")
    rng = random.Random(24)
    prompts = [random_tokens(rng, n) for n in PROMPT_LENGTHS]
    reference = reference_tokens(engine, prompts, tokens)
    decode = {str(b): round(decode_tok_s(engine, b, steps=16, repeats=3), 1) for b in BATCHES}
    progress(NAME, f"decode tok/s by batch: {decode}")
    del engine
    torch.cuda.empty_cache()
    cluster = cluster_rows(numerics.dtype, prompts, reference, tokens)
    pull = transfer.run(rounds=3, cycles=20, device="cuda")
    if not pull["store_device"].startswith("cuda"):
        raise CheckFailed(f"the transfer bench's store ran on {pull['store_device']}, not the GPU")
    progress(NAME, f"pull from the GPU store: {pull['pull']['store_pull_mb_s']:.0f} MB/s")
    return {"device": torch.cuda.get_device_name(0), "dtype": numerics.dtype,
            "numerics": {"mode": numerics.mode, "guaranteed": numerics.guaranteed},
            "exact": {"cold_equals_warm_equals_engine": True, "prompts": list(PROMPT_LENGTHS), "tokens": tokens},
            **cluster, "pull_mb_s_from_gpu_store": pull["pull"]["store_pull_mb_s"], "pull": pull["pull"],
            "decode_tok_s": decode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on compute capability 8.0+), float32, bfloat16, float16")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens per request")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device on this machine; nothing was checked", file=sys.stderr)
        return 2
    try:
        payload = run(args.dtype, args.tokens)
    except CheckFailed as exc:
        print(f"gpu-check FAILED: {exc}", file=sys.stderr)
        return 1
    path = write_result(NAME, payload)
    progress(NAME, f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
