"""`python scripts/perf_table.py [--check]`: the README's performance table, from bench/results/*.json.

Every measure of the bench suite writes bench/results/<name>.json with its `ratios` (value, target,
met) and the machine and commit it ran on (bench/common.py). This script turns those ratios into the
table between the README's `<!-- perf-table:begin -->` and `<!-- perf-table:end -->` markers: one row
per ratio, measures in the order of the last suite run (bench/results/suite.json's `measures`), then
any other results file (measures run on their own, e.g. fleet_check) by name. A line under the table
names the commit, date and machine of every run the figures come from.

Without arguments it rewrites the README; `--check` changes nothing and exits 1 (printing a diff)
when the README's table differs from what the results give, so the figures and the README cannot
drift apart (tests/test_perf_table.py runs it). After a bench run: `python scripts/perf_table.py`.
"""

import argparse
import difflib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- perf-table:begin -->"
END = "<!-- perf-table:end -->"
SUMMARY = "suite.json"  # the suite's own record: measure order and the run; no ratios of its own

# What each ratio measures, in words, and the unit its value and target read in. A ratio missing
# here still gets a row, under its JSON name.
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "index_latency.lookup_64_p99_ms": ("Redis index: lookup of 64 hashes, p99", " ms"),
    "kv_transfer.pull_over_raw_tcp": ("store pull ÷ raw TCP loopback, same bytes (64 blocks)", "×"),
    "kv_transfer.store_rss_end_over_start": ("store RSS after 1,000 push/pull cycles ÷ at start-up", "×"),
    "engine.full_prefill_over_warm_forward":
        ("full 1,024-token prefill ÷ one forward of the last token after 1,023 cached", "×"),
    "engine.prefill_1024_tok_s": ("prefill speed, 1,024-token prompt", " tok/s"),
    "engine.decode_batch8_over_batch1": ("decode tok/s, batch 8 ÷ batch 1", "×"),
    "determinism.float32_worst_on_over_off":
        ("batch-invariant (default) ÷ fast numerics, worst throughput, fp32", "×"),
    "determinism.bfloat16_worst_on_over_off":
        ("batch-invariant (default) ÷ fast numerics, worst throughput, bf16", "×"),
    "decode_throughput.ours_over_transformers_batch1": ("decode tok/s ÷ transformers `generate`, batch 1", "×"),
    "decode_throughput.ours_over_transformers_batch8": ("decode tok/s ÷ transformers `generate`, batch 8", "×"),
    "decode_throughput.ours_over_transformers_batch16": ("decode tok/s ÷ transformers `generate`, batch 16", "×"),
    "decode_throughput.ours_batch8_over_batch1": ("decode tok/s, batch 8 ÷ batch 1", "×"),
    "dtype_speed.bf16_over_fp32_prefill_1024": ("bf16 ÷ fp32 prefill, 1,024 tokens", "×"),
    "dtype_speed.bf16_over_fp32_decode_batch1": ("bf16 ÷ fp32 decode, batch 1", "×"),
    "dtype_speed.bf16_over_fp32_decode_batch8": ("bf16 ÷ fp32 decode, batch 8", "×"),
    "dtype_speed.bf16_over_fp32_decode_batch16": ("bf16 ÷ fp32 decode, batch 16", "×"),
    "structured_output.json_schema_over_free_decode_batch8":
        ("decode tok/s held to a JSON Schema ÷ free, batch 8", "×"),
    "ttft.ttft_cold_over_warm": ("TTFT cold ÷ warm (from the worker's own pool), 1,024 tokens", "×"),
    "ttft.ttft_cold_over_half": ("TTFT cold ÷ half the prompt cached, 1,024 tokens", "×"),
    "overhead.cluster_over_in_process": ("cold end-to-end latency, cluster ÷ in-process engine", "×"),
    "shared_prefix.throughput_cache_over_bypass":
        ("8 clients, 80% shared prefix: throughput, cache ÷ `bypass_cache`", "×"),
    "shared_prefix.ttft_p50_bypass_over_cache": ("8 clients, shared prefix: TTFT p50, `bypass_cache` ÷ cache", "×"),
    "shared_prefix.ttft_p99_bypass_over_cache": ("8 clients, shared prefix: TTFT p99, `bypass_cache` ÷ cache", "×"),
    "shared_prefix.reusable_hit_ratio": ("8 clients, shared prefix: hit ratio of reusable tokens", ""),
    "routing.local_cache_share_cache_aware":
        ("2 decode replicas, multi-turn chat: history found in the serving replica's pool, cache-aware", ""),
    "routing.local_cache_share_cache_aware_over_round_robin": ("that share, cache-aware ÷ round robin", "×"),
    "aiperf_chat.throughput_cache_over_cache_bust":
        ("aiperf multi-turn chat via the gateway: throughput, cache ÷ `--cache-bust`", "×"),
    "aiperf_chat.ttft_p50_cache_top_over_c1": ("aiperf: TTFT p50, concurrency 4 ÷ concurrency 1", "×"),
    "aiperf_chat.errors": ("aiperf: failed requests", ""),
    "fleet.cache_aware_hit_over_ceiling":
        ("simulated fleet, 64 replicas, H100 cost model: prefix hit ratio ÷ the trace's ceiling, cache-aware", ""),
    "fleet.round_robin_over_cache_aware_ttft_p50":
        ("simulated fleet, H100 cost model: TTFT p50, round robin ÷ cache-aware", "×"),
    "fleet.round_robin_over_ttft_floor_p50":
        ("simulated fleet, H100 cost model: TTFT p50, round robin ÷ the floor (the most any router could show)", "×"),
    "fleet.cpu_profile_cache_aware_hit_over_ceiling":
        ("simulated fleet, 64 replicas, this machine's cost model: prefix hit ratio ÷ the ceiling, cache-aware", ""),
    "fleet.cpu_profile_round_robin_over_cache_aware_ttft_p50":
        ("simulated fleet, this machine's cost model: TTFT p50, round robin ÷ cache-aware", "×"),
    "fleet.routing_decision_cpu_p99_us_256x10k":
        ("routing decision, 256 replicas × 10k blocks, CPU time p99", " µs"),
    "fleet_check.hit_ratio_abs_difference": ("simulator vs real 2-replica cluster: hit ratio, difference", ""),
    "fleet_check.ttft_p50_relative_difference":
        ("simulator vs real 2-replica cluster: TTFT p50, relative difference", ""),
    "models.smollm2_batch8_over_batch1_fp32": ("SmolLM2-135M decode tok/s, batch 8 ÷ batch 1 (fp32)", "×"),
    "models.gemma3_batch8_over_batch1_fp32": ("Gemma 3 270M decode tok/s, batch 8 ÷ batch 1 (fp32)", "×"),
}
COMPARATORS = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}


