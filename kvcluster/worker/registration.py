"""A prefill or decode worker in the Redis registry, so routers can find it and weigh it.

Each worker registers under `worker_namespace(ns, kind)` with the same heartbeat, epoch and
collection rules as a cache store (kvcluster.kv.index, kvcluster.kv.index_publisher): its address, its KV
layout and block fingerprint (the gateway hashes prompts with them), its tokenizer's fingerprint
(the gateway sends it token ids instead of text only when it equals its own), its numerics and whether
exactness holds on it (the gateway's /health shows them), and with every heartbeat its load. A
decode worker also publishes what its local prefix cache holds: the pool tells the publisher of
each block registered and evicted (on the engine thread, enqueue only) and the publisher writes
them in batches from its own thread. The set per block (`blk:{hash}` -> worker, epoch) rather than
a stream of events is what the gateway needs: one Lua call answers "how many leading blocks of
this prompt does each worker hold", and a worker that restarts or loses Redis simply registers a
new epoch and republishes a snapshot, with nothing to replay.
"""

import hashlib
import logging
import os
import socket
from functools import cache

from kvcluster.kv.index import RedisIndex, worker_namespace
from kvcluster.kv.index_publisher import IndexPublisher
from kvcluster.worker.engine_worker import EngineWorker
from kvcluster.worker.numerics import numerics_status

log = logging.getLogger(__name__)


@cache
def host_id() -> str:
    """Which cores this process computes on: the kernel's boot id (one per machine, shared by its
    containers) and this process's CPU affinity. Two workers with the same id compete for the same
    cores, so handing a prompt from one to the other adds no compute (decode's prefill policy)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            machine = f.read().strip()
    except OSError:
        machine = socket.gethostname()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [os.cpu_count()]
    return hashlib.sha256(f"{machine}|{cpus}".encode()).hexdigest()[:16]


def worker_load(worker: EngineWorker) -> dict[str, int | str]:
    """Running and waiting sequences, prompt tokens still to compute, free KV blocks and the host
    id; read off the engine thread (a hint)."""
    engine = worker.engine
    queued = sum(max(0, s.num_tokens - s.num_computed) for s in list(engine.waiting))
    return {"running": len(engine.running), "waiting": len(engine.waiting), "free_blocks": engine.blocks.num_free,
            "queued_tokens": queued, "host_id": host_id()}


def make_registration(kind: str, config, worker: EngineWorker, port: int) -> IndexPublisher | None:
    """The worker's registry publisher (not started), or None without Redis or with registration off."""
    if not config.redis_url or config.registry_heartbeat_seconds <= 0:
        return None
    engine = worker.engine
    host = socket.gethostname() if config.host in ("0.0.0.0", "::", "") else config.host
    member_id = config.worker_id or f"{kind}-{socket.gethostname()}-{port}"
    address = config.advertise_address or f"{host}:{port}"
    publishes_blocks = kind == "decode" and engine.prefix_caching
    published = numerics_status(engine).registry_fields() | {"block_size": str(engine.layout.block_size),
                                                              "tokenizer_fingerprint": engine.tokenizer.fingerprint}

    def held_hashes() -> list[bytes]:
        if not publishes_blocks:
            return []
        try:
            return worker.call(lambda eng: eng.blocks.cached_hashes(), timeout=10.0)
        except Exception as exc:  # the engine is stopping or stuck: publish the rest, not the blocks
            log.warning("could not snapshot the local cache for the registry: %r", exc)
            return []

    index = RedisIndex(config.redis_url, worker_namespace(config.index_namespace, kind), kv_events=kind == "decode")
    heartbeat = config.registry_heartbeat_seconds
    publisher = IndexPublisher(index, member_id, address, heartbeat, 3 * heartbeat, held_hashes,
                               layout=engine.layout.canonical(), fingerprint=engine.fingerprint.hex(),
                               load=lambda: worker_load(worker) | published)
    if publishes_blocks:
        engine.blocks.listener = publisher
    return publisher
