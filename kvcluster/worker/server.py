"""What a prefill or decode worker process is made of once built: gRPC server, engine thread, /metrics."""

import logging
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry

from kvcluster.rpc import plumbing as rpc
from kvcluster.worker.numerics import log_numerics, numerics_status
from kvcluster.worker.metrics import serve_metrics
from kvcluster.worker.engine_worker import EngineWorker

log = logging.getLogger(__name__)


class WorkerServer:
    """Starts the engine thread, the gRPC server and /metrics; stops them in reverse, then `on_stop`."""

    def __init__(self, name: str, config, rpc_server: rpc.RpcServer, worker: EngineWorker,
                 registry: CollectorRegistry, port: int, on_stop: Sequence[Callable[[], None]] = (),
                 registration=None):
        self.name = name
        self.config = config
        self.rpc_server = rpc_server
        self.worker = worker
        self.registry = registry
        self.port = port
        self.on_stop = list(on_stop)
        self.registration = registration  # IndexPublisher of the worker registry, or None
        self.numerics = numerics_status(worker.engine)
        self.metrics_port: int | None = None
        self._metrics_http = None

    def start(self) -> "WorkerServer":
        log_numerics(self.name, self.numerics)
        self.worker.start()
        self.rpc_server.start()
        if self.config.metrics_port >= 0:
            self._metrics_http, self.metrics_port = serve_metrics(self.registry, self.config.host, self.config.metrics_port)
        if self.registration is not None:  # last: routers send work only once everything serves
            self.registration.start()
        log.info("%s serving on %s:%d (metrics port %s)", self.name, self.config.host, self.port, self.metrics_port)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Leave the registry (routers stop sending), NOT_SERVING, in-flight calls get the grace period,
        then the engine thread and helpers stop."""
        if self.registration is not None:
            self.registration.stop(deregister=True)
            if self.worker.engine.blocks.listener is self.registration:  # tests share one engine between servers
                self.worker.engine.blocks.listener = None
        self.rpc_server.stop(self.config.grace_seconds if grace_s is None else grace_s)
        self.worker.stop()
        for close in self.on_stop:
            close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