def load_results(results_dir: Path) -> list[dict]:
    """Every results file with ratios, in the suite's order, then the others by name."""
    payloads = {}
    for path in sorted(results_dir.glob("*.json")):
        if path.name == SUMMARY:
            continue
        payload = json.loads(path.read_text())
        if payload.get("ratios"):
            payloads[payload.get("name", path.stem)] = payload
    order = []
    summary = results_dir / SUMMARY
    if summary.exists():
        order = [name for name in json.loads(summary.read_text()).get("measures", []) if name in payloads]
    order += [name for name in sorted(payloads) if name not in order]
    return [payloads[name] for name in order]


def number(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def target_text(target: str, unit: str) -> str:
    for op, sign in COMPARATORS.items():
        if target.startswith(op):
            return f"{sign} {number(float(target[len(op):]))}{unit}"
    return target


def run_of(payload: dict) -> str:
    machine = payload.get("machine", {})
    return machine.get("commit", "unknown")


def table(payloads: list[dict]) -> str:
    lines = ["| measure | what | value | target | met | commit |", "|---|---|---|---|---|---|"]
    for payload in payloads:
        name = payload["name"]
        for ratio, entry in payload["ratios"].items():
            what, unit = DESCRIPTIONS.get(f"{name}.{ratio}", (f"`{ratio}`", ""))
            value = "—" if entry.get("value") is None else f"{number(entry['value'])}{unit}"
            met = "not run" if entry.get("met") is None else "yes" if entry["met"] else "**no**"
            lines.append(f"| {name} | {what} | {value} | {target_text(entry['target'], unit)} | {met} | "
                         f"{run_of(payload)} |")
    runs: dict[str, list[str]] = {}
    for payload in payloads:
        machine = payload.get("machine", {})
        day = str(machine.get("time", ""))[:10] or "undated"
        where = f"{machine.get('cpu') or 'unknown CPU'}, {machine.get('cores', '?')} cores, {machine.get('device', 'cpu')}"
        mode = payload.get("mode")
        key = f"{run_of(payload)} ({day}, {where}{f', {mode} mode' if mode else ''})"
        runs.setdefault(key, []).append(payload["name"])
    lines.append("")
    lines.append("Runs: " + "; ".join(f"{key}: {', '.join(names)}" for key, names in runs.items()) + ".")
    return "\n".join(lines)


def render(readme: str, generated: str) -> str:
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise SystemExit(f"the README needs one {BEGIN} line followed by one {END} line")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n<!-- generated by scripts/perf_table.py from bench/results/*.json: do not edit by hand -->\n" \
           f"{generated}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/perf_table.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's table is not up to date")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    wanted = render(current, table(load_results(args.results_dir)))
    if args.check:
        if wanted == current:
            return 0
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), wanted.splitlines(True),
                                                   str(args.readme), "from bench/results"))
        print(f"\n{args.readme} is out of date: run `python scripts/perf_table.py`", file=sys.stderr)
        return 1
    if wanted != current:
        args.readme.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
