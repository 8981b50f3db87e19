"""`python -m bench.fleet_check`: the fleet simulator's replica model against a real 2-replica cluster.

A slice of the Mooncake conversation trace, scaled down to this machine: the requests of the
conversations with the most turns in its first `WINDOW_S` seconds, their arrivals compressed to
`SPAN_S`, each 512-token trace block replayed as one 16-token block of token ids drawn from its hash
id (equal ids, equal tokens, so the prefix structure is the trace's). The real run sends them
through the gateway (cache_aware, 2 decode replicas, the default pools and store) as
/v1/completions with token-id prompts, streamed, `MAX_TOKENS` tokens each; the simulator replays
the same requests over 2 replicas with the CPU cost model (bench/fleet.py's, pulls per 16-token
block), the default pool's 728 slots and the store's 1,456 (1 GiB / 737,280 B). Compared: prefix
hit ratio (tokens found local or in the store ÷ prompt tokens) and TTFT p50. Targets: within 0.05
and 30%. Writes bench/results/fleet_check.json.

The cost model's request path (`CostModel.request_path_s`: HTTP, the gateway's tokenizing and index
lookup, gRPC, the replica's scheduling, the first token's way back) is calibrated on the same
cluster before the trace, apart from it: the median TTFT of a tiny prompt whose blocks the replica
already holds (`CALIBRATION_PROMPT`, sent one at a time, every send after the first fully cached but
its last token) less what the cost model gives for that one token's forward. It is sent asking for
`MAX_TOKENS` tokens, as the trace's requests are: the replica then starts its next decode step as
the first token leaves, and the token's way back (the replica's gRPC thread, the gateway, the
client) competes with that step's torch threads for the cores. The same with 1 token (nothing runs
behind the first) is recorded beside it (`path_calibration.one_token`).

The context's terms of the cost model (`CostModel.context_s_per_token`, `attend_s_per_token_pair`:
what a forward's cached tokens add, issue #29) are fitted first, before the cluster starts, on this
machine: the in-process engine (the workers' model, float32) times a forward of N new tokens after C
cached for N in `ATTEND_NEW` x C in `ATTEND_CONTEXT` (the fastest of `ATTEND_ROUNDS`), and least
squares fits a + b N + c C + d N C (`context_calibration` records the points, the fit and the decode
steps by context beside it). `simulated_without_context_terms` is the same simulation with both 0.

Both sides run on one host: the simulator's 2 replicas share `os.sched_getaffinity` cores with
`torch.get_num_threads()` threads each (`FleetConfig.replicas_per_host`, `host_cores`: processor
sharing), as the real replicas do. The result also keeps the simulation without that sharing and
with the 1-token path, and an error analysis (simulated and measured TTFT of each request, matched
by its index in the slice, by computed tokens and by whether the other replica was busy).
"""

import argparse
import dataclasses
import math
import os
import random
import statistics
import threading
import time
from collections import Counter

import numpy as np
import openai
import torch

from bench.common import RESULTS_DIR, at_most, percentile, progress, write_result
from bench.engine import random_prompt
from bench.fleet import cpu_profile
from bench.fleet_sim import TRACES_DIR, FleetConfig, FleetSim, TraceRequest, load_trace
from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.engine.engine import EngineConfig, load_engine
from kvcluster.model.llama import DecodeSeq, PrefillSeq

NAME = "fleet_check"
BLOCK_TOKENS = 16
WINDOW_S = 900.0
SPAN_S = 120.0
MAX_TOKENS = 4
REPLICA_SLOTS = (512 << 20) // 737_280
STORE_SLOTS = (1 << 30) // 737_280
CALIBRATION_PROMPT = list(range(1000, 1000 + 2 * BLOCK_TOKENS + 1))  # 2 full blocks and 1 token
CALIBRATION_SENDS = 8
ATTEND_NEW = (1, 16, 64, 256)          # new tokens of the forwards timed for the context term
ATTEND_CONTEXT = (0, 256, 1024, 2048)  # cached tokens before them
ATTEND_ROUNDS = 7


def trace_slice(conversations: int) -> list[TraceRequest]:
    requests = [r for r in load_trace(TRACES_DIR / "mooncake_conversation_trace.jsonl")
                if r.arrival_s < WINDOW_S and len(r.block_hashes) > 1]
    turns = Counter(r.block_hashes[1] for r in requests)
    chosen = {key for key, _ in turns.most_common(conversations)}
    picked = [r for r in requests if r.block_hashes[1] in chosen]
    start, span = picked[0].arrival_s, picked[-1].arrival_s - picked[0].arrival_s
    return [dataclasses.replace(r, arrival_s=(r.arrival_s - start) * SPAN_S / span,
                                input_tokens=BLOCK_TOKENS * len(r.block_hashes), output_tokens=MAX_TOKENS)
            for r in picked]


