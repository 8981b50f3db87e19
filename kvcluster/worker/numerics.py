"""A worker's numerics as it reports them: the mode, whether exactness holds, and why not.

Batch-invariant numerics are the default (EngineConfig.deterministic); `--fast-numerics` opts out.
A model asked for them still runs the fast kernels where no batch-invariant ones exist (float16 on
CPU, a CPU without the compiled kernels, CUDA without triton). On CUDA the batch-invariant kernels are
the Triton ones (kvcluster.model.triton_kernels), for float32, bfloat16 and float16. Then a cached or batched answer may differ from the
cold one, and the worker says so: one line at start-up (`log_numerics`), its registry entry (the
gateway's /health) and `kvcluster_numerics_info` (kvcluster.worker.metrics).
"""

import logging
from dataclasses import dataclass

from kvcluster.engine.engine import Engine
from kvcluster.kv.dtypes import DTYPE_NAMES
from kvcluster.model.triton_support import triton_unavailable

log = logging.getLogger(__name__)
INVARIANT_DTYPES = ("float32", "bfloat16")  # what the compiled CPU kernels cover
OPTED_OUT = "by request (--fast-numerics / KVC_FAST_NUMERICS)"


@dataclass(frozen=True)
class NumericsStatus:
    """How a worker's engine computes K/V and logits, and what that promises."""

    mode: str          # "batch-invariant" or "fast" (LlamaModel.numerics)
    guaranteed: bool   # a cached, batched or chunked answer is bitwise the cold one
    reason: str        # why not, when not guaranteed; "" when guaranteed
    device: str
    dtype: str

    def registry_fields(self) -> dict[str, str]:
        """What the worker publishes in its registration (kvcluster.kv.index.NUMERICS_FIELDS)."""
        return {"numerics": self.mode, "exactness_guaranteed": "true" if self.guaranteed else "false"}


def numerics_status(engine: Engine) -> NumericsStatus:
    model = engine.model
    device, dtype = model.device.type, DTYPE_NAMES[model.dtype]
    if model.numerics == "batch-invariant":
        return NumericsStatus(model.numerics, True, "", device, dtype)
    reason = missing_kernels(device, dtype) if engine.config.deterministic else OPTED_OUT
    return NumericsStatus(model.numerics, False, reason, device, dtype)


def missing_kernels(device_type: str, dtype: str) -> str:
    """Why batch-invariant numerics cannot run on this device and dtype."""
    if device_type != "cpu":
        return f"the Triton kernels are unavailable on {device_type}: {triton_unavailable(device_type) or 'see the log'}"
    if dtype not in INVARIANT_DTYPES:
        return f"no batch-invariant kernels for {dtype} (on CPU: {' and '.join(INVARIANT_DTYPES)})"
    return "the compiled CPU kernels are unavailable (no compiler, or KVC_KERNELS=0; see kvcluster/model/kernels.py)"


def log_numerics(worker_name: str, status: NumericsStatus) -> None:
    """The worker's one start-up line about exactness: a warning whenever it does not hold."""
    if status.guaranteed:
        log.info("%s numerics: %s on %s %s, exactness guaranteed", worker_name, status.mode, status.device,
                 status.dtype)
    else:
        log.warning("%s numerics: %s on %s %s, exactness is NOT guaranteed (a cached or batched answer may differ "
                    "from the cold one): %s", worker_name, status.mode, status.device, status.dtype, status.reason)
