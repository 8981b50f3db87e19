"""`python -m cache_store`: run one cache store shard until SIGTERM or SIGINT (see --help).

Every flag also reads from the environment (`--redis-url` <- KVC_REDIS_URL). Once serving it
prints `READY grpc_port=<port> metrics_port=<port> store_id=<id>` to stdout.
"""

import ctypes

from cache_store.config import StoreConfig
from cache_store.server import create_server
from kvcluster.rpc.service_main import exit_process, run_service


M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates its own malloc arena (up to 8 per core). Each gRPC
    handler thread builds and frees block-sized buffers, so each arena would keep its own
    high-water mark of freed memory and the store's RSS would creep well above its pool.
    Two arenas keep steady-state RSS within a few percent of start-up. No-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    limit_malloc_arenas()
    return run_service("python -m cache_store", StoreConfig, create_server,
                       "kvcluster cache store: KV blocks in a device-memory pool, served over gRPC "
                       "and indexed in Redis.", argv, ready_extra=lambda store: f" store_id={store.store_id}")


if __name__ == "__main__":
    exit_process(main())