def prompt_ids(request: TraceRequest) -> list[int]:
    ids = []
    for block_hash in request.block_hashes:
        rng = random.Random(block_hash)
        ids += [rng.randrange(100, 49_000) for _ in range(BLOCK_TOKENS)]
    return ids


def first_token(client: openai.OpenAI, model: str, ids: list[int], max_tokens: int) -> dict:
    """One streamed completion: its TTFT and where its prompt tokens came from."""
    sent, first, usage = time.perf_counter(), None, None
    for chunk in client.completions.create(model=model, prompt=ids, max_tokens=max_tokens,
                                           temperature=0, stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and first is None:
            first = time.perf_counter() - sent
        if chunk.usage is not None:
            usage = chunk.usage
    sources = usage.kvcluster
    return {"ttft_s": first, "prompt_tokens": usage.prompt_tokens, "local": sources["local_cache_tokens"],
            "store": sources["store_tokens"], "replica": sources["replica"]}


def send(client: openai.OpenAI, model: str, index: int, request: TraceRequest, start: float, out: list) -> None:
    time.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
    sent = time.perf_counter() - start
    out.append({"index": index, "sent_s": round(sent, 3),
                **first_token(client, model, prompt_ids(request), MAX_TOKENS)})


def calibrate_path(client: openai.OpenAI, model: str, max_tokens: int) -> dict:
    """TTFTs of `CALIBRATION_PROMPT` sent one at a time asking for `max_tokens` (the first computes
    it, the rest find all but its last token cached)."""
    sends = [first_token(client, model, CALIBRATION_PROMPT, max_tokens) for _ in range(CALIBRATION_SENDS)]
    cached = [s for s in sends[1:] if s["local"] == len(CALIBRATION_PROMPT) - 1]
    return {"prompt_tokens": len(CALIBRATION_PROMPT), "max_tokens": max_tokens, "sends": len(sends),
            "fully_cached_sends": len(cached),
            "ttft_p50_s": round(statistics.median(s["ttft_s"] for s in cached), 4) if cached else None,
            "ttft_s": [round(s["ttft_s"], 4) for s in sends]}


def forward_seconds(rounds: int = ATTEND_ROUNDS) -> dict:
    """In-process (the workers' model, float32, this process's torch threads, nothing else of the
    cluster running): seconds of a prefill forward of N new tokens after C cached ones, for N in
    `ATTEND_NEW` x C in `ATTEND_CONTEXT`, and of one decode step (batch 1) at each C. The whole grid
    is run `rounds` times after a warm-up round and each point keeps its fastest: other jobs on the
    cores only ever add time, so the minimum is the forward's own cost."""
    engine = load_engine(None, "cpu", EngineConfig(kv_capacity_bytes=512 << 20), dtype="float32")
    kv, bs = engine.pool.kv, engine.config.block_size
    longest = max(ATTEND_NEW) + max(ATTEND_CONTEXT) + 1
    ids = random_prompt(longest, seed=longest)
    slots = engine.blocks.allocate(-(-longest // bs))
    forwards = {(new, context): [PrefillSeq(ids[context:context + new], context, slots)]
                for context in ATTEND_CONTEXT for new in ATTEND_NEW}
    steps = {context: [DecodeSeq(ids[context], context, slots)] for context in ATTEND_CONTEXT}
    prefill, decode = {key: math.inf for key in forwards}, {key: math.inf for key in steps}
    try:
        engine.model.prefill(kv, [PrefillSeq(ids, 0, slots)])  # every position's K/V written once
        for round_ in range(rounds + 1):
            for times, run, plans in ((prefill, engine.model.prefill, forwards), (decode, engine.model.decode, steps)):
                for key, plan in plans.items():
                    start = time.perf_counter()
                    run(kv, plan)
                    if round_:  # round 0 warms up
                        times[key] = min(times[key], time.perf_counter() - start)
    finally:
        engine.blocks.free(slots)
    return {"prefill": prefill, "decode": decode}


def fit_context(timings: dict) -> dict:
    """Least squares of the relative error over the prefill points (a 1-token forward counts as much as
    a 256-token one): seconds = a + b x N + c x C + d x N x C (N new tokens, C cached). c is
    `CostModel.context_s_per_token`, d `attend_s_per_token_pair`; a and b are recorded only (the cost
    model keeps the committed results' decode step and per-token cost). With each point's fit, and
    each decode step beside the C = 0 step plus what c + d give for its context."""
    points = sorted(timings["prefill"].items())
    design = np.array([[1.0, n, c, n * c] for (n, c), _ in points])
    seconds = np.array([t for _, t in points])
    (a, b, c, d), *_ = np.linalg.lstsq(design / seconds[:, None], np.ones(len(points)), rcond=None)
    step0 = timings["decode"][min(timings["decode"])]
    return {"context_s_per_token": float(c), "attend_s_per_token_pair": float(d),
            "intercept_s": round(float(a), 5), "prefill_s_per_token": float(b),
            "prefill_ms": [{"new": n, "context": ctx, "measured": round(t * 1e3, 1),
                            "fit": round(float(design[i] @ (a, b, c, d)) * 1e3, 1)}
                           for i, ((n, ctx), t) in enumerate(points)],
            "decode_step_ms": [{"context": ctx, "measured": round(t * 1e3, 1),
                                "context_terms_over_c0": round(float(step0 + ctx * (c + d)) * 1e3, 1)}
                               for ctx, t in sorted(timings["decode"].items())]}


def real_run(requests: list[TraceRequest]) -> tuple[dict, list[dict]]:
    log = open(RESULTS_DIR / "tmp" / "fleet-check-cluster.log", "a")
    with Cluster(ClusterPorts.any_free(), log_stream=log, dtype="float32", decode_replicas=2, gateway=True,
                 gateway_args=("--routing", "cache_aware")) as cluster:
        client = openai.OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="unused", max_retries=0, timeout=600)
        calibration = calibrate_path(client, cluster.served_model, MAX_TOKENS)
        calibration["one_token"] = calibrate_path(client, cluster.served_model, 1)
        out: list[dict] = []
        start = time.perf_counter()
        threads = [threading.Thread(target=send, args=(client, cluster.served_model, i, r, start, out))
                   for i, r in enumerate(requests)]
        for thread in threads:
            thread.start()
        load = [os.getloadavg()[0]]  # other jobs on the machine take cores from the cluster: recorded
        for thread in threads:
            while thread.is_alive():
                thread.join(5.0)
                load.append(os.getloadavg()[0])
        calibration["loadavg_1m_during_trace"] = {"start": round(load[0], 2), "max": round(max(load), 2),
                                                  "end": round(load[-1], 2)}
    log.close()
    return calibration, out


def with_path(config: FleetConfig, path_s: float) -> FleetConfig:
    return dataclasses.replace(config, cost=dataclasses.replace(config.cost, request_path_s=path_s))


def simulate_each(requests: list[TraceRequest], config: FleetConfig) -> tuple[dict, dict[int, dict]]:
    sim = FleetSim(config)
    return sim.run(requests), sim.per_request


ANALYSIS_BUCKETS = ((0, 1), (2, 16), (17, 64), (65, 256), (257, 1 << 30))


def error_analysis(measured: list[dict], simulated_each: dict[int, dict]) -> dict:
    """Each request's measured and simulated TTFT side by side (matched by index), grouped by the
    tokens it computed (measured) and by whether the other replica was busy as its prefill began
    (simulated): where the model is short, and by how much."""
    rows = [(m["prompt_tokens"] - m["local"] - m["store"], m["ttft_s"], simulated_each[m["index"]])
            for m in measured if "ttft_s" in simulated_each.get(m["index"], {})]

    def group(picked: list) -> dict:
        if not picked:
            return {"requests": 0}
        return {"requests": len(picked),
                "measured_p50_s": round(statistics.median(t for _, t, _ in picked), 4),
                "simulated_p50_s": round(statistics.median(s["ttft_s"] for _, _, s in picked), 4),
                "measured_over_simulated_p50": round(statistics.median(t / s["ttft_s"] for _, t, s in picked), 3)}

    return {"by_computed_tokens": {f"{lo}-{hi}" if hi < 1 << 30 else f">{lo - 1}":
                                   group([r for r in rows if lo <= r[0] <= hi]) for lo, hi in ANALYSIS_BUCKETS},
            "by_other_replica_busy_at_start": {str(busy): group([r for r in rows
                                                                 if r[2]["busy_on_host_at_start"] == busy])
                                               for busy in (0, 1)},
            "all": group(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_check", description=__doc__)
    parser.add_argument("--conversations", type=int, default=8)
    args = parser.parse_args(argv)
    (RESULTS_DIR / "tmp").mkdir(exist_ok=True)
    requests = trace_slice(args.conversations)
    cpu = cpu_profile()
    # pulls per 16-token block; the request path is this run's own calibration, not a committed one
    cores, threads = len(os.sched_getaffinity(0)), torch.get_num_threads()  # the workers' torch default too
    cost = dataclasses.replace(cpu, pull_s_per_block=cpu.pull_s_per_block * BLOCK_TOKENS / 512, request_path_s=0.0,
                               threads=threads)
    progress(NAME, f"timing the in-process forward at {len(ATTEND_NEW)} x {len(ATTEND_CONTEXT)} (new, cached) points")
    load_before = os.getloadavg()[0]
    context_fit = {**fit_context(forward_seconds()), "loadavg_1m": {"start": round(load_before, 2),
                                                                    "end": round(os.getloadavg()[0], 2)}}
    flat = cost
    cost = dataclasses.replace(cost, context_s_per_token=context_fit["context_s_per_token"],
                               attend_s_per_token_pair=context_fit["attend_s_per_token_pair"])
    progress(NAME, f"context terms: {context_fit['context_s_per_token'] * 1e6:.2f} us per cached token, "
             f"{context_fit['attend_s_per_token_pair'] * 1e9:.0f} ns per (new, cached) pair")
    progress(NAME, f"{len(requests)} requests; running the cluster")
    calibration, measured = real_run(requests)
    if calibration["ttft_p50_s"] is None or calibration["one_token"]["ttft_p50_s"] is None:
        raise SystemExit(f"calibration: no send of the tiny prompt found it cached: {calibration}")
    one_token = cost.prefill(1, len(CALIBRATION_PROMPT) - 1)
    path_s = max(calibration["ttft_p50_s"] - one_token, 0.0)
    one_token_path_s = max(calibration["one_token"]["ttft_p50_s"] - one_token, 0.0)
    calibration.update(model_one_token_forward_s=round(one_token, 4), request_path_s=round(path_s, 4),
                       one_token_request_path_s=round(one_token_path_s, 4))
    # the real cluster's 2 replicas compute on this one host's cores, `threads` torch threads each
    config = FleetConfig("cache_aware", 2, REPLICA_SLOTS, 1, STORE_SLOTS, cost, block_tokens=BLOCK_TOKENS,
                         replicas_per_host=2, host_cores=cores)
    simulated, simulated_each = simulate_each(requests, with_path(config, path_s))
    without_path, _ = simulate_each(requests, config)
    unshared, _ = simulate_each(requests, with_path(dataclasses.replace(config, host_cores=0), path_s))
    one_token_path, _ = simulate_each(requests, with_path(config, one_token_path_s))
    no_context, _ = simulate_each(requests, with_path(dataclasses.replace(config, cost=flat), path_s))
    progress(NAME, f"request path {path_s * 1e3:.1f} ms (cached tiny prompt TTFT p50 "
             f"{calibration['ttft_p50_s'] * 1e3:.1f} ms at {MAX_TOKENS} tokens - {one_token * 1e3:.1f} ms forward; "
             f"{one_token_path_s * 1e3:.1f} ms at 1 token); simulated hit ratio {simulated['hit_ratio']:.3f}, "
             f"TTFT p50 {simulated['ttft_s']['p50']:.3f} s ({without_path['ttft_s']['p50']:.3f} s without the path, "
             f"{unshared['ttft_s']['p50']:.3f} s with a host per replica)")
    prompt = sum(m["prompt_tokens"] for m in measured)
    hit = sum(m["local"] + m["store"] for m in measured) / prompt
    ttft_p50 = percentile([m["ttft_s"] for m in measured], 50)
    figures = ("hit_ratio", "ttft_s")
    result = {"requests": len(requests), "conversations": args.conversations, "span_s": SPAN_S,
              "host": {"cores": cores, "threads_per_replica": threads, "replicas_per_host": 2},
              "path_calibration": calibration, "context_calibration": context_fit, "simulated": simulated,
              "simulated_without_request_path": {k: without_path[k] for k in figures},
              "simulated_one_replica_per_host": {k: unshared[k] for k in figures},
              "simulated_with_one_token_path": {k: one_token_path[k] for k in figures},
              "simulated_without_context_terms": {k: no_context[k] for k in figures},
              "measured": {
                  "hit_ratio": round(hit, 4), "ttft_p50_s": round(ttft_p50, 4),
                  "ttft_s": {f"p{q}": round(percentile([m["ttft_s"] for m in measured], q), 4) for q in (50, 90, 99)},
                  "local_share": round(sum(m["local"] for m in measured) / prompt, 4),
                  "store_share": round(sum(m["store"] for m in measured) / prompt, 4),
                  "per_replica": dict(Counter(m["replica"] for m in measured)),
                  "per_request": sorted(measured, key=lambda m: m["index"])},
              "simulated_per_request": {i: {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                                        for i, row in sorted(simulated_each.items())},
              "error_analysis": error_analysis(measured, simulated_each),
              "ratios": {"hit_ratio_abs_difference": at_most(abs(hit - simulated["hit_ratio"]), 0.05, 3),
                         "ttft_p50_relative_difference": at_most(
                             abs(simulated["ttft_s"]["p50"] - ttft_p50) / ttft_p50, 0.3, 3)}}
    write_result(NAME, result)
    progress(NAME, f"measured hit ratio {hit:.3f} (local {result['measured']['local_share']:.3f}), TTFT p50 "
             f"{ttft_p50:.3f} s; {result['ratios']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
