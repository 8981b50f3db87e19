"""Multi-turn chat through the gateway under NVIDIA's aiperf: a shared system prompt cached once vs
busted per conversation.

aiperf (in its own virtualenv, `.venv-aiperf`, which `make bench` installs) drives the gateway's
OpenAI chat endpoint of the bench cluster, streaming, closed loop at each concurrency: `sessions`
conversations of `turns` user turns; every conversation opens with the same `system_tokens`-token
system prompt and a `context_tokens`-token user message of its own, every turn adds `turn_tokens`
new tokens, and aiperf resends the whole history (earlier turns and the answers it got) each turn;
`output_tokens` per answer (greedy, `ignore_eos`). Each concurrency runs twice: as is ("cache") and
with aiperf's `--cache-bust system-prefix` ("cache_bust": a marker unique to each conversation
opens its system prompt, so conversations share no block; each one's own history still hits).
Every run starts cold: aiperf's `--reset-kv-cache` POSTs the gateway's /reset_prefix_cache (every
decode replica drops its local cache) and each concurrency draws its own text (`--random-seed`),
so the cache store holds nothing of it either; the two modes of one concurrency get the same text
(aiperf shortens the busted system prompt by its marker's length). Modes alternate which goes
first; a few plain requests through the gateway warm the cluster up before the first run.

Recorded per run, from aiperf's JSON export (`profile_export_aiperf.json`): requests/s, TTFT
p50/p99, errors, prompt tokens and the share served from cache (usage cached_tokens).
Targets: throughput cache ÷ cache_bust >= 4 (each mode's requests over its runs' summed benchmark
time), TTFT p50 at the top concurrency (4; 2 in tiny mode) ÷ at concurrency 1, cache mode, <= 2,
errors 0.
"""

import json
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import at_least, at_most, not_run, progress
from bench.context import BenchContext
from bench.plots import bar_plot
from kvcluster.model.files import read_tokenizer_data
from kvcluster.model.tokenizer import Tokenizer

NAME = "aiperf_chat"
REPO = Path(__file__).resolve().parent.parent
AIPERF = Path(os.environ.get("KVC_AIPERF", REPO / ".venv-aiperf" / "bin" / "aiperf"))
EXPORT = "profile_export_aiperf.json"
MODES = ("cache", "cache_bust")
THROUGHPUT_TARGET = 4.0
TTFT_SCALING_TARGET = 2.0
RUN_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Sizes:
    system_tokens: int
    sessions: int
    context_tokens: int
    turns: int
    turn_tokens: int
    output_tokens: int
    concurrencies: tuple[int, ...]


SIZES = {"full": Sizes(1024, 16, 64, 3, 48, 16, (1, 4)),
         "quick": Sizes(1024, 8, 64, 2, 48, 8, (1, 4)),
         "tiny": Sizes(64, 2, 16, 2, 16, 2, (1, 2))}


