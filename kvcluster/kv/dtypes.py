"""The model/KV dtype choice: `auto`, `float32`, `bfloat16` or `float16`, resolved per device.

`auto` picks what the hardware runs fastest *with* the exactness guarantee (batch-invariant
numerics, the default), by a fixed rule so that every process of a cluster on the same kind of
host resolves it alike: bfloat16 on a GPU that computes it natively (compute capability 8.0+),
float16 on an older GPU; on a CPU, bfloat16 where the batch-invariant matmul's bf16 dot products
(`vdpbf16ps`) beat fp32 FMAs (AMD with AVX512-BF16: 2x per instruction), else float32. On Intel
`vdpbf16ps` has the fp32 FMA's peak (bf16 prefill measured 0.64x fp32 on a Xeon without AMX), and
the batch-invariant matmul does not use AMX tiles, so float32 it is there. The KV cache always takes the model's dtype, so the dtype is
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
        return "bfloat16", "auto: this CPU's bf16 dot products (AMD AVX512-BF16) outrun fp32 in the batch-invariant matmul"
    return "float32", ("auto: the batch-invariant matmul runs bf16 no faster than fp32 here (it does not use AMX; "
                       "on Intel, AVX512-BF16 alone has fp32's peak)")


@functools.cache
def cpu_prefers_bf16() -> bool:
    """Whether bf16 outruns fp32 here *with* the exactness guarantee (batch-invariant numerics, the
    default): the batch-invariant matmul (csrc/invariant_linear.cpp) multiplies bf16 by `vdpbf16ps`
    pairs, which beat fp32 FMAs on AMD (Zen 4: 2x per instruction, measured 1.4-1.7x for the whole
    model) but only match them on Intel; it does not use AMX tiles, so an AMX CPU gains nothing
    from bf16 beyond half the bytes. One rule for every process: the cache store resolves `auto`
    the same way without a model."""
    vendor, flags = _cpu_info()
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
