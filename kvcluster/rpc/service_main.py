"""The `python -m <service>` entry point every kvcluster service shares.

Parses the service's config (flags, then `KVC_*` env, then defaults), builds and starts the
server, prints one `READY grpc_port=<p> metrics_port=<p>` line (launchers that asked for port 0
read it), and on SIGTERM or SIGINT stops gracefully: NOT_SERVING, in-flight calls get the grace
period, pins and slots are released, exit code 0. `exit_process` then ends the process without the
interpreter's teardown.
"""

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from kvcluster.config import ServiceConfig
from kvcluster.errors import KVClusterError


def run_service(prog: str, config_cls: type[ServiceConfig], create_server: Callable, description: str,
                argv: list[str] | None = None, ready_extra: Callable[[object], str] = lambda server: "") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_cls.parse(argv, prog=prog, description=description)
        server, port = create_server(config)
    except KVClusterError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    print(f"READY grpc_port={port} metrics_port={server.metrics_port}{ready_extra(server)}", flush=True)
    stopping.wait()
    logging.getLogger(prog).info("stopping: %.1f s grace for in-flight calls", config.grace_seconds)
    server.stop()
    return 0


def exit_process(code: int) -> NoReturn:
    """End a service process with `code` once run_service returned. Everything it held outside itself
    (registry entry, index, pins, slots, spill files, sockets) is released by then; the interpreter's
    teardown would only free memory object by object (~0.5 s with a model and a 1 GiB KV pool, paid by
    every stop and rolling restart), so the logs and output are flushed and the process exits at once."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)
