"""Rotary embedding and the KV write into pool slots, in Triton (the engine's per-token element work).

Rotary follows the engine's convention (kvcluster.model.llama._rope): rotate-half layout (GGUF's
interleaved Q/K rows are un-permuted at load), cos and sin tables in the model's dtype with the sign
of the rotated first half folded into sin: out = x * cos + [x2, x1] * sin. Each product and the sum
are rounded to the model's dtype as torch's elementwise ops round them, so the result is the
torch expression's, bit for bit, where the compiler does not fuse the multiply-add (the interpreter
never does; a GPU build may, per element, which keeps it batch-invariant).

The KV write copies each token's K and V rows into its slot: block slot // block_size, row
slot % block_size of the given layer (pool [num_blocks, layers, 2, block_size, KV, D]).
"""

import torch
import triton
import triton.language as tl

from kvcluster.model.triton_kernels.rounding import round_to


BLOCK_T = 8  # tokens per program (rotary: all their heads; the KV write: their K and V rows)


@triton.jit(do_not_specialize=["num_tokens"])
def _rotary(x_ptr, cos_ptr, sin_ptr, out_ptr, num_tokens, stride_xt, stride_xh, stride_cos, stride_sin,
            NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
            BLOCK_T: tl.constexpr):
    rows = tl.arange(0, BLOCK_T * HEADS_PAD)                                  # (token, head)
    token = tl.program_id(0) * BLOCK_T + rows // HEADS_PAD
    head = rows % HEADS_PAD
    dims = tl.arange(0, DIM_PAD)
    mask = ((token < num_tokens) & (head < NUM_HEADS))[:, None] & (dims < HEAD_DIM)[None, :]
    token = token.to(tl.int64)
    row = x_ptr + token[:, None] * stride_xt + head[:, None] * stride_xh
    x = tl.load(row + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    swapped = tl.load(row + ((dims + HEAD_DIM // 2) % HEAD_DIM)[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token[:, None] * stride_cos + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token[:, None] * stride_sin + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    out = round_to(x * cos, dtype).to(tl.float32) + round_to(swapped * sin, dtype).to(tl.float32)
    tl.store(out_ptr + (token * NUM_HEADS + head)[:, None] * HEAD_DIM + dims[None, :], round_to(out, dtype), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (rows may be strided, the last dim contiguous), cos/sin [T, D] (or [T, 1, D])
    -> a new contiguous [T, heads, D]."""
    num_tokens, num_heads, dim = x.shape
    cos, sin = cos.reshape(num_tokens, dim), sin.reshape(num_tokens, dim)
    if x.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("rotary: the head dimension must be contiguous")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_tokens:
        _rotary[(triton.cdiv(num_tokens, BLOCK_T),)](
            x, cos, sin, out, num_tokens, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
            NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads), HEAD_DIM=dim,
            DIM_PAD=triton.next_power_of_2(dim), BLOCK_T=BLOCK_T)
    return out


@triton.jit(do_not_specialize=["num_tokens", "layer_offset"])
def _write_kv(kv_ptr, k_ptr, v_ptr, slots_ptr, num_tokens, layer_offset, stride_k, stride_v, stride_block,
              stride_half, stride_row, BLOCK_SIZE: tl.constexpr, ROW: tl.constexpr, ROW_PAD: tl.constexpr,
              BLOCK_T: tl.constexpr):
    token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, ROW_PAD)
    mask = (token < num_tokens)[:, None] & (cols < ROW)[None, :]
    slot = tl.load(slots_ptr + token, mask=token < num_tokens, other=0).to(tl.int64)
    token = token.to(tl.int64)
    target = (kv_ptr + layer_offset + (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_row)[:, None] \
        + cols[None, :]
    tl.store(target, tl.load(k_ptr + token[:, None] * stride_k + cols[None, :], mask=mask), mask=mask)
    tl.store(target + stride_half, tl.load(v_ptr + token[:, None] * stride_v + cols[None, :], mask=mask), mask=mask)


def write_kv(kv: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store k, v [T, KV, D] (each token's KV * D values contiguous) into the pool at `slots` [T]."""
    num_tokens = k.shape[0]
    if k.shape != v.shape or k.shape[1:] != kv.shape[4:] or k.dtype != kv.dtype or v.dtype != kv.dtype:
        raise ValueError("write_kv: k and v must be [T, KV, D] of the pool's shape and dtype")
    if not kv.is_contiguous() or (num_tokens and not (k[0].is_contiguous() and v[0].is_contiguous())):
        raise ValueError("write_kv: each token's K and V rows, and the pool, must be contiguous")
    if num_tokens:
        row = kv.shape[4] * kv.shape[5]
        _write_kv[(triton.cdiv(num_tokens, BLOCK_T),)](
            kv, k, v, slots, num_tokens, layer * kv.stride(1), k.stride(0), v.stride(0), kv.stride(0), kv.stride(2),
            kv.stride(3), BLOCK_SIZE=kv.shape[3], ROW=row, ROW_PAD=triton.next_power_of_2(row), BLOCK_T=BLOCK_T)
