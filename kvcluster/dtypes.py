"""The model/KV dtype choice: `auto`, `float32`, `bfloat16` or `float16`, resolved per device.

`auto` picks what the hardware runs fastest without losing range: bfloat16 on a GPU that computes
it natively (compute capability 8.0+), float16 on an older GPU, bfloat16 on a CPU with native
bf16 dot products (AVX512-BF16 or AMX; 2.3-3.5x faster matmuls than fp32 measured here), and
float32 on any other CPU, where bf16 would be emulated and slower. The KV cache always takes the
model's dtype, so the dtype is part of the KV layout and of the fingerprint.
"""

import functools
from pathlib import Path

import torch

from kvcluster.errors import InvalidArgument

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def check_dtype(name: str, field: str = "dtype") -> str:
    if name not in DTYPE_CHOICES:
        raise InvalidArgument(field, f"must be one of {', '.join(DTYPE_CHOICES)}; got {name!r}")
    return name


def resolve_dtype(name: str, device: torch.device | str) -> tuple[str, str]:
    """The concrete dtype for `name` on `device`, and why (for the start-up log)."""
    check_dtype(name)
    if name != "auto":
        return name, "as configured"
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bfloat16", f"auto: GPU compute capability {major}.{minor} runs bf16 natively"
        return "float16", f"auto: GPU compute capability {major}.{minor} has no native bf16"
    if cpu_has_native_bf16():
        return "bfloat16", "auto: this CPU has native bf16 dot products (AVX512-BF16/AMX)"
    return "float32", "auto: this CPU has no native bf16, which would be emulated and slower"


@functools.cache
def cpu_has_native_bf16() -> bool:
    flags = _cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()
