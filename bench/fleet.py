"""Fleet scale by simulation (bench/fleet_sim.py): Mooncake's production traces through our router and tiers.

Sweeps, with the H100 cost model (the CPU one runs the 64-replica rows only, to bound the run):
- policies x fleet sizes (4, 16, 64, 256 decode replicas; one store shard of 8,192 trace blocks per
  8 replicas, as one per 8-GPU host), conversation trace at its own pace;
- at 64 replicas: 2x and 4x speed-up and the synthetic trace (cache_aware, round_robin: least_loaded
  decides as round robin does while replicas are mostly idle), other overlap weights and capacities;
- the TTFT floor (`ttft_floor`: every hit the infinite cache has, local, nothing queued): what no
  router beats, so round robin's p50 over it bounds the TTFT gain any routing can show;
- capacity planning at 64 replicas, cache_aware, no store tier: prefix hit ratio / ceiling against
  blocks per replica (the smallest size reaching 0.9 of the ceiling is recorded).
The full run takes about 5 minutes on the 2-core machine (about 35 simulations of the whole trace).
Replica capacity: `DEFAULT_POOL_BLOCKS`, this machine's default decode pool (512 MiB of SmolLM2
fp32 KV = 11,650 tokens = 22 trace blocks of 512 tokens). The slot-count reading of that default
(728 slots of 16 tokens, counted as 728 trace blocks) is run beside it at 64 replicas.
Router scale: bench/router_scale.py (256 replicas x 10k blocks each). Writes fleet.json and
fleet.png (hit ratio / ceiling and TTFT p50 by fleet size and policy).
"""

import dataclasses
import json
from pathlib import Path

from bench import router_scale
from bench.common import RESULTS_DIR, at_least, at_most, progress
from bench.context import BenchContext
from bench.fleet_sim import (POLICIES, TRACE_BLOCK_TOKENS, TRACES_DIR, CostModel, FleetConfig, load_trace, simulate,
                             ttft_floor)
from bench.plots import line_plot
from kvcluster.cli.redis_server import RedisServer

NAME = "fleet"
SMOLLM2_FP32_TOKEN_BYTES = 46_080
DEFAULT_POOL_BYTES = 512 << 20           # kvcluster.worker.config's kv_capacity_bytes default
DEFAULT_POOL_BLOCKS = DEFAULT_POOL_BYTES // (TRACE_BLOCK_TOKENS * SMOLLM2_FP32_TOKEN_BYTES)  # 22
DEFAULT_POOL_SLOTS = DEFAULT_POOL_BYTES // (16 * SMOLLM2_FP32_TOKEN_BYTES)                  # 728
STORE_BLOCKS_PER_SHARD = 8192
REPLICAS_PER_SHARD = 8
CEILING_SHARE_TARGET = 0.9
TTFT_GAIN_TARGET = 3.0
DECISION_P99_TARGET_US = 1000.0
HEADLINE_REPLICAS = 64

# (sizes, request limit, capacity sweep, router-scale blocks per replica, router-scale decisions timed)
SIZES = {"full": ((4, 16, 64, 256), None, (22, 728, 2048, 8192), 10_000, 2000),
         "quick": ((4, 64), 3000, (22, 728, 4096), 10_000, 2000),
         "tiny": ((4,), 150, (22, 728), 500, 200)}


def cpu_profile(results_dir: Path = RESULTS_DIR) -> CostModel:
    """SmolLM2-135M fp32 on this machine, from the committed full-run results (a tiny run's own are
    too small to calibrate with); the request path from bench/fleet_check.py's calibration, if run."""
    check = results_dir / "fleet_check.json"
    calibration = json.loads(check.read_text()).get("path_calibration", {}) if check.exists() else {}
    engine = json.loads((results_dir / "engine.json").read_text())
    decode = json.loads((results_dir / "decode_throughput.json").read_text())["tok_s"]
    pull_mb_s = json.loads((results_dir / "kv_transfer.json").read_text())["pull"]["store_pull_mb_s"]
    return CostModel(
        "cpu_smollm2_fp32", "this machine: engine.json prefill tok/s at 1024, decode_throughput.json ours_tok_s "
        "by batch, kv_transfer.json store pull MB/s (46,080 B of fp32 KV per token), fleet_check.json "
        "request path (cached tiny prompt's TTFT through the gateway less its one-token forward)",
        prefill_s_per_token=1 / engine["prefill_tok_s"][max(engine["prefill_tok_s"], key=int)],
        decode_step_s={int(b): int(b) / row["ours_tok_s"] for b, row in decode.items()},
        pull_s_per_block=TRACE_BLOCK_TOKENS * SMOLLM2_FP32_TOKEN_BYTES / (pull_mb_s * 1e6), max_batch=16,
        request_path_s=calibration.get("request_path_s", 0.0))


