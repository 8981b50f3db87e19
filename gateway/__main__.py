"""`python -m gateway`: the OpenAI-compatible HTTP gateway. Prints `READY http_port=<p>` once it
serves (launchers that asked for port 0 read it); SIGTERM/SIGINT stop it gracefully (uvicorn lets
in-flight requests finish within the grace period), exit code 0."""

import logging
import socket
import sys

import uvicorn

from gateway.config import GatewayConfig
from gateway.server import Gateway
from kvcluster.errors import KVClusterError


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = GatewayConfig.parse(argv, prog="python -m gateway", description=__doc__)
        gateway = Gateway(config)
    except KVClusterError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    port = sock.getsockname()[1]
    app = gateway.app()

    class ReadyServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            print(f"READY http_port={port}", flush=True)

    server = ReadyServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(config.grace_seconds)))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
