"""`python -m decode_service`: run one decode worker (the public Generate endpoint) until SIGTERM or SIGINT."""

from decode_service.config import DecodeConfig
from decode_service.server import create_server
from kvcluster.rpc.service_main import exit_process, run_service

if __name__ == "__main__":
    exit_process(run_service("python -m decode_service", DecodeConfig, create_server,
                         "kvcluster decode worker: the public Generate endpoint, with continuous batching."))
