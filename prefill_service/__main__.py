"""`python -m prefill_service`: run one prefill worker until SIGTERM or SIGINT (see --help)."""

from kvcluster.rpc.service_main import exit_process, run_service
from prefill_service.config import PrefillConfig
from prefill_service.server import create_server

if __name__ == "__main__":
    exit_process(run_service("python -m prefill_service", PrefillConfig, create_server,
                         "kvcluster prefill worker: computes only the prompt blocks nobody has cached."))
