"""Whether the Triton kernels (kvcluster.model.triton_kernels) can run on a device, without importing
them: the model asks before it loads them, numerics.py asks to say why exactness does not hold.

They run on CUDA when triton is installed, and on CPU tensors only under Triton's interpreter
(TRITON_INTERPRET=1: the tests). KVC_TRITON=0 turns them off (the fast torch path then runs on CUDA
and says exactness is not guaranteed).
"""

import importlib.util
import os

import torch

TRITON_DTYPES = ("float32", "bfloat16", "float16")


def triton_unavailable(device: torch.device | str) -> str:
    """Why the Triton kernels cannot run on `device`; "" when they can."""
    device = torch.device(device)
    if os.environ.get("KVC_TRITON", "1") == "0":
        return "the Triton kernels are turned off (KVC_TRITON=0)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (make install installs it)"
    if device.type == "cuda":
        return "" if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return ""
    return f"the Triton kernels run on CUDA (on {device.type} only under TRITON_INTERPRET=1)"
