"""The store's spill tiers (docs/spill.md): hit ratio with host + disk tiers vs the device pool alone,
and pull throughput from each tier vs from the device pool. In process, on StorePool itself.

Hit ratio. A device pool of P blocks; a working set of 4P blocks; the spill pool adds a host tier of
P blocks and a disk tier of 2P (together they hold the rest). Access pattern, skewed but cyclic:
rounds that each scan all 4P blocks in order, and after every scan step, with probability 1/2, one
extra access to a hot block drawn from a Zipf(1.1) law over the working set (block 0 hottest;
seeded). An access pins the block (a pull); a miss stores it (the consumer recomputes and pushes).
The first round fills the pools and is not counted. A scan of 4P through an LRU of P is LRU's worst
case, so the pool alone lives off the hot accesses; with the tiers every block stays held.
Target: hit ratio >= 0.9 with spill.

Throughput. SmolLM2 fp32 blocks (737,280 bytes); P device blocks, host P, disk 2P, filled with 4P
blocks so each tier holds known blocks. Per tier: pin + read + release P of its blocks, 8 at a time
(the store's READ_BATCH), timed; MB/s of block bytes returned. A pull from a lower tier pays the
promotion (read back, checksum, copy into a device slot) and the demotion of the device victim it
displaces. The disk figure is read through the page cache (the file was just written); the cold
figure drops the file's pages first (fsync + POSIX_FADV_DONTNEED). Ratios are each tier's MB/s over
the device pool's, measured side by side in the same rounds.
"""

import os
import statistics
import time

import numpy as np
import torch

from bench.common import at_least, progress
from bench.context import BenchContext, gpu_note
from bench.plots import bar_plot
from cache_store.pool import StorePool
from cache_store.spill import make_tiers
from kvcluster.kv.blocks import checksum, make_fingerprint, prefix_hashes
from kvcluster.kv.pool import KVLayout
from kvcluster.proto import common_pb2

NAME = "spill_tier"
HIT_RATIO_TARGET = 0.9
HOST_OVER_DEVICE_TARGET = 0.25  # a promotion adds a read-back, a checksum and a demotion to every block
DISK_OVER_DEVICE_TARGET = 0.2
ZIPF_S = 1.1
HIT_LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=1, head_dim=8)         # 512-byte blocks
PULL_LAYOUT = KVLayout(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64)     # SmolLM2 fp32
READ_BATCH = 8
# (P for the hit ratio, rounds counted), (P for throughput, rounds)
SIZES = {"full": ((64, 20), (32, 7)), "quick": ((32, 10), (16, 3)), "tiny": ((8, 3), (8, 1))}


def make_blocks(layout: KVLayout, count: int, seed: int) -> list[tuple[common_pb2.BlockRef, bytes]]:
    rng = np.random.default_rng(seed)
    fingerprint = make_fingerprint(b"bench-spill", layout.canonical())
    tokens = rng.integers(0, 49152, size=count * layout.block_size).tolist()
    blocks = []
    for block_hash in prefix_hashes(fingerprint, tokens, layout.block_size):
        payload = rng.bytes(layout.block_nbytes)
        blocks.append((common_pb2.BlockRef(block_hash=block_hash, num_tokens=layout.block_size,
                                           checksum=checksum(payload)), payload))
    return blocks


def fingerprint_of(layout: KVLayout) -> bytes:
    return make_fingerprint(b"bench-spill", layout.canonical())


