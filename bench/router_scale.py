"""The gateway's per-request routing work at fleet scale: 256 replicas x 10k registered blocks each.

A routing decision = the overlaps of the prompt's block hashes with every replica (`held_prefix`)
plus `Router.pick` over the replicas (the gateway's own objects, `gateway.replicas.Replica`). Two
sources of overlaps are timed on the same prompt:
- `PrefixIndex` (in process, fed by KV events): every replica's 10k blocks are registered, so the
  dict and its memory are those of the full fleet;
- `RedisIndex.held_prefix` (what the gateway does today: one Lua round trip per request) on a real
  redis-server, with only the entries the prompt's blocks have (the script walks only those keys;
  the other 2.5M entries would cost Redis memory, not lookup time).
The prompt's hashing (`prefix_hashes`, per request whatever the fleet size) is timed on its own.

Fleet shape: every replica holds the same 64-block system prompt, then 39 conversations of 255
blocks (16-token blocks) of its own; the probe prompt is the system prompt plus one of replica 0's
conversations: all 256 replicas stay in the walk for 64 blocks, one for the whole 319.
"""

import gc
import os
import random
import time

from gateway.replicas import Replica
from gateway.router import Router
from kvcluster.kv.blocks import prefix_hashes
from kvcluster.kv.index import RedisIndex, StoreRef, worker_namespace
from kvcluster.kv.pool import KVLayout
from kvcluster.kv.prefix_index import PrefixIndex

SYSTEM_BLOCKS = 64
CONVERSATION_BLOCKS = 255
BLOCK_TOKENS = 16
LAYOUT = KVLayout(30, BLOCK_TOKENS, 3, 64, "float32").canonical()  # SmolLM2's
REGISTERED = {"block_size": str(BLOCK_TOKENS)}  # as a worker registers it: the router reads it


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def percentiles_us(samples: list[float], prefix: str = "") -> dict:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]  # noqa: E731
    return {f"{prefix}p50_us": round(pick(50) * 1e6, 1), f"{prefix}p99_us": round(pick(99) * 1e6, 1),
            f"{prefix}max_us": round(ordered[-1] * 1e6, 1)}


def timed(run, rounds: int) -> dict:
    """Wall-clock and this thread's CPU time per call: on a shared machine the wall p99 is mostly
    other processes' time slices, the CPU time is the work itself."""
    wall, cpu = [], []
    for turn in range(rounds):
        start, start_cpu = time.perf_counter(), time.thread_time()
        run(turn)
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    return {**percentiles_us(wall), **percentiles_us(cpu, "cpu_")}


def fleet_blocks(replicas: int, blocks_per_replica: int, rng: random.Random) -> tuple[list[bytes], list[list[bytes]]]:
    system = [rng.randbytes(16) for _ in range(SYSTEM_BLOCKS)]
    own = [[rng.randbytes(16) for _ in range(blocks_per_replica - SYSTEM_BLOCKS)] for _ in range(replicas)]
    return system, own


def time_decisions(overlaps_of, replicas: list[Replica], router: Router, prompt: list[bytes], rounds: int) -> dict:
    members = [r.member for r in replicas]
    routes = []

    def decide(turn: int) -> None:
        replicas[turn % len(replicas)].open_calls = turn % 3  # loads change between decisions
        routes.append(router.pick(replicas, overlaps_of(prompt, members)))

    return {**timed(decide, rounds), "overlap_of_chosen": routes[-1].overlap_blocks, "decisions": rounds}


def measure(replicas: int = 256, blocks_per_replica: int = 10_000, rounds: int = 2000,
            redis_url: str | None = None, seed: int = 0) -> dict:
    rng = random.Random(seed)
    system, own = fleet_blocks(replicas, blocks_per_replica, rng)
    views = [Replica(StoreRef(f"decode-{i}", f"10.0.{i // 250}.{i % 250}:50051", 1, LAYOUT), None, None,
                     published=REGISTERED) for i in range(replicas)]
    prompt = system + own[0][:CONVERSATION_BLOCKS]
    router = Router("cache_aware", overlap_weight=1.0)

    gc.collect()
    before = rss_bytes()
    index = PrefixIndex()
    for view, blocks in zip(views, own):
        sink = index.sink(view.replica_id)
        sink.blocks_added(system)
        sink.blocks_added(blocks)
    gc.collect()
    result = {"replicas": replicas, "blocks_per_replica": blocks_per_replica, "prompt_blocks": len(prompt),
              "distinct_blocks": index.num_blocks, "prefix_index_rss_bytes": rss_bytes() - before}
    result["prefix_index"] = time_decisions(index.held_prefix, views, router, prompt, rounds)
    result["router_pick_only"] = time_decisions(lambda p, m: [0] * len(m), views, router, prompt, rounds)
    tokens = list(range(len(prompt) * BLOCK_TOKENS))
    result["prompt_hashing"] = {"tokens": len(tokens), **timed(lambda _: prefix_hashes(bytes(16), tokens, BLOCK_TOKENS), 200)}
    if redis_url:
        result["redis_held_prefix"] = redis_decisions(redis_url, views, router, system, own[0], prompt, rounds // 20)
    return result


def redis_decisions(redis_url: str, views: list[Replica], router: Router, system: list[bytes], first_own: list[bytes],
                    prompt: list[bytes], rounds: int) -> dict:
    """The same decisions with RedisIndex.held_prefix: every replica registered, holding the system
    prompt; replica 0 also its conversation."""
    index = RedisIndex(redis_url, worker_namespace("fleet", "decode"), kv_events=True)
    members = []
    for view in views:
        epoch = index.register(view.replica_id, view.member.address, ttl_s=600)
        index.add_entries(view.replica_id, epoch, system)
        members.append(StoreRef(view.replica_id, view.member.address, epoch, LAYOUT))
    index.add_entries(members[0].store_id, members[0].epoch, first_own[:CONVERSATION_BLOCKS])
    registered = [Replica(m, None, None, published=REGISTERED) for m in members]
    timing = time_decisions(index.held_prefix, registered, router, prompt, rounds)
    index.close()
    return timing
