"""Assembles a decode worker: engine thread, prompt-KV source, Generate servicer and /metrics."""

import logging
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from decode_service.config import DecodeConfig
from decode_service.generator import Generator
from decode_service.metrics import DecodeMetrics
from decode_service.prefill_pool import PrefillPool
from decode_service.prompt_kv import PromptKVSource
from decode_service.verifier import Verifier
from kvcluster.engine.engine import Engine
from kvcluster.errors import InvalidArgument, ResourceExhausted, Unavailable
from kvcluster.kv.index_publisher import IndexPublisher
from kvcluster.proto import decode_pb2, decode_pb2_grpc
from kvcluster.rpc import plumbing as rpc
from kvcluster.rpc.security import token_guards
from kvcluster.worker.engine_worker import EngineWorker
from kvcluster.worker.registration import make_registration
from kvcluster.worker.server import WorkerServer, make_cache_client, make_engine_worker

log = logging.getLogger(__name__)
RESET_TIMEOUT_S = 30.0  # the longest a reset waits for the engine thread, then for the registry


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, generator: Generator, metrics: DecodeMetrics, max_streams: int):
        self.generator = generator
        self.metrics = metrics
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams)
        self.registration: IndexPublisher | None = None  # set once the port is bound (create_server)

    def Generate(self, request, context):
        outcome = "error"
        admitted = self._streams.acquire(blocking=False)
        try:
            if not admitted:
                raise ResourceExhausted(f"{self.max_streams} Generate streams already open (max_streams)")
            yield from self.generator.generate(request, context)
            outcome = "ok"
        except GeneratorExit:
            outcome = "cancelled"
            raise
        except InvalidArgument:
            outcome = "invalid"
            raise
        except ResourceExhausted:
            outcome = "rejected"
            raise
        finally:
            if admitted:
                self._streams.release()
            self.metrics.requests.labels(outcome).inc()

    def ResetPrefixCache(self, request, context):
        remaining = context.time_remaining()
        timeout = RESET_TIMEOUT_S if remaining is None else min(RESET_TIMEOUT_S, remaining)
        reset = reset_prefix_cache(self.generator.worker, self.registration, timeout)
        return decode_pb2.ResetPrefixCacheResponse(blocks_dropped=reset.blocks_dropped, index_updated=reset.index_updated)


@dataclass(frozen=True)
class PrefixCacheReset:
    blocks_dropped: int
    index_updated: bool  # the registry no longer lists the dropped blocks for this worker


def reset_prefix_cache(worker: EngineWorker, registration: IndexPublisher | None, timeout_s: float) -> PrefixCacheReset:
    """Drop the local prefix cache on the engine thread, then wait until the registry publisher has
    written the removals the pool's listener queued, so a router asking Redis after the answer no
    longer credits this worker with those blocks."""
    try:
        dropped = worker.call(lambda engine: engine.reset_prefix_cache(), timeout_s)
    except FutureTimeout:
        raise Unavailable(f"the engine thread did not take the reset within {timeout_s:g} s") from None
    indexed = registration is None or registration.flush(timeout_s)
    log.info("prefix cache reset: %d blocks dropped%s", dropped, "" if indexed else "; the registry is not updated yet")
    return PrefixCacheReset(dropped, indexed)


class DecodeServer(WorkerServer):
    """A built decode worker; `servicer` and `generator` are exposed for tests and tools."""

    def __init__(self, config: DecodeConfig, rpc_server: rpc.RpcServer, servicer: DecodeServicer,
                 registry: CollectorRegistry, port: int):
        generator = servicer.generator
        prefill = generator.source.prefill
        closers = [generator.close] + ([prefill.close] if prefill is not None else []) + (
            [generator.cache.close] if generator.cache is not None else [])
        servicer.registration = make_registration("decode", config, generator.worker, port)
        super().__init__("decode", config, rpc_server, generator.worker, registry, port, closers,
                         servicer.registration)
        self.servicer = servicer
        self.generator = generator


def create_server(config: DecodeConfig, engine: Engine | None = None,
                  registry: CollectorRegistry | None = None) -> tuple[DecodeServer, int]:
    """Build a decode worker (not started). `engine` lets tests share one loaded model."""
    registry = registry or CollectorRegistry()
    metrics = DecodeMetrics(registry)
    worker = make_engine_worker("decode", config, engine, registry, metrics.observe_step)
    engine = worker.engine
    cache = make_cache_client(config, engine)
    prefill = PrefillPool(config, engine.fingerprint) if config.prefill_target else None
    source = PromptKVSource(engine, cache, prefill, config.local_prefill_max_tokens, config.prefill_timeout_seconds,
                            config.disaggregation)
    metrics.local_prefill_max.set_function(source.policy.max_tokens)
    verifier = Verifier(worker, metrics, config.verify_fraction) if config.verify_fraction > 0 else None
    generator = Generator(worker, source, cache, metrics, config.cache_generated, config.lease_seconds,
                          config.max_pending_pushes, verifier)
    servicer = DecodeServicer(generator, metrics, config.max_streams)
    service = rpc.Service(servicer, decode_pb2_grpc.add_DecodeServiceServicer_to_server,
                          rpc.service_name(decode_pb2, "DecodeService"))
    rpc_server, port = rpc.create_server([service], config.port, config.host, config.max_workers,
                                         credentials=config.server_credentials(),
                                         guards=token_guards(api_key=config.api_key))
    return DecodeServer(config, rpc_server, servicer, registry, port), port
