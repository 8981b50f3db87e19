"""`python -m decode_service`: run one decode worker (the public Generate endpoint) until SIGTERM or SIGINT."""

import sys

from decode_service.config import DecodeConfig
from decode_service.server import create_server
from kvcluster.rpc.service_main import run_service

if __name__ == "__main__":
    sys.exit(run_service("python -m decode_service", DecodeConfig, create_server,
                         "kvcluster decode worker: the public Generate endpoint, with continuous batching."))
