"""One rounding from fp32 to a kernel's output dtype, the same on a GPU and under Triton's interpreter.

Every kernel computes in fp32 and rounds once at its store, to nearest even as torch (c10) rounds.
For bfloat16 the rounding is written out on the bits: the interpreter's fp32 -> bf16 cast truncates
(it stores bf16 as uint16 and drops the low bits), while a GPU's cvt rounds to nearest even; the
integer form below is exact on both, so they agree with each other and with torch (NaN stays NaN).
float16 and float32 casts are already exact on both (numpy rounds to nearest even).
"""

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x (fp32) as `dtype`, rounded to nearest even."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x != x, 0x7FC00000, bits)            # NaN -> c10's quiet NaN
        bits = bits + (0x7FFF + ((bits >> 16) & 1))            # (bits + 0x7fff + lsb) >> 16
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
