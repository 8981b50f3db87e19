"""KV transfer, the suite's view of bench/transfer.py (issue 4's transfer bench, reused as it is).

bench.transfer pulls 64 SmolLM2 fp32 blocks (~47 MB) from a real cache store process, by its
default bulk path and by the gRPC stream, and moves the same bytes over raw TCP loopback and
through a bare gRPC streamer, in interleaved rounds; it also times index lookups and reads the
store's RSS after many push/pull cycles. This measure runs it at the suite's size, records its
figures, the ratios with their targets, and a plot (docs/pull_path.md explains the two paths).
Targets: pull (default path) >= 0.6x raw TCP; store RSS after the cycles <= 1.05x its start-up RSS.
The gRPC stream's ratio (the fallback path) is recorded in the figures, pull.store_grpc_stream_vs_raw_tcp.
"""

import torch

from bench import transfer
from bench.common import at_least, at_most, progress
from bench.context import BenchContext, gpu_note
from bench.plots import bar_plot

NAME = "kv_transfer"
PULL_OVER_TCP_TARGET = 0.6
RSS_GROWTH_TARGET = 1.05
SIZES = {"full": (10, 1000), "quick": (5, 200), "tiny": (1, 20)}  # (rounds, push/pull cycles)


def run(ctx: BenchContext) -> dict:
    rounds, cycles = ctx.pick(SIZES)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    progress(NAME, f"bench.transfer: {rounds} rounds of raw TCP / bare gRPC / store pull (bulk, gRPC stream), "
                   f"{cycles} RSS cycles")
    figures = transfer.run(rounds, cycles, device)
    pull, rss = figures["pull"], figures["rss"]
    progress(NAME, f"raw TCP {pull['raw_tcp_mb_s']:.0f} MB/s, bare gRPC {pull['bare_grpc_mb_s']:.0f} MB/s, "
             f"store pull {pull['store_pull_mb_s']:.0f} MB/s ({pull['store_pull_path']}), gRPC stream "
             f"{pull['store_grpc_stream_mb_s']:.0f} MB/s; CPU per pull (both ends) raw TCP "
             f"{pull['raw_tcp_cpu_ms_per_pull']:.0f} ms, store {pull['store_pull_cpu_ms_per_pull']:.0f} ms, gRPC stream "
             f"{pull['store_grpc_stream_cpu_ms_per_pull']:.0f} ms; RSS x{rss['rss_end_vs_start']:.3f}")
    payload = {"layout": transfer.LAYOUT.canonical(), "blocks": transfer.NUM_BLOCKS, "rounds": rounds, **figures,
               "ratios": {"pull_over_raw_tcp": at_least(pull["store_vs_raw_tcp"], PULL_OVER_TCP_TARGET, digits=3),
                          "store_rss_end_over_start": at_most(rss["rss_end_vs_start"], RSS_GROWTH_TARGET, digits=4)},
               "gpu": gpu_note()}
    ctx.write(NAME, payload)
    bar_plot(ctx.results_dir / f"{NAME}.png",
             f"{transfer.NUM_BLOCKS} KV blocks ({pull['bytes'] / 1e6:.0f} MB) over loopback, median of {rounds}",
             "MB/s", ["throughput"], {"raw TCP": [pull["raw_tcp_mb_s"]], "bare gRPC stream": [pull["bare_grpc_mb_s"]],
                                      f"store pull ({pull['store_pull_path']})": [pull["store_pull_mb_s"]],
                                      "store pull (gRPC stream)": [pull["store_grpc_stream_mb_s"]]})
    return payload