def h100_profile() -> CostModel:
    """Llama-3-8B bf16 on one H100 SXM, derived from public specs (not measured here)."""
    flops_per_token = 2 * 8.0e9
    kv_token_bytes = 32 * 2 * 8 * 128 * 2                 # layers x (K,V) x kv heads x head dim x bf16 = 128 KiB
    weights_s = 16.1e9 / (3.35e12 * 0.7)                  # read every weight once per step at 70% of HBM3
    kv_read_s = 12_000 * kv_token_bytes / (3.35e12 * 0.7)  # per sequence of the trace's mean 12k context
    return CostModel(
        "h100_llama3_8b_bf16", "derived: NVIDIA H100 SXM datasheet (989 TFLOPS dense BF16, 3.35 TB/s HBM3), "
        "Llama-3-8B config (8.0B params, 32 layers, 8 KV heads, head dim 128); prefill at 50% MFU, decode "
        "at 70% of HBM bandwidth reading weights + each sequence's 12k-token KV; pulls at 25 GB/s (one 200 "
        "Gb/s RDMA NIC, Mooncake's transfer engine)",
        prefill_s_per_token=flops_per_token / (989e12 * 0.5),
        decode_step_s={1: weights_s + kv_read_s, 32: weights_s + 32 * kv_read_s},
        pull_s_per_block=TRACE_BLOCK_TOKENS * kv_token_bytes / 25e9, max_batch=32)


