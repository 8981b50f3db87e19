"""Configuration of the prefill service: flags `--name`, env `KVC_NAME`, defaults for one machine."""


from kvcluster.config import setting
from kvcluster.worker.config import WorkerConfig


class PrefillConfig(WorkerConfig):
    """Every knob of one prefill worker (the shared ones are in WorkerConfig)."""

    port: int = setting(50052, "gRPC port of Prefill; 0 picks a free one")
    metrics_port: int = setting(9102, "Prometheus /metrics port; 0 picks a free one, -1 disables it")
