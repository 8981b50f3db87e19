"""What a prefill or decode worker process is made of once built: gRPC server, engine thread, /metrics."""

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry

from kvcluster.engine.engine import Engine, load_engine
from kvcluster.kv.index import RedisIndex
from kvcluster.rpc import plumbing as rpc
from kvcluster.rpc.cache_client import KVCacheClient
from kvcluster.rpc.faults import FaultyCacheClient, Faults
from kvcluster.rpc.service_server import ServiceServer
from kvcluster.worker.engine_worker import EngineWorker
from kvcluster.worker.metrics import register_numerics_info, register_pool_gauges
from kvcluster.worker.numerics import log_numerics, numerics_status


def make_engine_worker(name: str, config, engine: Engine | None, registry: CollectorRegistry,
                       on_step: Callable) -> EngineWorker:
    """The worker's engine (loaded as `config` says unless given: tests share one loaded model),
    its pool and numerics exported to `registry`, and the thread that owns it (not started)."""
    engine = engine or load_engine(config.model or None, config.device or None, config.engine_config(), config.dtype,
                                   cluster_secret=config.internal_token)
    engine.prefix_caching = engine.prefix_caching and config.prefix_caching
    register_pool_gauges(registry, engine.blocks)
    register_numerics_info(registry, numerics_status(engine))
    return EngineWorker(engine, config.max_waiting, name=f"{name}-engine", on_step=on_step)


def make_cache_client(config, engine: Engine) -> KVCacheClient | None:
    """The cache client a prefill or decode worker's config asks for (None without a Redis URL),
    after the start-up check that the live stores hold this worker's KV layout. `--faults` wraps it
    in fault injection (kvcluster.rpc.faults)."""
    if not config.redis_url:
        return None
    faults = Faults.parse(config.faults) if config.faults else None  # a bad spec fails before Redis is opened
    index = RedisIndex(config.redis_url, config.index_namespace)
    args = (index, engine.layout, engine.fingerprint, config.store_timeout_seconds, config)
    client = KVCacheClient(*args) if faults is None else FaultyCacheClient(*args, faults=faults)
    try:
        client.check_stores(config.store_wait_seconds)
    except BaseException:
        index.close()
        raise
    return client


class WorkerServer(ServiceServer):
    """Starts the engine thread, the gRPC server and /metrics, then registers; stops in reverse, then `on_stop`."""

    def __init__(self, name: str, config, rpc_server: rpc.RpcServer, worker: EngineWorker,
                 registry: CollectorRegistry, port: int, on_stop: Sequence[Callable[[], None]] = (),
                 registration=None):
        super().__init__(name, config, rpc_server, registry, port)
        self.worker = worker
        self.on_stop = list(on_stop)
        self.registration = registration  # IndexPublisher of the worker registry, or None
        self.numerics = numerics_status(worker.engine)

    def _start_parts(self) -> None:
        log_numerics(self.name, self.numerics)
        self.worker.start()

    def _announce(self) -> None:
        if self.registration is not None:  # routers send work only once everything serves
            self.registration.start()

    def _withdraw(self) -> None:
        """Leave the registry first: routers stop sending before the server goes NOT_SERVING."""
        if self.registration is not None:
            self.registration.stop(deregister=True)
            if self.worker.engine.blocks.listener is self.registration:  # tests share one engine between servers
                self.worker.engine.blocks.listener = None

    def _close_parts(self) -> None:
        self.worker.stop()
        for close in self.on_stop:
            close()
