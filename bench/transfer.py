"""Cache store transfer speed (issue 4): pull throughput vs raw TCP, Redis lookup latency, store RSS.

- Pull: 64 SmolLM2 fp32 blocks (64 x 737,280 bytes, ~47 MB) pulled from a real store process on
  loopback into a preallocated buffer, checksums verified by the client, against a plain TCP
  sender process moving the same bytes into the same buffer. Both store paths are measured: the
  default (bulk: raw bytes over TCP, headers over gRPC) and the gRPC stream (a client with bulk
  off). Target: store >= 0.6 x raw TCP. A bare gRPC process streaming the same bytes as
  PullBlocks messages (no store logic) is measured too, to show which part of the stream's gap is
  gRPC Python's own cost. All four are measured in interleaved rounds; medians.
- Lookup: RedisIndex.lookup of 64 chained hashes (one Lua round trip), p50 and p99. Target p99 < 2 ms.
- RSS: the store process after 1,000 push/pull cycles of 4 fresh blocks each (the LRU churns).
  The pool is preallocated and zero-filled at start, so start-up RSS already includes it.
  Target: final RSS within 5% of start-up RSS (pool + everything else).

Run: `python -m bench.transfer [--rounds 10] [--cycles 1000] [--device cpu|cuda]`; writes
bench/results/transfer.json.
"""

import argparse
import socket
import statistics
import subprocess
import sys
import time
from concurrent import futures

import grpc
import numpy as np
import psutil
import torch

from bench.common import write_result
from cache_store.config import StoreConfig
from kvcluster.cli.polling import wait_until
from kvcluster.cli.redis_server import HOST, RedisServer
from kvcluster.kv.blocks import ROOT_HASH, hash_block, make_fingerprint
from kvcluster.kv.index import RedisIndex
from kvcluster.kv.wire import block_chunks
from kvcluster.proto import cache_pb2, cache_pb2_grpc
from kvcluster.rpc.plumbing import channel_options
from kvcluster.rpc.store_client import Block, StoreClient, make_ref

LAYOUT = StoreConfig(dtype="float32").layout(torch.device("cpu"))  # SmolLM2-135M, fp32: 737,280-byte blocks
NUM_BLOCKS = 64
POOL_BLOCKS = 128
BLOCK_TOKENS = list(range(LAYOUT.block_size))
FINGERPRINT = make_fingerprint(b"bench-transfer", LAYOUT.canonical())


def make_blocks(count: int, seed: int, payloads: list[bytes] | None = None) -> list[Block]:
    """`count` chained blocks; payloads random unless given (reused payloads keep cycles cheap)."""
    rng = np.random.default_rng(seed)
    parent, blocks = ROOT_HASH, []
    for i in range(count):
        parent = hash_block(FINGERPRINT, parent, rng.integers(0, 49152, LAYOUT.block_size).tolist())
        payload = payloads[i % len(payloads)] if payloads else rng.bytes(LAYOUT.block_nbytes)
        blocks.append((make_ref(payload, BLOCK_TOKENS, block_hash=parent), payload))
    return blocks


# ---- helper processes: a raw TCP sender and a bare gRPC streamer -------------------------

def serve_tcp(total_bytes: int) -> None:
    payload = np.random.default_rng(1).bytes(total_bytes)
    with socket.create_server((HOST, 0)) as server:
        print(server.getsockname()[1], flush=True)
        while True:
            connection, _ = server.accept()
            with connection:
                connection.sendall(payload)


class BareStreamer(cache_pb2_grpc.CacheStoreServicer):
    """Streams NUM_BLOCKS prebuilt blocks as PullBlocks does, with no pool, pins or checksums."""

    def __init__(self):
        self.blocks = make_blocks(NUM_BLOCKS, seed=2)

    def PullBlocks(self, request, context):
        for header, payload in self.blocks:
            yield from block_chunks(header, payload, envelope=cache_pb2.PullBlocksResponse)
        yield cache_pb2.PullBlocksResponse(summary=cache_pb2.PullSummary(num_blocks_sent=NUM_BLOCKS))


