"""Redis index lookup latency: p50/p99 of one `RedisIndex.lookup` for 16, 64 and 256 chained hashes.

A private redis-server holds the entries of one live store for every hash, so each lookup walks
its whole prefix (the worst case: every block a hit). Interleaved with the lookups, a PING on the
same connection measures the bare round trip, the floor any lookup pays. Target: p99 < 2 ms for
64 hashes.

`lookup_latency(redis_url, sizes, repeats)` is the reusable part (bench/transfer.py may call it).
"""

import time

from bench.common import below, percentile, progress
from bench.context import BenchContext
from bench.plots import line_plot
from kvcluster.blocks import make_fingerprint, prefix_hashes
from kvcluster.index import RedisIndex
from kvcluster.redis_server import start_redis_server

NAME = "index_latency"
HASH_COUNTS = (16, 64, 256)
P99_TARGET_MS = 2.0
TARGET_HASHES = 64
REPEATS = {"full": 2000, "quick": 500, "tiny": 50}
STORE_ID, STORE_ADDRESS, STORE_TTL_S = "bench-store", "127.0.0.1:1", 600.0
MS = 1000.0


def lookup_latency(redis_url: str, hash_counts=HASH_COUNTS, repeats: int = 1000) -> dict:
    """{count: {"p50_ms", "p99_ms", ...}} for lookups, and the same for PING under "ping"."""
    index = RedisIndex(redis_url, namespace="bench")
    try:
        epoch = index.register(STORE_ID, STORE_ADDRESS, STORE_TTL_S)
        hashes = prefix_hashes(make_fingerprint(b"bench-index", "layout"), list(range(16 * max(hash_counts))), 16)
        index.add_entries(STORE_ID, epoch, hashes)
        samples: dict[str, list[float]] = {str(n): [] for n in hash_counts} | {"ping": []}
        for _ in range(10):  # warm-up: scripts loaded, connection open
            index.lookup(hashes[:max(hash_counts)])
        for _ in range(repeats):
            for n in hash_counts:
                start = time.perf_counter()
                found = index.lookup(hashes[:n])
                samples[str(n)].append(time.perf_counter() - start)
                if len(found) != n:
                    raise RuntimeError(f"lookup of {n} hashes found {len(found)}")
            start = time.perf_counter()
            index.redis.ping()
            samples["ping"].append(time.perf_counter() - start)
        index.deregister(STORE_ID, epoch)
    finally:
        index.close()
    return {key: {"p50_ms": round(percentile(v, 50) * MS, 4), "p99_ms": round(percentile(v, 99) * MS, 4),
                  "max_ms": round(max(v) * MS, 4), "samples": len(v)} for key, v in samples.items()}


def run(ctx: BenchContext) -> dict:
    repeats = ctx.pick(REPEATS)
    progress(NAME, f"{repeats} lookups of each of {HASH_COUNTS} hashes, PING interleaved")
    with start_redis_server() as server:
        latency = lookup_latency(server.url, HASH_COUNTS, repeats)
    for key, row in latency.items():
        progress(NAME, f"{key:>5}: p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms")
    payload = {"hash_counts": list(HASH_COUNTS), "repeats": repeats, "latency": latency,
               "lookup_64_p50_over_ping_p50": round(latency["64"]["p50_ms"] / latency["ping"]["p50_ms"], 2),
               "ratios": {"lookup_64_p99_ms": below(latency[str(TARGET_HASHES)]["p99_ms"], P99_TARGET_MS)}}
    ctx.write(NAME, payload)
    counts = list(HASH_COUNTS)
    series = {f"lookup {q}": (counts, [latency[str(n)][f"{q}_ms"] for n in counts]) for q in ("p50", "p99")}
    series |= {f"PING {q}": (counts, [latency["ping"][f"{q}_ms"]] * len(counts)) for q in ("p50", "p99")}
    line_plot(ctx.results_dir / f"{NAME}.png", f"Redis index lookup latency ({repeats} lookups per size)",
              "hashes per lookup", "latency (ms)", series, log_x=True)
    return payload
