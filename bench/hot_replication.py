"""Hot-block replication under a store crash: the hot prefix's store hit ratio after one of two
stores is SIGKILLed, with replication (the default, `--replicate-after-pulls 3`) and without (0).

Both modes run side by side in one suite run, each on its own private redis-server and two
`python -m cache_store` processes (SmolLM2's KV layout, float32 blocks of 737,280 bytes). A hot
prefix of `prefix_blocks` blocks is pushed with the workers' push client (rendezvous hashing spreads
it over the two stores), then `warm_requests` requests each make one index lookup and pull what it
names (KVCacheClient, as prefill and decode do); once the copies are made, `steady_requests` more.
One store is killed with SIGKILL and
`after_requests` more requests follow at once, the first ones inside the dead store's heartbeat
window. Recorded per mode: hit ratio (prefix blocks delivered / prefix blocks) before and after the
kill, request p50 of the steady requests (what counting pulls and two holders cost a pull) and after
the kill, and the
stores' replication counters from their /metrics. Nothing is recomputed or pushed again here: the
figure is what the store tier still serves at the moment it loses a store (a worker would compute
the rest, exactly, and push it again).
Targets: hit ratio after the kill >= 0.99 with replication; steady request p50, with replication
over without, <= 1.25. The modes run in alternating order over `rounds` rounds (the first cluster of
a run pays for warm-up), figures averaged over them.
"""

import io
import logging
import random
import re
import signal
import time
import urllib.request
from dataclasses import dataclass

from bench.common import at_least, at_most, percentile, progress
from bench.context import BenchContext
from bench.plots import bar_plot
from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.cli.polling import wait_until
from kvcluster.cli.redis_server import start_redis_server
from kvcluster.kv.blocks import make_fingerprint, prefix_hashes
from kvcluster.kv.index import RedisIndex
from kvcluster.kv.pool import KVLayout
from kvcluster.rpc.cache_client import KVCacheClient
from kvcluster.rpc.security import SecuritySettings

NAME = "hot_replication"
LAYOUT = KVLayout(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64)  # SmolLM2-135M, float32
FINGERPRINT = make_fingerprint(b"bench-hot-replication", LAYOUT.canonical())
STORES = ("cache_store", "cache_store-1")
HEARTBEAT_S = 0.5
THRESHOLD = 3
HIT_TARGET = 0.99
LATENCY_TARGET = 1.25
MODES = {"replication": THRESHOLD, "off": 0}
ROUNDS = {"full": 2, "quick": 2, "tiny": 1}
MS = 1000.0


@dataclass(frozen=True)
class Sizes:
    prefix_blocks: int
    warm_requests: int     # they make the prefix hot (its copies are made meanwhile)
    steady_requests: int   # once the copies are made (or at once, without replication): the p50 compared
    after_requests: int


SIZES = {"full": Sizes(32, 6, 30, 40), "quick": Sizes(16, 4, 15, 20), "tiny": Sizes(4, 3, 4, 4)}


def start_stores(redis_url: str, replicate_after: int, capacity_blocks: int, log) -> Cluster:
    stores = Cluster(ClusterPorts.any_free(), log_stream=log, start_timeout_s=120)
    stores.redis_url = redis_url
    args = ["--host", "127.0.0.1", "--port", 0, "--metrics-port", 0, "--redis-url", redis_url, "--dtype", "float32",
            "--capacity-bytes", capacity_blocks * LAYOUT.block_nbytes, "--heartbeat-seconds", HEARTBEAT_S,
            "--replicate-after-pulls", replicate_after]
    try:
        for name in STORES:
            stores.spawn(name, [*args, "--store-id", name])
    except BaseException:
        stores.stop()
        raise
    return stores