def serve_bare_grpc() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(4), options=channel_options())
    cache_pb2_grpc.add_CacheStoreServicer_to_server(BareStreamer(), server)
    print(server.add_insecure_port(f"{HOST}:0"), flush=True)
    server.start()
    server.wait_for_termination()


def spawn(args: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a helper process and return it with the first line it prints."""
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def start_store(redis_url: str, device: str) -> tuple[subprocess.Popen, int]:
    process, line = spawn(["-m", "cache_store", "--port", "0", "--metrics-port", "-1", "--redis-url", redis_url,
                           "--device", device, "--capacity-bytes", str(POOL_BLOCKS * LAYOUT.block_nbytes),
                           "--store-id", "bench-store", "--heartbeat-seconds", "1", "--dtype", LAYOUT.dtype])
    if not line.startswith("READY"):
        raise RuntimeError(f"cache store did not start: {line!r}")
    return process, int(line.split()[1].split("=")[1])


# ---- measurements --------------------------------------------------------------------------

def timed_mb_s(total_bytes: int, run) -> float:
    start = time.perf_counter()
    run()
    return total_bytes / (time.perf_counter() - start) / 1e6


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time of a process, all its threads."""
    times = process.cpu_times()
    return times.user + times.system


def tcp_receive(port: int, buffer: memoryview) -> None:
    with socket.create_connection((HOST, port)) as connection:
        received = 0
        while received < len(buffer):
            received += connection.recv_into(buffer[received:])


def bare_grpc_receive(stub: cache_pb2_grpc.CacheStoreStub, destination: memoryview) -> None:
    """The same bytes, copied out the same way, without reassembly, checksums or the store."""
    offset = 0
    for response in stub.PullBlocks(cache_pb2.PullBlocksRequest()):
        data = response.chunk.data
        destination[offset:offset + len(data)] = data
        offset += len(data)


def store_pull(client: StoreClient, hashes: list[bytes], destination: memoryview) -> None:
    """Pull into a preallocated buffer, block by block, as a worker fills its KV pool (and as the
    raw TCP receiver fills its buffer): the bulk path receives straight into it, the gRPC stream's
    blocks are copied into it."""
    summary, size = cache_pb2.PullSummary(), LAYOUT.block_nbytes
    for _ in client.iter_blocks(FINGERPRINT, hashes, summary, into=lambda i: destination[i * size:(i + 1) * size]):
        pass
    if summary.num_blocks_sent != len(hashes):
        raise RuntimeError(f"pull stopped early: {summary.stop_reason}")


def measure_pulls(client: StoreClient, hashes: list[bytes], rounds: int, store_pid: int) -> dict:
    """Raw TCP, a bare gRPC streamer, and the store's two pull paths (bulk: the default; gRPC
    stream: a client with bulk off), interleaved rounds, medians. store_pull is the default path.
    Beside MB/s, the CPU time both ends spent per pull (summed over the rounds, so the 10 ms tick
    of the counters averages out): on a busy machine wall time says as much about the neighbours
    as about the path, CPU time much less."""
    total = NUM_BLOCKS * LAYOUT.block_nbytes
    tcp_process, tcp_port = spawn(["-m", "bench.transfer", "--serve-tcp", str(total)])
    grpc_process, grpc_port = spawn(["-m", "bench.transfer", "--serve-bare-grpc"])
    channel = grpc.insecure_channel(f"{HOST}:{grpc_port}", options=channel_options())
    stream_client = StoreClient(client.target, LAYOUT, client.timeout_s, bulk=False)
    buffer = memoryview(bytearray(total))
    runs = {"raw_tcp": lambda: tcp_receive(int(tcp_port), buffer),
            "bare_grpc": lambda: bare_grpc_receive(cache_pb2_grpc.CacheStoreStub(channel), buffer),
            "store_pull": lambda: store_pull(client, hashes, buffer),
            "store_grpc_stream": lambda: store_pull(stream_client, hashes, buffer)}
    senders = {"raw_tcp": psutil.Process(tcp_process.pid), "bare_grpc": psutil.Process(grpc_process.pid),
               "store_pull": psutil.Process(store_pid), "store_grpc_stream": psutil.Process(store_pid)}
    receiver = psutil.Process()
    try:
        for run in runs.values():  # warm-up: connections, HTTP/2 windows, allocator
            for _ in range(3):
                run()
        samples = {name: [] for name in runs}
        cpu_s = {name: 0.0 for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                before = cpu_seconds(receiver) + cpu_seconds(senders[name])
                samples[name].append(timed_mb_s(total, run))
                cpu_s[name] += cpu_seconds(receiver) + cpu_seconds(senders[name]) - before
    finally:
        channel.close()
        stream_client.close()
        tcp_process.kill()
        grpc_process.kill()
    result = {f"{name}_mb_s": round(statistics.median(values), 1) for name, values in samples.items()}
    result.update({f"{name}_mb_s_samples": [round(v) for v in values] for name, values in samples.items()})
    result["bytes"] = total
    result["store_vs_raw_tcp"] = round(result["store_pull_mb_s"] / result["raw_tcp_mb_s"], 3)
    result["bare_grpc_vs_raw_tcp"] = round(result["bare_grpc_mb_s"] / result["raw_tcp_mb_s"], 3)
    result["store_vs_bare_grpc"] = round(result["store_pull_mb_s"] / result["bare_grpc_mb_s"], 3)
    result["store_grpc_stream_vs_raw_tcp"] = round(result["store_grpc_stream_mb_s"] / result["raw_tcp_mb_s"], 3)
    result.update({f"{name}_cpu_ms_per_pull": round(seconds / rounds * 1e3, 1) for name, seconds in cpu_s.items()})
    result["raw_tcp_cpu_over_store_cpu"] = round(cpu_s["raw_tcp"] / max(cpu_s["store_pull"], 1e-9), 3)
    result["raw_tcp_cpu_over_store_grpc_stream_cpu"] = round(cpu_s["raw_tcp"] / max(cpu_s["store_grpc_stream"], 1e-9), 3)
    result["store_pull_path"] = "bulk" if offers_bulk(client, hashes) else "grpc_stream"
    return result


def offers_bulk(client: StoreClient, hashes: list[bytes]) -> bool:
    """Whether the default pull took the bulk path (the store offered it to this client)."""
    stream = client.pull_stream(FINGERPRINT, hashes[:1], bulk=client.bulk)
    try:
        return next(stream).WhichOneof("item") == "bulk"
    finally:
        stream.cancel()


def measure_lookups(redis_url: str, hashes: list[bytes], count: int) -> dict:
    index = RedisIndex(redis_url)
    try:
        # the store publishes from a background thread
        if not wait_until(lambda: len(index.lookup(hashes)) == len(hashes), 10, interval_s=0.1):
            raise RuntimeError("the index does not hold the pushed blocks")
        for _ in range(50):
            index.lookup(hashes)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            index.lookup(hashes)
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        index.close()
    times.sort()
    return {"hashes": len(hashes), "lookups": count, "p50_ms": round(times[len(times) // 2], 3),
            "p99_ms": round(times[int(len(times) * 0.99)], 3), "max_ms": round(times[-1], 3)}


def measure_rss(client: StoreClient, store_pid: int, rss_start: int, cycles: int) -> dict:
    payloads = [np.random.default_rng(3).bytes(LAYOUT.block_nbytes) for _ in range(8)]
    destination = memoryview(bytearray(4 * LAYOUT.block_nbytes))
    for cycle in range(cycles):
        blocks = make_blocks(4, seed=10_000 + cycle, payloads=payloads)
        if client.push_blocks(FINGERPRINT, blocks).num_stored != 4:
            raise RuntimeError(f"cycle {cycle}: push did not store 4 new blocks")
        store_pull(client, [header.block_hash for header, _ in blocks], destination)
    rss_end = psutil.Process(store_pid).memory_info().rss
    pool_bytes = POOL_BLOCKS * LAYOUT.block_nbytes
    return {"cycles": cycles, "blocks_per_cycle": 4, "pool_bytes": pool_bytes, "rss_start_bytes": rss_start,
            "rss_end_bytes": rss_end, "rss_growth_bytes": rss_end - rss_start,
            "rss_end_vs_start": round(rss_end / rss_start, 4),
            "within_5_percent": rss_end <= 1.05 * rss_start}


def run(rounds: int, cycles: int, device: str) -> dict:
    with RedisServer() as redis:
        store, port = start_store(redis.url, device)
        client = StoreClient(f"{HOST}:{port}", LAYOUT, timeout_s=120)
        try:
            rss_start = psutil.Process(store.pid).memory_info().rss
            blocks = make_blocks(NUM_BLOCKS, seed=0)
            hashes = [header.block_hash for header, _ in blocks]
            if client.push_blocks(FINGERPRINT, blocks).num_stored != NUM_BLOCKS:
                raise RuntimeError("the store did not take the 64 blocks")
            results = {"pull": measure_pulls(client, hashes, rounds, store.pid),
                       "lookup": measure_lookups(redis.url, hashes, 1000),
                       "rss": measure_rss(client, store.pid, rss_start, cycles),
                       "store_device": client.stats().device}
        finally:
            client.close()
            store.terminate()
            store.wait(30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed pulls per contender")
    parser.add_argument("--cycles", type=int, default=1000, help="push/pull cycles before the RSS reading")
    parser.add_argument("--device", default="cpu", help="store pool device: cpu, cuda or auto")
    parser.add_argument("--serve-tcp", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare-grpc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_tcp:
        return serve_tcp(args.serve_tcp)
    if args.serve_bare_grpc:
        return serve_bare_grpc()
    results = run(args.rounds, args.cycles, args.device)
    pull, lookup, rss = results["pull"], results["lookup"], results["rss"]
    print(f"pull 64 blocks ({pull['bytes'] / 1e6:.1f} MB): store {pull['store_pull_mb_s']:.0f} MB/s, "
          f"raw TCP {pull['raw_tcp_mb_s']:.0f} MB/s, bare gRPC {pull['bare_grpc_mb_s']:.0f} MB/s; "
          f"store/raw TCP = {pull['store_vs_raw_tcp']:.2f} (target >= 0.6), "
          f"store gRPC stream {pull['store_grpc_stream_mb_s']:.0f} MB/s = {pull['store_grpc_stream_vs_raw_tcp']:.2f} "
          f"x raw TCP, store/bare gRPC = {pull['store_vs_bare_grpc']:.2f}; CPU per pull (both ends): raw TCP "
          f"{pull['raw_tcp_cpu_ms_per_pull']:.0f} ms, store {pull['store_pull_cpu_ms_per_pull']:.0f} ms, gRPC stream "
          f"{pull['store_grpc_stream_cpu_ms_per_pull']:.0f} ms")
    print(f"Redis lookup of 64 hashes: p50 {lookup['p50_ms']:.3f} ms, p99 {lookup['p99_ms']:.3f} ms (target < 2 ms)")
    print(f"store RSS: start {rss['rss_start_bytes'] / 2**20:.1f} MiB (pool {rss['pool_bytes'] / 2**20:.1f} MiB "
          f"included), after {rss['cycles']} cycles {rss['rss_end_bytes'] / 2**20:.1f} MiB "
          f"({rss['rss_end_vs_start']:.3f} x; target <= 1.05)")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    path = write_result("transfer", {**results, "git_commit": commit, "git_dirty": dirty,
                                     "targets": {"store_vs_raw_tcp": 0.6, "lookup_p99_ms": 2.0, "rss_end_vs_start": 1.05}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
