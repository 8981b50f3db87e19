"""Redis index lookup latency: p50/p99 of one `RedisIndex.lookup` for 16, 64, 128 and 1024 chained
hashes, on one Redis, on a Sentinel group and on a Redis Cluster, side by side in one run.

Each deployment is private (kvcluster.cli.redis_server: a redis-server; a primary, replica and three
Sentinels; 3 masters with a replica each) and holds the entries of one live store for every hash, so
each lookup walks its whole prefix (the worst case: every block a hit). Lookups rotate over the
deployments and sizes, so load on the machine hits them alike. Interleaved, a PING on the same client
measures the bare round trip, the floor any lookup pays. On one Redis (or the primary behind
Sentinels) a lookup is one Lua script call: one round trip. On Redis Cluster it is two pipelines, each
one batch per shard (kvcluster.kv.index), so its cost over one Redis should stay a small constant factor
for any N: `cluster_over_single` records it per N. Target: p99 < 2 ms for 64 hashes on one Redis.

`lookup_latencies({name: redis_url}, sizes, repeats)` is the reusable part.
"""

import contextlib
import time

from bench.common import at_most, below, percentile, progress
from bench.context import BenchContext
from bench.plots import line_plot
from kvcluster.cli.redis_server import ClusterGroup, SentinelGroup, start_redis_server
from kvcluster.kv.blocks import make_fingerprint, prefix_hashes
from kvcluster.kv.index import RedisIndex

NAME = "index_latency"
HASH_COUNTS = (16, 64, 128, 1024)
P99_TARGET_MS = 2.0
TARGET_HASHES = 64
# Cluster lookups are two pipelined round trips (one batch per shard each) against one script call:
# a bounded factor, whatever N. Above it, something per hash went serial.
CLUSTER_FACTOR_TARGET = 4.0
REPEATS = {"full": 2000, "quick": 500, "tiny": 50}
STORE_ID, STORE_ADDRESS, STORE_TTL_S = "bench-store", "127.0.0.1:1", 600.0
MS = 1000.0
DEPLOYMENTS = {"single": start_redis_server, "sentinel": lambda: SentinelGroup().start(),
               "cluster": lambda: ClusterGroup().start()}


class _Prepared:
    """One deployment's index holding a live store's entries for every hash."""

    def __init__(self, redis_url: str, hashes: list[bytes]):
        self.index = RedisIndex(redis_url, namespace="bench")
        self.epoch = self.index.register(STORE_ID, STORE_ADDRESS, STORE_TTL_S)
        self.index.add_entries(STORE_ID, self.epoch, hashes)
        for _ in range(10):  # warm-up: scripts loaded, connections open, slot map read
            self.index.lookup(hashes)

    def close(self) -> None:
        self.index.deregister(STORE_ID, self.epoch)
        self.index.close()


def _sample(index: RedisIndex, hashes: list[bytes], hash_counts, samples: dict[str, list[float]]) -> None:
    for n in hash_counts:
        start = time.perf_counter()
        found = index.lookup(hashes[:n])
        samples[str(n)].append(time.perf_counter() - start)
        if len(found) != n:
            raise RuntimeError(f"lookup of {n} hashes found {len(found)}")
    start = time.perf_counter()
    index.redis.ping()
    samples["ping"].append(time.perf_counter() - start)


def _summary(samples: dict[str, list[float]]) -> dict:
    return {key: {"p50_ms": round(percentile(v, 50) * MS, 4), "p99_ms": round(percentile(v, 99) * MS, 4),
                  "max_ms": round(max(v) * MS, 4), "samples": len(v)} for key, v in samples.items()}


def _hashes(hash_counts) -> list[bytes]:
    return prefix_hashes(make_fingerprint(b"bench-index", "layout"), list(range(16 * max(hash_counts))), 16)


def lookup_latencies(redis_urls: dict[str, str], hash_counts=HASH_COUNTS, repeats: int = 1000) -> dict:
    """{deployment: {count: {"p50_ms", "p99_ms", ...}, "ping": {...}}}, the deployments' lookups interleaved."""
    hashes = _hashes(hash_counts)
    prepared: dict[str, _Prepared] = {}
    try:
        for name, url in redis_urls.items():
            prepared[name] = _Prepared(url, hashes[:max(hash_counts)])
        samples = {name: {str(n): [] for n in hash_counts} | {"ping": []} for name in prepared}
        for _ in range(repeats):
            for name, ready in prepared.items():
                _sample(ready.index, hashes, hash_counts, samples[name])
    finally:
        for ready in prepared.values():
            ready.close()
    return {name: _summary(by_count) for name, by_count in samples.items()}


def run(ctx: BenchContext) -> dict:
    repeats = ctx.pick(REPEATS)
    progress(NAME, f"{repeats} lookups of each of {HASH_COUNTS} hashes on {list(DEPLOYMENTS)}, PING interleaved")
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, start in DEPLOYMENTS.items():
            deployment = start()
            stack.callback(deployment.close)
            urls[name] = deployment.url
        modes = lookup_latencies(urls, HASH_COUNTS, repeats)
    for mode, latency in modes.items():
        for key, row in latency.items():
            progress(NAME, f"{mode:>8} {key:>5}: p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms")
    single, cluster = modes["single"], modes["cluster"]
    cluster_over_single = {str(n): {q: round(cluster[str(n)][f"{q}_ms"] / single[str(n)][f"{q}_ms"], 2)
                                    for q in ("p50", "p99")} for n in HASH_COUNTS}
    for n, row in cluster_over_single.items():
        progress(NAME, f"cluster / single, {n:>5} hashes: p50 x{row['p50']}  p99 x{row['p99']}")
    largest = str(max(HASH_COUNTS))
    payload = {"hash_counts": list(HASH_COUNTS), "repeats": repeats, "latency": single, "modes": modes,
               "cluster": "3 masters + 1 replica each (kvcluster.cli.redis_server.ClusterGroup)",
               "cluster_over_single": cluster_over_single,
               "lookup_64_p50_over_ping_p50": round(single["64"]["p50_ms"] / single["ping"]["p50_ms"], 2),
               "ratios": {"lookup_64_p99_ms": below(single[str(TARGET_HASHES)]["p99_ms"], P99_TARGET_MS),
                          f"cluster_over_single_p50_{largest}": at_most(cluster_over_single[largest]["p50"],
                                                                       CLUSTER_FACTOR_TARGET)}}
    ctx.write(NAME, payload)
    counts = list(HASH_COUNTS)
    series = {f"{mode} p{q}": (counts, [latency[str(n)][f"p{q}_ms"] for n in counts])
              for mode, latency in modes.items() for q in (50, 99)}
    series |= {f"PING single p{q}": (counts, [single["ping"][f"p{q}_ms"]] * len(counts)) for q in (50, 99)}
    line_plot(ctx.results_dir / f"{NAME}.png", f"Redis index lookup latency ({repeats} lookups per size)",
              "hashes per lookup", "latency (ms)", series, log_x=True)
    return payload
