"""`python -m bench.suite [--quick | --tiny] [--model FILE] [--only NAME,...] [--results-dir DIR]`

Every kvcluster benchmark in one run, each a ratio against a baseline measured side by side:
  index_latency      Redis index lookup p50/p99 for 16-1024 hashes: one Redis, Sentinel, Redis Cluster
  kv_transfer        bench/transfer.py: store pull vs raw TCP loopback, same bytes; store RSS
  spill_tier         store hit ratio with host + disk spill tiers vs the pool alone; pull MB/s per tier
  hot_replication    hot prefix's store hit ratio after one of 2 stores is SIGKILLed: replication on vs off
  engine             in-process prefill and decode tok/s
  determinism        the cost of batch-invariant numerics (the default): throughput vs the fast ones, fp32 and bf16
  decode_throughput  our engine vs transformers `generate`, batch 1-16
  structured_output  decode tok/s at batch 8 held to a JSON Schema vs free (llguidance's mask per step)
  ttft               TTFT vs prompt length through the cluster: cold, half-cached, fully cached
  overhead           cold end-to-end latency: cluster vs in-process engine
  shared_prefix      8 concurrent clients, 80% shared system prompt: cache vs bypass_cache
  routing            multi-turn chat via the gateway over 2 decode replicas: cache-aware vs round robin
  aiperf_chat        NVIDIA aiperf, multi-turn chat via the gateway: shared system prompt vs --cache-bust
  fleet              Mooncake traces simulated over 4-256 replicas through our router and tiers; routing at 256 x 10k
Each writes DIR/<name>.json (machine, commit, figures, "ratios") and DIR/<name>.png; the run
writes DIR/suite.json (every ratio, durations) and DIR/summary.md (a ratio table). Measures
that need no cluster run first, so the in-process ones never share the 2 cores with it.
`make bench` is the full run (< 20 min on the 2-core CPU), `make bench-quick` the `--quick` one.
"""

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import (aiperf_chat, decode_throughput, determinism, dtype_speed, engine, fleet, hot_replication,
                   index_latency, kv_transfer, overhead, routing, shared_prefix, spill_tier, structured_output, ttft)
from bench.common import RESULTS_DIR, progress
from bench.context import BenchContext
from kvcluster.kv.dtypes import DTYPE_CHOICES

BUSY_LOAD_PER_CORE = 0.5
OMP_WAIT_POLICY = "PASSIVE"
MEASURES: dict[str, Callable[[BenchContext], dict]] = {
    "index_latency": index_latency.run,
    "kv_transfer": kv_transfer.run,
    "spill_tier": spill_tier.run,
    "hot_replication": hot_replication.run,
    "engine": engine.run,
    "determinism": determinism.run,
    "decode_throughput": decode_throughput.run,
    "dtype_speed": dtype_speed.run,
    "structured_output": structured_output.run,
    "ttft": ttft.run,
    "overhead": overhead.run,
    "shared_prefix": shared_prefix.run,
    "routing": routing.run,
    "aiperf_chat": aiperf_chat.run,
    "fleet": fleet.run,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer lengths and repetitions (< 3 minutes)")
    size.add_argument("--tiny", action="store_true", help="smallest run that still writes every JSON and PNG "
                      "(the suite's own test); skips the transformers baseline")
    parser.add_argument("--model", default=None, help="llama GGUF file (default: the shipped SmolLM2-135M)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(MEASURES)}")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where JSON and PNG files go")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES,
                        help="dtype of the engine and cluster the measures use (dtype_speed always runs both)")
    args = parser.parse_args(argv)
    args.names = [n.strip() for n in args.only.split(",") if n.strip()] or list(MEASURES)
    unknown = [n for n in args.names if n not in MEASURES]
    if unknown:
        parser.error(f"unknown measure(s) {unknown}; choose from {list(MEASURES)}")
    return args


def ratio_table(ratios: dict[str, dict[str, dict]]) -> str:
    """Markdown table of every ratio: measure, name, value, target, met."""
    lines = ["| measure | ratio | value | target | met |", "|---|---|---|---|---|"]
    for measure, entries in ratios.items():
        for name, entry in entries.items():
            met = "not run" if entry["met"] is None else "yes" if entry["met"] else "**no**"
            value = "—" if entry["value"] is None else f"{entry['value']:g}"
            lines.append(f"| {measure} | {name} | {value} | {entry['target']} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "OMP_WAIT_POLICY" not in os.environ:
        # libgomp reads it once, when torch loads, so it takes a fresh process. With the default
        # (spinning) policy, torch's 2 threads on 2 cores collapse 3-10x whenever anything else runs
        # (a busy dev box, or prefill and decode computing at once): a thread spins at a barrier
        # while its partner waits for a core. PASSIVE waiters sleep instead. The cluster children
        # inherit it. Set OMP_WAIT_POLICY yourself to measure another policy.
        os.execve(sys.executable, [sys.executable, "-m", "bench.suite", *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, "OMP_WAIT_POLICY": OMP_WAIT_POLICY})
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    ratios: dict[str, dict] = {}
    durations: dict[str, float] = {}
    failed: dict[str, str] = {}
    suite_start = time.perf_counter()
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > BUSY_LOAD_PER_CORE * cores:
        progress("suite", f"WARNING: load average {load:.1f} on {cores} cores: other work is running, "
                          "figures will be noisy (each JSON records machine.loadavg_1m)")
    with BenchContext(mode, args.model, args.results_dir, args.dtype) as ctx:
        for i, name in enumerate(args.names):
            progress("suite", f"({i + 1}/{len(args.names)}) {name}, {mode} mode")
            start = time.perf_counter()
            try:
                ratios[name] = MEASURES[name](ctx)["ratios"]
            except Exception:  # one broken measure must not cost the others' results
                failed[name] = traceback.format_exc()
                progress("suite", f"{name} FAILED:\n{failed[name]}")
            durations[name] = round(time.perf_counter() - start, 1)
            progress("suite", f"{name} done in {durations[name]:.0f} s")
        total = round(time.perf_counter() - suite_start, 1)
        ctx.write("suite", {"measures": args.names, "model": str(ctx.model_path.name), "duration_s": durations,
                            "total_s": total, "failed": sorted(failed), "all_ratios": ratios})
    table = ratio_table(ratios)
    (args.results_dir / "summary.md").write_text(f"{mode} run, {total:.0f} s\n\n{table}\n")
    print(f"\n{table}\n\n{mode} run finished in {total:.0f} s; results in {args.results_dir}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
