"""What every kvcluster gRPC service process is around its servicers: the gRPC server, its /metrics
HTTP endpoint, and one start and stop order (tests and kvcluster.rpc.service_main drive them alike)."""

import logging
import socket
import socketserver
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from kvcluster.rpc import plumbing as rpc

log = logging.getLogger(__name__)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # a scrape every few seconds is not news
        pass


class _MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsEndpoint:
    """The /metrics HTTP endpoint of one registry (port 0: a free one; below 0: none). prometheus_client's
    exposition app, served from a thread that looks for `stop` every `POLL_S` (its own start_http_server
    polls every 0.5 s, which every stop of every service waited for)."""

    POLL_S = 0.05

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self.registry = registry
        self.host = "::" if host == "[::]" else host
        self.requested_port = port
        self.port: int | None = None
        self._http: WSGIServer | None = None

    def start(self) -> int | None:
        """Serve, unless turned off; returns the bound port (None when off)."""
        if self.requested_port >= 0:
            family, _, _, _, address = socket.getaddrinfo(self.host, self.requested_port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
            server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})
            self._http = make_server(address[0], self.requested_port, make_wsgi_app(self.registry), server_class,
                                     handler_class=_QuietHandler)
            self.port = self._http.server_port
            threading.Thread(target=self._http.serve_forever, args=(self.POLL_S,), name="metrics-http",
                             daemon=True).start()
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
