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

Both sides run on one host: the simulator's 2 replicas share `os.sched_getaffinity` cores with
`torch.get_num_threads()` threads each (`FleetConfig.replicas_per_host`, `host_cores`: processor
sharing), as the real replicas do. The result also keeps the simulation without that sharing and
with the 1-token path, and an error analysis (simulated and measured TTFT of each request, matched
by its index in the slice, by computed tokens and by whether the other replica was busy).
"""

import argparse
import dataclasses
import os
import random
import statistics
import threading
import time
from collections import Counter

import openai
import torch

from bench.common import RESULTS_DIR, at_most, percentile, progress, write_result
from bench.fleet import cpu_profile
from bench.fleet_sim import TRACES_DIR, FleetConfig, FleetSim, TraceRequest, load_trace
from kvcluster.cli.launcher import Cluster, ClusterPorts

NAME = "fleet_check"
BLOCK_TOKENS = 16
WINDOW_S = 900.0
SPAN_S = 120.0
MAX_TOKENS = 4
REPLICA_SLOTS = (512 << 20) // 737_280
STORE_SLOTS = (1 << 30) // 737_280
CALIBRATION_PROMPT = list(range(1000, 1000 + 2 * BLOCK_TOKENS + 1))  # 2 full blocks and 1 token
CALIBRATION_SENDS = 8


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
    progress(NAME, f"{len(requests)} requests; running the cluster")
    calibration, measured = real_run(requests)
    if calibration["ttft_p50_s"] is None or calibration["one_token"]["ttft_p50_s"] is None:
        raise SystemExit(f"calibration: no send of the tiny prompt found it cached: {calibration}")
    one_token = cost.prefill(1)
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
              "path_calibration": calibration, "simulated": simulated,
              "simulated_without_request_path": {k: without_path[k] for k in figures},
              "simulated_one_replica_per_host": {k: unshared[k] for k in figures},
              "simulated_with_one_token_path": {k: one_token_path[k] for k in figures},
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
