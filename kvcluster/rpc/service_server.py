"""What every kvcluster gRPC service process is around its servicers: the gRPC server, its /metrics
HTTP endpoint, and one start and stop order (tests and kvcluster.rpc.service_main drive them alike)."""

import logging

from prometheus_client import CollectorRegistry, start_http_server

from kvcluster.rpc import plumbing as rpc

log = logging.getLogger(__name__)


class MetricsEndpoint:
    """The /metrics HTTP endpoint of one registry (port 0: a free one; below 0: none)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self.registry = registry
        self.host = "::" if host == "[::]" else host
        self.requested_port = port
        self.port: int | None = None
        self._http = None

    def start(self) -> int | None:
        """Serve, unless turned off; returns the bound port (None when off)."""
        if self.requested_port >= 0:
            self._http, _ = start_http_server(self.requested_port, addr=self.host, registry=self.registry)
            self.port = self._http.server_port
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class ServiceServer:
    """A built service: `start` starts its parts, the gRPC server, /metrics, then what announces it;
    `stop` withdraws the announcement, stops the gRPC server (NOT_SERVING, in-flight calls get the
    grace period), closes the parts, then /metrics. Subclasses fill in the four steps."""

    def __init__(self, name: str, config, rpc_server: rpc.RpcServer, registry: CollectorRegistry, port: int):
        self.name = name
        self.config = config
        self.rpc_server = rpc_server
        self.registry = registry
        self.port = port
        self.metrics_endpoint = MetricsEndpoint(registry, config.host, config.metrics_port)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port

    def start(self):
        self._start_parts()
        self.rpc_server.start()
        self.metrics_endpoint.start()
        self._announce()  # last: clients are sent here only once everything serves
        log.info("%s serving on %s (%smetrics port %s)", self.name, self.describe_address(),
                 self.describe_parts(), self.metrics_port)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        self._withdraw()
        self.rpc_server.stop(self.config.grace_seconds if grace_s is None else grace_s)
        self._close_parts()
        self.metrics_endpoint.stop()

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        return self.rpc_server.wait_for_termination(timeout_s)

    def describe_address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def describe_parts(self) -> str:
        """More for the start-up log line, ending in '; ' when not empty."""
        return ""

    def _start_parts(self) -> None:
        pass

    def _announce(self) -> None:
        pass

    def _withdraw(self) -> None:
        pass

    def _close_parts(self) -> None:
        pass