def export_tokenizer(model: str | None, out_dir: Path) -> Path:
    """A directory transformers' AutoTokenizer loads with the served model's tokenizer (aiperf counts
    tokens and sizes prompts with it): a Hugging Face checkpoint is one already; for a GGUF, its
    vocabulary as tokenizer.json plus tokenizer_config.json (special tokens, chat template)."""
    if model and Path(model).is_dir():
        return Path(model)
    data = read_tokenizer_data(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(Tokenizer(data).to_json())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": data.tokens[data.bos_id],
              "eos_token": data.tokens[data.eos_id], "chat_template": data.chat_template,
              "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out_dir


def aiperf_command(url: str, model: str, tokenizer: Path, sizes: Sizes, concurrency: int, mode: str, seed: int,
                   out_dir: Path) -> list[str]:
    return [str(AIPERF), "profile", "--url", url, "--model", model, "--endpoint-type", "chat", "--streaming",
            "--tokenizer", str(tokenizer),
            "--shared-system-prompt-length", str(sizes.system_tokens),
            "--user-context-prompt-length", str(sizes.context_tokens), "--num-dataset-entries", str(sizes.sessions),
            "--num-sessions", str(sizes.sessions), "--session-turns-mean", str(sizes.turns),
            "--session-turns-stddev", "0", "--isl", str(sizes.turn_tokens), "--osl", str(sizes.output_tokens),
            "--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0",
            "--concurrency", str(concurrency), "--cache-bust", "system-prefix" if mode == "cache_bust" else "none",
            "--reset-kv-cache", "--random-seed", str(seed), "--use-server-token-count",
            # aiperf's own processes share the 2 cores with the cluster: one worker, nothing optional
            "--workers-max", "1", "--record-processors", "1", "--no-server-metrics", "--no-gpu-telemetry",
            "--ui-type", "none", "--export-level", "summary", "--artifact-dir", str(out_dir)]


def parse_export(path: Path, expected_requests: int) -> dict:
    """The figures of one aiperf run from its JSON export. Requests that never completed (the run was
    cancelled) count as errors with the ones aiperf reports."""
    export = json.loads(path.read_text())

    def stat(name: str, field: str = "avg", default: float = 0.0) -> float:
        return float(export.get(name, {}).get(field, default))

    completed = int(stat("request_count"))
    reported = int(stat("error_request_count", default=sum(e["count"] for e in export.get("error_summary", []))))
    prompt = int(stat("total_usage_prompt_tokens"))
    cached = int(stat("total_usage_prompt_cache_read_tokens"))
    return {"requests": completed, "errors": reported + max(0, expected_requests - completed - reported),
            "duration_s": round(stat("benchmark_duration"), 3), "requests_per_s": round(stat("request_throughput"), 4),
            "ttft_p50_ms": round(stat("time_to_first_token", "p50"), 1),
            "ttft_p99_ms": round(stat("time_to_first_token", "p99"), 1),
            "prompt_tokens": prompt, "cached_tokens": cached, "cached_share": round(cached / prompt, 3) if prompt else 0.0,
            "output_tokens": int(stat("total_output_tokens")), "aiperf_version": export.get("aiperf_version", ""),
            "cancelled": bool(export.get("was_cancelled", False))}


def run_aiperf(command: list[str], out_dir: Path, expected_requests: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "aiperf.log"
    with open(log, "w") as stream:
        # Never offline (the transformers baseline sets HF_HUB_OFFLINE in this process): aiperf 0.13
        # then looks the local tokenizer directory up in the hub's cache as a repo id, and fails.
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S, env=env)
    if done.returncode != 0 or not (out_dir / EXPORT).exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"aiperf exited with {done.returncode} (log {log}):\n{tail}")
    return parse_export(out_dir / EXPORT, expected_requests)


def warm_up(url: str, model: str, tokens: int) -> None:
    """A few requests of the run's prompt sizes straight through the gateway, so the first aiperf run
    does not pay the cluster's first forwards and the decode worker's first cost measurements (each
    run's reset then empties the local cache again)."""
    rng = random.Random(0)
    for words in (tokens // 2, tokens, 64):
        text = " ".join(rng.choice(("apple", "river", "stone", "cloud", "maple", "ember")) for _ in range(words))
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0}
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).raise_for_status()


def combined(runs: list[dict]) -> dict:
    """One mode over all its runs: requests over summed benchmark time, errors summed, and the tokens
    the cluster had to compute (prompt tokens not served from cache, plus every output token)."""
    duration = sum(r["duration_s"] for r in runs)
    computed = sum(r["prompt_tokens"] - r["cached_tokens"] + r["output_tokens"] for r in runs)
    return {"requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs),
            "duration_s": round(duration, 3), "computed_tokens": computed,
            "requests_per_s": round(sum(r["requests"] for r in runs) / duration, 4) if duration else 0.0}


def skipped(ctx: BenchContext, sizes: Sizes, reason: str) -> dict:
    """Tiny mode without aiperf installed (`make test` does not install it): say so, plot nothing."""
    progress(NAME, f"skipped: {reason}")
    payload = {"sizes": sizes.__dict__, "skipped": reason,
               "ratios": {"throughput_cache_over_cache_bust": not_run(f">= {THROUGHPUT_TARGET:g}", reason),
                          "ttft_p50_cache_top_over_c1": not_run(f"<= {TTFT_SCALING_TARGET:g}", reason),
                          "errors": not_run("<= 0", reason)}}
    ctx.write(NAME, payload)
    bar_plot(ctx.results_dir / f"{NAME}.png", f"aiperf not run: {reason}", "", ["requests / s"], {"not run": [0.0]})
    return payload


