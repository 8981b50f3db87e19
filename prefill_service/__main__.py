"""`python -m prefill_service`: run one prefill worker until SIGTERM or SIGINT.

Prints `READY grpc_port=<port> metrics_port=<port>` once serving (launchers asking for port 0 read it).
"""

import logging
import signal
import sys
import threading

from kvcluster.errors import KVClusterError
from prefill_service.config import PrefillConfig
from prefill_service.server import create_server


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = PrefillConfig.parse(argv, prog="python -m prefill_service",
                                     description="kvcluster prefill worker: computes only uncached prompt blocks.")
        server, port = create_server(config)
    except KVClusterError as exc:
        print(f"prefill_service: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    print(f"READY grpc_port={port} metrics_port={server.metrics_port}", flush=True)
    stopping.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