def replication_counters(stores: Cluster) -> dict[str, float]:
    """kvcluster_store_replication_*_blocks_total summed over the live stores' /metrics."""
    totals: dict[str, float] = {}
    for child in stores.children.values():
        if child.process.poll() is not None:
            continue
        with urllib.request.urlopen(f"http://127.0.0.1:{child.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        for kind, value in re.findall(r"^kvcluster_store_replication_(\w+)_blocks_total (\S+)$", text, re.MULTILINE):
            totals[kind] = totals.get(kind, 0.0) + float(value)
    return totals


def hot_prefix(rng: random.Random, count: int) -> tuple[list[bytes], list[list[int]], list[bytes]]:
    tokens = [rng.randrange(200, 40_000) for _ in range(count * LAYOUT.block_size)]
    token_blocks = [tokens[i:i + LAYOUT.block_size] for i in range(0, len(tokens), LAYOUT.block_size)]
    return prefix_hashes(FINGERPRINT, tokens, LAYOUT.block_size), token_blocks, [rng.randbytes(LAYOUT.block_nbytes)
                                                                                  for _ in range(count)]


def request(cache: KVCacheClient, hashes: list[bytes], token_blocks: list[list[int]]) -> tuple[float, float]:
    """One consumer's lookup and pull of the prefix: (hit ratio, seconds)."""
    start = time.perf_counter()
    holders, _, _ = cache.lookup(hashes)
    fetched = cache.pull_held(hashes[:len(holders)], token_blocks[:len(holders)], holders) if holders else None
    delivered = len(fetched.payloads) if fetched else 0
    return delivered / len(hashes), time.perf_counter() - start


def run_mode(mode: str, sizes: Sizes, rng: random.Random, log) -> dict:
    with start_redis_server() as redis:
        stores = start_stores(redis.url, MODES[mode], 4 * sizes.prefix_blocks, log)
        index = RedisIndex(redis.url)
        cache = KVCacheClient(index, LAYOUT, FINGERPRINT, timeout_s=10.0,
                              security=SecuritySettings(internal_token=stores.internal_token))
        try:
            hashes, token_blocks, payloads = hot_prefix(rng, sizes.prefix_blocks)
            pushed = cache.push(list(zip(hashes, token_blocks, payloads)))
            if pushed.fallback:
                raise RuntimeError(f"pushing the hot prefix failed: {pushed.fallback}")
            wait_for(lambda: len(index.lookup(hashes)) == len(hashes), "the hot prefix indexed")
            warm = [request(cache, hashes, token_blocks) for _ in range(sizes.warm_requests)]
            settle_start = time.perf_counter()
            if MODES[mode]:
                wait_for(lambda: all(len(held) == 2 for held in index.live_holders(hashes)), "every block copied")
            settle_s = time.perf_counter() - settle_start
            before = [request(cache, hashes, token_blocks) for _ in range(sizes.steady_requests)]
            counters = replication_counters(stores)
            stores.kill(STORES[1], signal.SIGKILL)
            after = [request(cache, hashes, token_blocks) for _ in range(sizes.after_requests)]
        finally:
            cache.close()
            index.close()
            stores.stop()
    return {"hit_ratio_warm": mean(r for r, _ in warm), "hit_ratio_before": mean(r for r, _ in before),
            "hit_ratio_after_kill": mean(r for r, _ in after),
            "hit_ratio_after_kill_min": round(min(r for r, _ in after), 3),
            "request_p50_ms_before": round(percentile([s for _, s in before], 50) * MS, 2),
            "request_p50_ms_after_kill": round(percentile([s for _, s in after], 50) * MS, 2),
            "copies_settled_s": round(settle_s, 3), "replication_blocks": counters}


def averaged(rows: list[dict]) -> dict:
    """Per field, the mean over rounds (min of the minimum; the counters summed)."""
    out = {}
    for key, value in rows[0].items():
        if key == "replication_blocks":
            out[key] = {kind: sum(row[key].get(kind, 0.0) for row in rows) for kind in value}
        elif key.endswith("_min"):
            out[key] = min(row[key] for row in rows)
        else:
            out[key] = round(sum(row[key] for row in rows) / len(rows), 3)
    return out


def mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 3)


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    if not wait_until(condition, timeout_s):
        raise RuntimeError(f"timed out waiting for {what}")


def run(ctx: BenchContext) -> dict:
    sizes, rounds = ctx.pick(SIZES), ctx.pick(ROUNDS)
    rng = random.Random()
    log = open(ctx.scratch_dir / f"{NAME}.log", "a") if ctx.mode != "tiny" else io.StringIO()
    rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
    client_log = logging.getLogger("kvcluster.rpc.cache_client")
    level = client_log.level
    client_log.setLevel(logging.ERROR)  # pulls from the killed store fail by design: no warning per pull
    try:
        for rnd in range(rounds):
            for mode in (list(MODES) if rnd % 2 else list(MODES)[::-1]):
                row = run_mode(mode, sizes, rng, log)
                rows[mode].append(row)
                progress(NAME, f"round {rnd + 1}/{rounds} {mode:<11}: hit ratio {row['hit_ratio_before']:.2f} "
                         f"before, {row['hit_ratio_after_kill']:.2f} after the kill "
                         f"(min {row['hit_ratio_after_kill_min']:.2f}); "
                         f"request p50 {row['request_p50_ms_before']:.1f} ms steady, "
                         f"{row['request_p50_ms_after_kill']:.1f} ms after; copies {row['replication_blocks']}")
    finally:
        client_log.setLevel(level)
        log.close()
    result = {mode: averaged(rows[mode]) for mode in MODES}
    on, off = result["replication"], result["off"]
    payload = {
        "prefix_blocks": sizes.prefix_blocks, "warm_requests": sizes.warm_requests, "rounds": rounds,
        "steady_requests": sizes.steady_requests, "after_requests": sizes.after_requests, "threshold": THRESHOLD,
        "heartbeat_s": HEARTBEAT_S,
        "block_bytes": LAYOUT.block_nbytes, "result": result,
        "ratios": {
            "hit_ratio_after_kill_with_replication": at_least(on["hit_ratio_after_kill"], HIT_TARGET, digits=3),
            "request_p50_steady_replication_over_off": at_most(
                on["request_p50_ms_before"] / off["request_p50_ms_before"], LATENCY_TARGET),
        },
        "hit_ratio_after_kill_without_replication": off["hit_ratio_after_kill"],
    }
    ctx.write(NAME, payload)
    bar_plot(ctx.results_dir / f"{NAME}.png",
             f"hot prefix of {sizes.prefix_blocks} blocks, 2 stores, one SIGKILLed", "hit ratio",
             ["before the kill", "after the kill (mean)", "after the kill (min)"],
             {f"replicate-after-pulls {MODES[mode]}": [result[mode]["hit_ratio_before"],
                                                       result[mode]["hit_ratio_after_kill"],
                                                       result[mode]["hit_ratio_after_kill_min"]] for mode in MODES})
    return payload
