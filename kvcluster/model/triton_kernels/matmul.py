"""The batch-invariant matmul in Triton: out = x @ w.T, each output row the same bits whatever M.

The contract of csrc/invariant_linear.cpp: an element's arithmetic depends on its own row of x and
its column of w only. Here: one fixed tile (BLOCK_M x BLOCK_N, the K loop in fixed BLOCK_K steps
from 0, no split-k, nothing chosen from M), and M is not specialised on (Triton would otherwise
compile another variant for M == 1 or M % 16 == 0). The dot runs on fp32 operands with fp32
accumulation (input_precision="ieee": no TF32), bf16/fp16 widened exactly at load; the result is
rounded once to x's dtype. A tensor-core variant (bf16 operands) would be faster for large models
and equally invariant, but Triton's interpreter cannot execute bf16 dots (see attention.py), so it
could not be tested here.
"""

import torch
import triton
import triton.language as tl

from kvcluster.model.triton_kernels.rounding import round_to

BLOCK_M, BLOCK_N, BLOCK_K = 32, 128, 64


@triton.jit(do_not_specialize=["M"])
def _linear(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_out,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)     # [BM, BK]
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0).to(tl.float32)     # [BK, BN]
        acc = tl.dot(x, w, acc, input_precision="ieee")
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
             round_to(acc, out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def invariant_pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the kernel reads it: [N, K], rows contiguous (no reordering needed)."""
    return weight.contiguous()


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """x [M, K] @ weight.T ([N, K] from invariant_pack) -> [M, N] in x's dtype (the CPU op's signature)."""
    if x.dim() != 2 or x.shape[1] != K or tuple(weight.shape) != (N, K):
        raise ValueError(f"invariant_linear: x must be [M, {K}] and the weight [{N}, {K}]")
    if x.dtype != weight.dtype:
        raise ValueError("invariant_linear: x and the weight must share a dtype")
    x = x.contiguous()
    out = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or N == 0:
        return out
    grid = (triton.cdiv(x.shape[0], BLOCK_M), triton.cdiv(N, BLOCK_N))
    _linear[grid](x, weight, out, x.shape[0], N, K, x.stride(0), weight.stride(0), out.stride(0),
                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out
