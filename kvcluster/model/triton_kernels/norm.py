"""RMSNorm in Triton, BLOCK_ROWS rows per program: x * (1 / sqrt(mean(x^2) + eps)) * weight.

The contract of csrc/rms_norm.cpp: fp32 inside (bf16/fp16 widened exactly at load), one rounding to
x's dtype at the end, (x * inv) * weight in that order. A row's sum of squares is one fixed
reduction over its own elements (along the tile's row), so its result does not depend on the other
rows or on where in a tile it sits. sqrt and the
division are the correctly rounded ones (sqrt_rn, div_rn), not the GPU's approximations.
"""

import torch
import triton
import triton.language as tl

from kvcluster.model.triton_kernels.rounding import round_to


BLOCK_ROWS = 4


@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm(x_ptr, w_ptr, out_ptr, num_rows, stride_x, stride_out, eps,
              DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    dims = tl.arange(0, DIM_PAD)
    mask = (rows < num_rows)[:, None] & (dims < DIM)[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_x + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + dims, mask=dims < DIM, other=0.0).to(tl.float32)
    inv = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=1) / DIM + eps))    # [BLOCK_ROWS]
    out = x * inv[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + dims[None, :], round_to(out, out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D], weight [D], same dtype -> [T, D] (the CPU op's signature)."""
    if x.dim() != 2 or weight.shape != (x.shape[1],) or x.dtype != weight.dtype:
        raise ValueError("rms_norm: x must be [T, D] and weight [D], of one dtype")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        _rms_norm[(triton.cdiv(x.shape[0], BLOCK_ROWS),)](
            x, weight.contiguous(), out, x.shape[0], x.stride(0), out.stride(0), eps,
            DIM=x.shape[1], DIM_PAD=triton.next_power_of_2(x.shape[1]), BLOCK_ROWS=BLOCK_ROWS)
    return out
