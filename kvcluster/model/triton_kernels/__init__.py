"""The engine's batch-invariant kernels for CUDA, in Triton: the same contracts as the C++ CPU ops
(kvcluster/model/csrc/), so a CUDA worker keeps the exactness guarantee by default.

- `matmul.invariant_linear`: x @ w.T with one fixed tile, no split-k, M not specialised on.
- `norm.rms_norm`: per-row RMSNorm, fp32 inside, correctly rounded sqrt and division.
- `rotary.rotary`: the engine's rotate-half rotary; `rotary.write_kv`: K/V into pool slots.
- `attention.PagedAttention`: paged attention over blocks read in place (prefill with a cached
  prefix, chunked prefill, decode in one call), GQA folded, fixed key chunks merged in order.

Every kernel computes in fp32 whatever the dtype (float32, bfloat16, float16: loads widened exactly,
one rounding at the store). They run natively on a CUDA device, and on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1, set before this package is imported: Triton decides at decoration
time), which is how the tests execute every kernel on a machine without a GPU. Importing this
package imports triton: only the model imports it, and only when it will use it.
"""

import os

import torch

from kvcluster.model.triton_kernels.attention import PagedAttention, paged_attention
from kvcluster.model.triton_kernels.matmul import invariant_linear, invariant_pack
from kvcluster.model.triton_kernels.norm import rms_norm
from kvcluster.model.triton_kernels.rotary import rotary, write_kv

__all__ = ["PagedAttention", "paged_attention", "invariant_linear", "invariant_pack", "rms_norm", "rotary",
           "write_kv", "interpreted", "identity"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreted() -> bool:
    """Whether the kernels were made for Triton's interpreter (CPU tensors) rather than compiled."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def identity(device: torch.device) -> str:
    """Which arithmetic these kernels run on `device`, for the block fingerprint: the Triton version
    (its compiler picks the instructions) and the GPU architecture, or the interpreter (numpy)."""
    import triton

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"triton-{triton.__version__}-sm{major}{minor}"
    return f"triton-{triton.__version__}-interpreter"