def run(ctx: BenchContext) -> dict:
    sizes = ctx.pick(SIZES)
    if not AIPERF.exists():
        reason = f"aiperf is not installed at {AIPERF} (make bench installs it)"
        if ctx.mode == "tiny":
            return skipped(ctx, sizes, reason)
        raise RuntimeError(reason)
    url, model = ctx.gateway_url(), ctx.cluster().served_model
    tokenizer = export_tokenizer(ctx.model, ctx.scratch_dir / "aiperf-tokenizer")
    expected = sizes.sessions * sizes.turns
    warm_up(url, model, sizes.system_tokens + sizes.context_tokens)
    runs: dict[str, dict[int, dict]] = {mode: {} for mode in MODES}
    for i, concurrency in enumerate(sizes.concurrencies):
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            out_dir = ctx.scratch_dir / "aiperf" / f"{mode}-c{concurrency}"
            command = aiperf_command(url, model, tokenizer, sizes, concurrency, mode, seed=100 + i, out_dir=out_dir)
            row = runs[mode][concurrency] = run_aiperf(command, out_dir, expected)
            progress(NAME, f"{mode:<10} concurrency {concurrency}: {row['requests_per_s']:.2f} req/s, TTFT p50 "
                     f"{row['ttft_p50_ms']:.0f} ms p99 {row['ttft_p99_ms']:.0f} ms, cached {row['cached_share']:.2f}, "
                     f"errors {row['errors']}")
    totals = {mode: combined(list(runs[mode].values())) for mode in MODES}
    low, high = sizes.concurrencies[0], sizes.concurrencies[-1]
    errors = sum(t["errors"] for t in totals.values())
    payload = {
        "sizes": sizes.__dict__, "aiperf": str(AIPERF), "aiperf_version": runs["cache"][low]["aiperf_version"],
        "command_example": " ".join(aiperf_command(url, model, tokenizer, sizes, high, "cache_bust", 0, Path("OUT"))),
        "runs": {mode: {f"c{c}": row for c, row in by_c.items()} for mode, by_c in runs.items()}, "totals": totals,
        # What the cache can buy at most if every computed token cost the same: the ratio of tokens each
        # mode computed. A decode token costs far more than a prompt token at concurrency 1-4 on a CPU
        # (each step reads every weight for a few rows), so the attainable throughput ratio lies below.
        "computed_tokens_cache_bust_over_cache": round(
            totals["cache_bust"]["computed_tokens"] / max(1, totals["cache"]["computed_tokens"]), 2),
        "ratios": {
            "throughput_cache_over_cache_bust": at_least(
                totals["cache"]["requests_per_s"] / totals["cache_bust"]["requests_per_s"], THROUGHPUT_TARGET),
            "ttft_p50_cache_top_over_c1": at_most(
                runs["cache"][high]["ttft_p50_ms"] / runs["cache"][low]["ttft_p50_ms"], TTFT_SCALING_TARGET),
            "errors": at_most(errors, 0, digits=0),
        },
    }
    ctx.write(NAME, payload)
    bar_plot(ctx.results_dir / f"{NAME}.png",
             f"aiperf multi-turn chat via the gateway: {sizes.sessions} sessions x {sizes.turns} turns, "
             f"{sizes.system_tokens}-token shared system prompt", "value (units in the group name)",
             ["requests / s", "TTFT p50 (s)", "TTFT p99 (s)", "cached share"],
             {f"{mode} c{c}": [row["requests_per_s"], row["ttft_p50_ms"] / 1000, row["ttft_p99_ms"] / 1000,
                               row["cached_share"]]
              for c in sizes.concurrencies for mode in MODES for row in [runs[mode][c]]})
    return payload