def fleet_config(policy: str, replicas: int, cost: CostModel, replica_blocks: int = DEFAULT_POOL_BLOCKS,
                 store: bool = True, speedup: float = 1.0, overlap_weight: float | None = None) -> FleetConfig:
    shards = max(1, replicas // REPLICAS_PER_SHARD)
    config = FleetConfig(policy, replicas, replica_blocks, shards, STORE_BLOCKS_PER_SHARD if store else 1, cost,
                         speedup)
    return config if overlap_weight is None else dataclasses.replace(config, overlap_weight=overlap_weight)


def run_profile(cost: CostModel, traces: dict, sizes, capacities, sweep: bool) -> dict:
    """Every figure of one cost profile; `sweep` False: the headline fleet size only."""
    conversation = traces["conversation"]
    headline = HEADLINE_REPLICAS if HEADLINE_REPLICAS in sizes else sizes[-1]
    out = {"cost_model": cost.__dict__, "ttft_floor_s": ttft_floor(conversation, cost), "by_size": {}}
    for replicas in (sizes if sweep else (headline,)):
        out["by_size"][replicas] = {p: simulate(conversation, fleet_config(p, replicas, cost)) for p in POLICIES}
        row = out["by_size"][replicas]
        progress(NAME, f"{cost.name} {replicas:>3} replicas: hit/ceiling " + ", ".join(
            f"{p} {row[p]['hit_over_ceiling']:.2f} (TTFT p50 {row[p]['ttft_s']['p50']:.3f} s)" for p in POLICIES))
    # At 64: the slot-count reading of the default pool, and overlap weights either side of the
    # gateway's default 1 (a held prompt token worth one queued prefill token).
    variants = {"slot_count_capacity": dict(replica_blocks=DEFAULT_POOL_SLOTS),
                "overlap_weight_0.5": dict(overlap_weight=0.5),
                "overlap_weight_4": dict(overlap_weight=4.0)}
    for name, variant in variants.items():
        out[name] = {p: simulate(conversation, fleet_config(p, headline, cost, **variant))
                     for p in (POLICIES[:2] if "capacity" in name else POLICIES[:1])}
    if not sweep:
        return out
    out["speedup"] = {speedup: {p: simulate(conversation, fleet_config(p, headline, cost, speedup=speedup))
                                for p in POLICIES[:2]} for speedup in (2.0, 4.0)}
    out["synthetic"] = {p: simulate(traces["synthetic"], fleet_config(p, headline, cost)) for p in POLICIES[:2]}
    out["capacity_without_store"] = {blocks: simulate(conversation, fleet_config("cache_aware", headline, cost, blocks,
                                                                                store=False))
                                     for blocks in capacities}
    enough = [b for b in capacities if out["capacity_without_store"][b]["hit_over_ceiling"] >= CEILING_SHARE_TARGET]
    out["blocks_per_replica_for_0.9_of_ceiling_without_store"] = min(enough) if enough else None
    return out


def not_run(ctx: BenchContext, reason: str) -> dict:
    payload = {"skipped": reason, "ratios": {name: {"value": None, "target": target, "met": None} for name, target in (
        ("cache_aware_hit_over_ceiling", f">= {CEILING_SHARE_TARGET}"),
        ("round_robin_over_cache_aware_ttft_p50", f">= {TTFT_GAIN_TARGET}"),
        ("round_robin_over_ttft_floor_p50", "(the most any router could reach)"),
        ("cpu_profile_cache_aware_hit_over_ceiling", f">= {CEILING_SHARE_TARGET}"),
        ("cpu_profile_round_robin_over_cache_aware_ttft_p50", f">= {TTFT_GAIN_TARGET}"),
        ("routing_decision_cpu_p99_us_256x10k", f"<= {DECISION_P99_TARGET_US:g}"))}}
    ctx.write(NAME, payload)
    line_plot(ctx.results_dir / f"{NAME}.png", f"not run: {reason}", "", "", {})
    return payload


def run(ctx: BenchContext) -> dict:
    sizes, limit, capacities, router_blocks, router_rounds = ctx.pick(SIZES)
    if not (TRACES_DIR / "mooncake_conversation_trace.jsonl").exists():
        return not_run(ctx, f"no Mooncake traces in {TRACES_DIR}")
    traces = {name: load_trace(TRACES_DIR / f"mooncake_{name}_trace.jsonl", limit)
              for name in ("conversation", "synthetic")}
    profiles = {}
    for cost, sweep in ((h100_profile(), True), (cpu_profile(), False)):
        profiles[cost.name] = run_profile(cost, traces, sizes, capacities, sweep)
    redis_server = RedisServer().start()
    try:
        scale = router_scale.measure(blocks_per_replica=router_blocks, rounds=router_rounds, redis_url=redis_server.url)
    finally:
        redis_server.stop()
    progress(NAME, f"routing decision at 256 x {router_blocks}: PrefixIndex CPU p99 "
             f"{scale['prefix_index']['cpu_p99_us']:.0f} us (wall p99 {scale['prefix_index']['p99_us']:.0f} us), "
             f"Redis held_prefix wall p50 {scale['redis_held_prefix']['p50_us']:.0f} us")
    h100 = profiles["h100_llama3_8b_bf16"]
    headline = HEADLINE_REPLICAS if HEADLINE_REPLICAS in sizes else sizes[-1]
    row = h100["by_size"][headline]
    aware, rr = row["cache_aware"], row["round_robin"]
    # The same fleet with this machine's cost model (the calibrated one; loaded where the H100's idles).
    cpu_row = profiles["cpu_smollm2_fp32"]["by_size"][headline]
    payload = {"requests": {k: len(v) for k, v in traces.items()}, "headline_replicas": headline,
               "default_pool_blocks": DEFAULT_POOL_BLOCKS, "default_pool_slots": DEFAULT_POOL_SLOTS,
               "store_blocks_per_shard": STORE_BLOCKS_PER_SHARD, "replicas_per_store_shard": REPLICAS_PER_SHARD,
               "profiles": profiles, "router_scale": scale,
               "ratios": {
                   "cache_aware_hit_over_ceiling": at_least(aware["hit_over_ceiling"], CEILING_SHARE_TARGET, 3),
                   "round_robin_over_cache_aware_ttft_p50": at_least(
                       rr["ttft_s"]["p50"] / max(aware["ttft_s"]["p50"], 1e-9), TTFT_GAIN_TARGET),
                   # No router reaches the floor; where this is under the target, so is every router.
                   "round_robin_over_ttft_floor_p50": at_least(
                       rr["ttft_s"]["p50"] / max(h100["ttft_floor_s"]["p50"], 1e-9), TTFT_GAIN_TARGET),
                   "cpu_profile_cache_aware_hit_over_ceiling": at_least(cpu_row["cache_aware"]["hit_over_ceiling"],
                                                                        CEILING_SHARE_TARGET, 3),
                   "cpu_profile_round_robin_over_cache_aware_ttft_p50": at_least(
                       cpu_row["round_robin"]["ttft_s"]["p50"] / max(cpu_row["cache_aware"]["ttft_s"]["p50"], 1e-9),
                       TTFT_GAIN_TARGET),
                   "routing_decision_cpu_p99_us_256x10k": at_most(scale["prefix_index"]["cpu_p99_us"],
                                                                  DECISION_P99_TARGET_US, 1)}}
    ctx.write(NAME, payload)
    plot(ctx.results_dir / f"{NAME}.png", profiles, sizes)
    return payload


def plot(path: Path, profiles: dict, sizes) -> None:
    series = {}
    h100 = profiles["h100_llama3_8b_bf16"]
    for policy in POLICIES:
        series[f"{policy} TTFT p50 (s)"] = (list(sizes), [h100["by_size"][n][policy]["ttft_s"]["p50"] for n in sizes])
    for policy in POLICIES:
        series[f"{policy} hit / ceiling"] = (list(sizes), [h100["by_size"][n][policy]["hit_over_ceiling"] for n in sizes])
    line_plot(path, "Conversation trace, H100 cost model: hit ratio / ceiling and TTFT p50",
              "decode replicas", "value (see label)", series, log_x=True, log_y=True)
