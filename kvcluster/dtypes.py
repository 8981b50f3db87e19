"""The model/KV dtype choice: `auto`, `float32`, `bfloat16` or `float16`, resolved per device.

`auto` picks what the hardware runs fastest, by a fixed rule so that every process of a cluster on
the same kind of host resolves it alike: bfloat16 on a GPU that computes it natively (compute
capability 8.0+), float16 on an older GPU; on a CPU, bfloat16 where its bf16 dot products beat
fp32 FMAs (Intel with AMX; AMD with AVX512-BF16, where a bf16 matmul of SmolLM2's shapes ran
2.3-3.5x faster than fp32), else float32. On Intel CPUs with AVX512-BF16 but no AMX (the Xeon of
the last bench run) `vdpbf16ps` has the fp32 FMA's peak: bf16 decode measured 0.93-1.06x fp32 and
bf16 prefill 0.64x, so float32 it is. The KV cache always takes the model's dtype, so the dtype is
part of the KV layout and of the fingerprint.
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
    if cpu_prefers_bf16():
        return "bfloat16", "auto: this CPU's bf16 dot products outrun fp32 (AMX, or AMD AVX512-BF16)"
    return "float32", "auto: this CPU computes bf16 no faster than fp32 (no AMX; on Intel, AVX512-BF16 alone has fp32's peak)"


@functools.cache
def cpu_prefers_bf16() -> bool:
    vendor, flags = _cpu_info()
    if "amx_bf16" in flags:
        return True
    return vendor == "AuthenticAMD" and "avx512_bf16" in flags


def _cpu_info() -> tuple[str, set[str]]:
    """(vendor_id, flags) of the first CPU in /proc/cpuinfo; empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields.get("vendor_id", ""), set(fields.get("flags", "").split())
