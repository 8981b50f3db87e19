"""What the measures of one suite run share: the mode, the results folder, and the expensive
things started at most once per run (the in-process engine, the local cluster).

Modes: `full` (what `make bench` runs), `quick` (`--quick`, a few minutes), `tiny` (`--tiny`, the
smallest run that still writes every JSON and PNG; the test of the suite uses it). Each measure
keeps its own sizes per mode next to its code.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from bench.common import RESULTS_DIR, write_result
from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.engine.engine import Engine, EngineConfig, load_engine
from kvcluster.model.files import default_model_path

MODES = ("full", "quick", "tiny")
ENGINE_KV_BYTES = 512 << 20


@dataclass
class BenchContext:
    """One suite run. Not thread-safe; measures run one after another."""

    mode: str = "full"
    model: str | None = None
    results_dir: Path = RESULTS_DIR
    dtype: str = "float32"   # of the engine and the cluster; fp32 keeps figures comparable across runs
    _engine: Engine | None = field(default=None, repr=False)
    _cluster: Cluster | None = field(default=None, repr=False)
    _cluster_log: TextIO | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.results_dir = Path(self.results_dir)

    def __enter__(self) -> "BenchContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pick(self, sizes: dict):
        """The value of `sizes` ({"full": .., "quick": .., "tiny": ..}) for this run's mode."""
        return sizes[self.mode]

    @property
    def model_path(self) -> Path:
        return Path(self.model) if self.model else default_model_path()

    @property
    def scratch_dir(self) -> Path:
        """Logs and other by-products (bench/results/tmp/ is git-ignored)."""
        path = self.results_dir / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def engine(self) -> Engine:
        """The in-process engine (the baseline of the disaggregation overhead), loaded once."""
        if self._engine is None:
            self._engine = load_engine(self.model, None, EngineConfig(kv_capacity_bytes=ENGINE_KV_BYTES), self.dtype)
        return self._engine

    def cluster(self) -> Cluster:
        """The local cluster (Redis, one cache store, prefill, decode), started once; its logs go to
        scratch_dir/cluster.log."""
        if self._cluster is None:
            self._cluster_log = open(self.scratch_dir / "cluster.log", "a")
            self._cluster = Cluster(ClusterPorts.any_free(), extra_env=self.cluster_env(),
                                    log_stream=self._cluster_log, dtype=self.dtype).start()
        return self._cluster

    def gateway_url(self) -> str:
        """The OpenAI gateway in front of the shared cluster, started on first use (the suite runs its
        one user last, so the measures that call decode directly never share the cores with it)."""
        cluster = self.cluster()
        if "gateway" not in cluster.children:
            cluster.spawn("gateway", cluster.gateway_child_args())
        return cluster.gateway_url

    def cluster_env(self) -> dict[str, str]:
        """With `--model`, every worker loads it and the store accepts its KV layout (via KVC_* env)."""
        if not self.model:
            return {}
        layout = self.engine().layout
        return {"KVC_MODEL": str(self.model_path), "KVC_NUM_LAYERS": str(layout.num_layers),
                "KVC_BLOCK_SIZE": str(layout.block_size), "KVC_NUM_KV_HEADS": str(layout.num_kv_heads),
                "KVC_HEAD_DIM": str(layout.head_dim), "KVC_DTYPE": layout.dtype}

    def write(self, name: str, payload: dict) -> Path:
        return write_result(name, {"mode": self.mode, **payload}, self.results_dir)

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None
        if self._cluster_log is not None:
            self._cluster_log.close()
            self._cluster_log = None



def gpu_note() -> dict:
    """Issue 8 item 7: where the measures ran. Measures that use the engine pick CUDA when present."""
    import torch

    if torch.cuda.is_available():
        return {"run": True, "device": torch.cuda.get_device_name(0)}
    return {"run": False, "reason": "no CUDA device on this machine (no GPU was lent to this task); "
                                    "CPU figures only, the GPU rows of items 1, 2 and 4 are not recorded"}