def access_pattern(working_set: int, rounds: int, seed: int = 0) -> list[int]:
    """Block indices: `rounds` cyclic scans of the working set with Zipf-hot accesses mixed in."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, working_set + 1) ** ZIPF_S
    weights /= weights.sum()
    accesses = []
    for _ in range(rounds):
        for block in range(working_set):
            accesses.append(block)
            if rng.random() < 0.5:
                accesses.append(int(rng.choice(working_set, p=weights)))
    return accesses


def hit_ratio(pool: StorePool, blocks, accesses: list[int], warm_up: int) -> float:
    fingerprint, hits = fingerprint_of(pool.layout), 0
    for i, block in enumerate(accesses):
        header, payload = blocks[block]
        pinned, _ = pool.pin(fingerprint, [header.block_hash], owner="bench")
        pool.release("bench")
        if pinned:
            hits += i >= warm_up
        else:
            pool.store(header.block_hash, fingerprint, header, payload, 30.0)
    return hits / (len(accesses) - warm_up)


def measure_hit_ratios(pool_blocks: int, rounds: int, scratch) -> dict:
    working_set = 4 * pool_blocks
    blocks = make_blocks(HIT_LAYOUT, working_set, seed=1)
    warm_up = len(access_pattern(working_set, 1))
    accesses = access_pattern(working_set, rounds + 1)
    nbytes = HIT_LAYOUT.block_nbytes
    alone = hit_ratio(StorePool(HIT_LAYOUT, pool_blocks), blocks, accesses, warm_up)
    tiers = make_tiers(HIT_LAYOUT, pool_blocks * nbytes, 2 * pool_blocks * nbytes, str(scratch / "hit.blocks"))
    spill = StorePool(HIT_LAYOUT, pool_blocks, tiers=tiers)
    try:
        with_spill = hit_ratio(spill, blocks, accesses, warm_up)
        counters = spill.counters
        return {"pool_blocks": pool_blocks, "working_set_blocks": working_set, "accesses": len(accesses) - warm_up,
                "hit_ratio_pool_alone": round(alone, 4), "hit_ratio_with_spill": round(with_spill, 4),
                "spills": {f"{a}->{b}": n for (a, b), n in counters.spills.items()},
                "promotions": counters.promotions, "drops": counters.drops}
    finally:
        spill.close()


def pull_seconds(pool: StorePool, keys: list[bytes]) -> float:
    fingerprint = fingerprint_of(pool.layout)
    start = time.perf_counter()
    for i in range(0, len(keys), READ_BATCH):
        pinned, reason = pool.pin(fingerprint, keys[i:i + READ_BATCH], owner="bench")
        if reason:
            raise RuntimeError(f"bench pull stopped: {reason}")
        pool.read(pinned)
        pool.release("bench")
    return time.perf_counter() - start


def drop_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_throughput(pool_blocks: int, rounds: int, device: str, scratch) -> dict:
    """MB/s of pinned + read block bytes from each tier; device first in every round."""
    p, nbytes = pool_blocks, PULL_LAYOUT.block_nbytes
    blocks = make_blocks(PULL_LAYOUT, 4 * p, seed=2)
    keys = [header.block_hash for header, _ in blocks]
    # filled in order: disk holds blocks [0, 2P), host [2P, 3P), the device [3P, 4P)
    sources = {"device": keys[3 * p:], "host": keys[2 * p:3 * p], "disk": keys[:p], "disk_cold": keys[p:2 * p]}
    seconds: dict[str, list[float]] = {name: [] for name in sources}
    path = str(scratch / "pull.blocks")
    for _ in range(rounds):
        for name, tier_keys in sources.items():
            tiers = make_tiers(PULL_LAYOUT, p * nbytes, 2 * p * nbytes, path, pinned=device == "cuda")
            pool = StorePool(PULL_LAYOUT, p, device, tiers=tiers)
            try:
                for header, payload in blocks:
                    pool.store(header.block_hash, fingerprint_of(PULL_LAYOUT), header, payload, 30.0)
                if name == "disk_cold":
                    drop_page_cache(path)
                seconds[name].append(pull_seconds(pool, tier_keys))
            finally:
                pool.close()
    mb = p * nbytes / 1e6
    return {name: round(mb / statistics.median(values), 1) for name, values in seconds.items()}


def run(ctx: BenchContext) -> dict:
    (hit_p, hit_rounds), (pull_p, pull_rounds) = ctx.pick(SIZES)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    progress(NAME, f"hit ratio: pool of {hit_p} blocks, working set {4 * hit_p}, {hit_rounds} counted rounds")
    hits = measure_hit_ratios(hit_p, hit_rounds, ctx.scratch_dir)
    progress(NAME, f"hit ratio {hits['hit_ratio_pool_alone']:.3f} pool alone, {hits['hit_ratio_with_spill']:.3f} "
             "with host + disk tiers")
    progress(NAME, f"pull throughput per tier: {pull_p} SmolLM2 blocks per tier, {pull_rounds} rounds on {device}")
    mb_s = measure_throughput(pull_p, pull_rounds, device, ctx.scratch_dir)
    progress(NAME, ", ".join(f"{name} {value:.0f} MB/s" for name, value in mb_s.items()))
    payload = {
        "pattern": f"rounds of a cyclic scan over 4P blocks; after each step, with probability 1/2, one more "
                   f"access to a Zipf({ZIPF_S}) hot block; first round (fill) not counted",
        "hit": hits, "device": device,
        "pull": {"layout": PULL_LAYOUT.canonical(), "blocks_per_tier": pull_p, "rounds": pull_rounds,
                 "batch": READ_BATCH, "mb_s": mb_s,
                 "note": "disk = through the page cache; disk_cold = after fsync + POSIX_FADV_DONTNEED"},
        "ratios": {
            "hit_ratio_with_spill": at_least(hits["hit_ratio_with_spill"], HIT_RATIO_TARGET, digits=3),
            "pull_host_over_device": at_least(mb_s["host"] / mb_s["device"], HOST_OVER_DEVICE_TARGET, digits=3),
            "pull_disk_over_device": at_least(mb_s["disk"] / mb_s["device"], DISK_OVER_DEVICE_TARGET, digits=3),
        },
        "gpu": gpu_note(),
    }
    payload["pull"]["disk_cold_over_device"] = round(mb_s["disk_cold"] / mb_s["device"], 3)
    ctx.write(NAME, payload)
    bar_plot(ctx.results_dir / f"{NAME}.png", f"Pull of {pull_p} SmolLM2 blocks from each tier "
             f"(hit ratio {hits['hit_ratio_pool_alone']:.2f} alone, {hits['hit_ratio_with_spill']:.2f} with spill)",
             "MB/s", ["pinned + read"], {name: [value] for name, value in mb_s.items()})
    return payload
