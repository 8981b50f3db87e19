"""Assembles a prefill worker: engine thread, shared-cache client, gRPC servicer and /metrics."""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from kvcluster.engine.engine import Engine
from kvcluster.proto import prefill_pb2, prefill_pb2_grpc
from kvcluster.rpc import plumbing as rpc
from kvcluster.rpc.messages import sampling_from_proto
from kvcluster.rpc.security import token_guards
from kvcluster.worker.registration import make_registration
from kvcluster.worker.server import WorkerServer, make_cache_client, make_engine_worker
from prefill_service.config import PrefillConfig
from prefill_service.metrics import PrefillMetrics
from prefill_service.prefiller import PrefillOutcome, Prefiller


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, prefiller: Prefiller):
        self.prefiller = prefiller

    def Prefill(self, request: prefill_pb2.PrefillRequest, context) -> prefill_pb2.PrefillResponse:
        outcome = self.prefiller.prefill(request.request_id, list(request.token_ids),
                                         sampling_from_proto(request.sampling), request.bypass_cache, context,
                                         request.cache_salt)
        return to_response(outcome, self.prefiller.worker.engine.fingerprint)

    def PrefillStream(self, request: prefill_pb2.PrefillRequest, context) -> Iterator[prefill_pb2.PrefillResponse]:
        started = self.prefiller.start(request.request_id, list(request.token_ids),
                                       sampling_from_proto(request.sampling), request.bypass_cache, context,
                                       request.cache_salt)
        fingerprint = self.prefiller.worker.engine.fingerprint
        yield prefill_pb2.PrefillResponse(first_token_id=started.first_token, seed=started.seed,
                                          num_prompt_tokens=started.num_prompt_tokens, fingerprint=fingerprint,
                                          blocks_pending=True)
        yield to_response(started.finish(), fingerprint)


def to_response(outcome: PrefillOutcome, fingerprint: bytes) -> prefill_pb2.PrefillResponse:
    ms = 1000.0
    return prefill_pb2.PrefillResponse(
        first_token_id=outcome.first_token_id, blocks=outcome.blocks,
        num_prompt_tokens=outcome.num_cached_tokens + outcome.num_computed_tokens,
        num_cached_tokens=outcome.num_cached_tokens, num_computed_tokens=outcome.num_computed_tokens,
        timing=prefill_pb2.PrefillTiming(lookup_ms=outcome.lookup_s * ms, pull_ms=outcome.pull_s * ms,
                                         compute_ms=outcome.compute_s * ms, push_ms=outcome.push_s * ms,
                                         total_ms=outcome.total_s * ms),
        bytes_pulled=outcome.bytes_pulled, bytes_pushed=outcome.bytes_pushed, fingerprint=fingerprint,
        seed=outcome.seed)


class PrefillServer(WorkerServer):
    """A built prefill worker; `prefiller` is exposed for tests and tools."""

    def __init__(self, config: PrefillConfig, rpc_server: rpc.RpcServer, prefiller: Prefiller,
                 registry: CollectorRegistry, port: int):
        closers = [prefiller.close] + ([prefiller.cache.close] if prefiller.cache is not None else [])
        super().__init__("prefill", config, rpc_server, prefiller.worker, registry, port, closers,
                         make_registration("prefill", config, prefiller.worker, port))
        self.prefiller = prefiller


def create_server(config: PrefillConfig, engine: Engine | None = None,
                  registry: CollectorRegistry | None = None) -> tuple[PrefillServer, int]:
    """Build a prefill worker (not started). `engine` lets tests share one loaded model."""
    registry = registry or CollectorRegistry()
    metrics = PrefillMetrics(registry)
    worker = make_engine_worker("prefill", config, engine, registry, metrics.observe_step)
    engine = worker.engine
    cache = make_cache_client(config, engine)
    prefiller = Prefiller(worker, cache, metrics, config.lease_seconds)
    service = rpc.Service(PrefillServicer(prefiller), prefill_pb2_grpc.add_PrefillServiceServicer_to_server,
                          rpc.service_name(prefill_pb2, "PrefillService"))
    rpc_server, port = rpc.create_server([service], config.port, config.host, config.max_workers,
                                         credentials=config.server_credentials(),
                                         guards=token_guards(config.internal_token))
    return PrefillServer(config, rpc_server, prefiller, registry, port), port
