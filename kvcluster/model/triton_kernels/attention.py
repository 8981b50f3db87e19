"""Paged attention in Triton: query tokens over their sequences' keys, read in place from the pool.

The contract of csrc/paged_attention.cpp (the CPU op): q [T, H, D]; the pool [num_blocks, layers, 2,
block_size, KV, D]; block tables [S, W]; seq_of [T] and positions [T]: query t sees keys
0..positions[t] of sequence seq_of[t], already written to the pool. Prefill (with or without a cached
prefix, in one chunk or several) and decode are the same call.

Batch invariance, by construction:
- A program takes a run of up to BLOCK_Q consecutive tokens of one sequence (a prompt's tokens; one
  token in decode) and one KV head; its rows are (token, query head of that KV head's group): GQA
  is folded into the rows, K/V are read once per group, never repeated.
- Keys are cut at multiples of `chunk_keys` (fixed, not chosen by the batch) and each chunk into
  tiles of KEY_TILE keys from the chunk's start; a row's online softmax walks its own tiles in order.
  Tiles past a row's last key are all masked for it and leave its state bitwise unchanged
  (max unchanged, factor exp(0) = 1, zero weights), so a row computes the same bits alone, in any
  run, chunked or not.
- Chunks are merged per token in order by a second kernel, over that token's own chunks only. When
  every query of the call has one chunk the first kernel divides and stores at once: a one-chunk
  merge (max factor exp(0) = 1, sums 0 + x) gives the same bits, so this shortcut is invariant too.
Arithmetic is fp32 whatever the pool's dtype: loads are widened at once (exact), the dots run on
fp32 operands (input_precision="ieee", no TF32), the output is rounded once to q's dtype. That is
also what Triton's interpreter can execute: it stores bfloat16 as raw uint16 and multiplies the bit
patterns in tl.dot (triton-lang/triton#11584), so no bf16 value ever reaches an operation here.
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kvcluster.model.triton_kernels.rounding import round_to

BLOCK_Q = 16    # query tokens of one sequence per program (they share every K/V load)
KEY_TILE = 32   # keys per step of the online softmax
NO_SPLIT = 1 << 30  # chunk_keys == 0: one chunk per query (the whole context)


@triton.jit(do_not_specialize=["layer_offset", "table_width", "chunk_keys", "num_chunks"])
def _attend_chunk(q_ptr, kv_ptr, tables_ptr, positions_ptr, run_start_ptr, run_len_ptr, run_seq_ptr, out_ptr,
                  part_acc_ptr, part_stat_ptr, layer_offset, stride_qt, stride_qh, stride_block, stride_half,
                  stride_row, stride_head, table_width, chunk_keys, num_chunks, scale,
                  NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, KEY_TILE: tl.constexpr, SINGLE_CHUNK: tl.constexpr):
    run, kv_head, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, n_q, seq = tl.load(run_start_ptr + run), tl.load(run_len_ptr + run), tl.load(run_seq_ptr + run)
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    token, member = rows // GROUP_PAD, rows % GROUP_PAD                  # [R]
    live = (token < n_q) & (member < GROUP)
    head = kv_head * GROUP + member
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    position = tl.load(positions_ptr + t0 + token, mask=token < n_q, other=-1)
    first = chunk * chunk_keys
    count = tl.maximum(tl.minimum(position + 1, first + chunk_keys) - first, 0)  # [R] keys of each row here
    count = tl.where(live, count, 0)
    longest = tl.max(count, axis=0)
    q = tl.load(q_ptr + (t0 + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=live[:, None] & dim_ok[None, :], other=0.0).to(tl.float32) * scale       # [R, D]
    top = tl.full([BLOCK_Q * GROUP_PAD], -1e30, tl.float32)  # finite: a row without keys stays NaN-free
    total = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, DIM_PAD], tl.float32)
    base = kv_ptr + layer_offset + kv_head * stride_head
    for j0 in range(0, longest, KEY_TILE):
        offs = j0 + tl.arange(0, KEY_TILE)                                    # within the chunk
        key = first + offs                                                    # position in the sequence
        key_ok = offs < longest
        block = tl.load(tables_ptr + seq * table_width + key // BLOCK_SIZE, mask=key_ok, other=0)
        row_ptr = base + block.to(tl.int64) * stride_block + (key % BLOCK_SIZE) * stride_row   # [KEY_TILE]
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(row_ptr[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)  # [KEY_TILE, D]
        v = tl.load(row_ptr[:, None] + stride_half + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")              # [R, KEY_TILE]
        scores = tl.where(offs[None, :] < count[:, None], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        factor = tl.exp(top - new_top)
        weights = tl.exp(scores - new_top[:, None])
        total = total * factor + tl.sum(weights, axis=1)
        acc = acc * factor[:, None] + tl.dot(weights, v, input_precision="ieee")
        top = new_top
    if SINGLE_CHUNK:  # every query's keys fit one chunk: divide here (the merge of one chunk gives the same bits)
        out = tl.div_rn(acc, tl.where(live, total, 1.0)[:, None])  # padding rows: no 0 / 0
        tl.store(out_ptr + ((t0 + token) * NUM_HEADS + head)[:, None] * HEAD_DIM + dims[None, :],
                 round_to(out, out_ptr.dtype.element_ty), mask=live[:, None] & dim_ok[None, :])
    else:
        part = ((t0 + token) * NUM_HEADS + head) * num_chunks + chunk        # [R]
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=live[:, None] & dim_ok[None, :])
        tl.store(part_stat_ptr + part * 2, top, mask=live)
        tl.store(part_stat_ptr + part * 2 + 1, total, mask=live)


@triton.jit(do_not_specialize=["chunk_keys", "num_chunks"])
def _merge_chunks(out_ptr, positions_ptr, part_acc_ptr, part_stat_ptr, chunk_keys, num_chunks,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    """One token, all its heads: its own chunks 0..position // chunk_keys, in order, rescaled to
    their common max (exp(0) = 1 exactly for the chunk holding it)."""
    token = tl.program_id(0)
    splits = tl.load(positions_ptr + token) // chunk_keys + 1
    heads, dims = tl.arange(0, HEADS_PAD), tl.arange(0, DIM_PAD)
    head_ok, mask = heads < NUM_HEADS, (heads < NUM_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    first = (token * NUM_HEADS + heads) * num_chunks                        # [HP] part of chunk 0
    top = tl.load(part_stat_ptr + first * 2, mask=head_ok, other=0.0)
    for c in range(1, splits):
        top = tl.maximum(top, tl.load(part_stat_ptr + (first + c) * 2, mask=head_ok, other=0.0))
    total = tl.zeros([HEADS_PAD], tl.float32)
    acc = tl.zeros([HEADS_PAD, DIM_PAD], tl.float32)
    for c in range(0, splits):
        factor = tl.exp(tl.load(part_stat_ptr + (first + c) * 2, mask=head_ok, other=0.0) - top)
        total += tl.load(part_stat_ptr + (first + c) * 2 + 1, mask=head_ok, other=1.0) * factor
        acc += tl.load(part_acc_ptr + (first + c)[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0) * factor[:, None]
    out = tl.div_rn(acc, total[:, None])
    tl.store(out_ptr + (token * NUM_HEADS + heads)[:, None] * HEAD_DIM + dims[None, :], round_to(out, out_ptr.dtype.element_ty),
             mask=mask)


def query_runs(seq_of: Sequence[int], positions: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """(start, length, sequence) of each run: up to BLOCK_Q consecutive tokens of one sequence at
    consecutive positions (the CPU op forms its query blocks the same way)."""
    starts, lengths, seqs = [], [], []
    for t, (seq, pos) in enumerate(zip(seq_of, positions)):
        if not starts or lengths[-1] == BLOCK_Q or seqs[-1] != seq or positions[t - 1] != pos - 1:
            starts.append(t)
            lengths.append(0)
            seqs.append(seq)
        lengths[-1] += 1
    return starts, lengths, seqs


class PagedAttention:
    """One step's attention plan, built once from the step's lists and called once per layer (as
    kvcluster.model.attention.KernelAttention is for the CPU op): no host-device sync per layer."""

    def __init__(self, block_tables: Sequence[Sequence[int]], seq_of: Sequence[int], positions: Sequence[int],
                 scale: float, device: torch.device, chunk_keys: int = 0):
        width = max(map(len, block_tables))
        self.tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32,
                                   device=device)  # [S, W]; padding never read
        self.positions = torch.tensor(positions, dtype=torch.int32, device=device)  # [T]
        starts, lengths, seqs = query_runs(seq_of, positions)
        self.runs = torch.tensor([starts, lengths, seqs], dtype=torch.int32, device=device)  # [3, runs]
        self.chunk_keys = chunk_keys or NO_SPLIT
        self.num_chunks = max(positions) // self.chunk_keys + 1
        self.scale = scale

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int) -> torch.Tensor:
        return self.attend(q.contiguous(), kv, layer).flatten(1)

    def attend(self, q: torch.Tensor, kv: torch.Tensor, layer: int) -> torch.Tensor:
        """q [T, H, D] contiguous -> [T, H, D] in q's dtype."""
        num_tokens, num_heads, dim = q.shape
        num_kv, block_size = kv.shape[4], kv.shape[3]
        group = num_heads // num_kv
        single = self.num_chunks == 1
        parts = (1, 1) if single else (num_tokens * num_heads * self.num_chunks, dim)
        part_acc = torch.empty(parts, dtype=torch.float32, device=q.device)           # [T, H, chunks, D]
        part_stat = torch.empty(parts[0], 2, dtype=torch.float32, device=q.device)    # [T, H, chunks, (max, sum)]
        out = torch.empty_like(q)
        dim_pad = triton.next_power_of_2(dim)
        _attend_chunk[(self.runs.shape[1], num_kv, self.num_chunks)](
            q, kv, self.tables, self.positions, self.runs[0], self.runs[1], self.runs[2], out, part_acc, part_stat,
            layer * kv.stride(1), q.stride(0), q.stride(1), kv.stride(0), kv.stride(2), kv.stride(3), kv.stride(4),
            self.tables.shape[1], self.chunk_keys, self.num_chunks, self.scale,
            NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=dim, DIM_PAD=dim_pad,
            BLOCK_SIZE=block_size, BLOCK_Q=BLOCK_Q, KEY_TILE=KEY_TILE, SINGLE_CHUNK=single)
        if not single:
            _merge_chunks[(num_tokens,)](out, self.positions, part_acc, part_stat, self.chunk_keys, self.num_chunks,
                                         NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads), HEAD_DIM=dim,
                                         DIM_PAD=dim_pad)
        return out


def paged_attention(q: torch.Tensor, kv: torch.Tensor, layer: int, tables: torch.Tensor, seq_of: torch.Tensor,
                    positions: torch.Tensor, scale: float, chunk_keys: int) -> torch.Tensor:
    """The CPU op's signature (torch.ops.kvcluster.paged_attention), for tests and one-off calls:
    builds the plan from the tensors (a host sync) and attends. chunk_keys 0: no split."""
    if not (q.dim() == 3 and kv.dim() == 6 and q.shape[2] == kv.shape[5] and q.shape[1] % kv.shape[4] == 0):
        raise ValueError("q must be [T, H, D] and kv the 6-d pool, with H a multiple of its KV heads")
    if q.dtype != kv.dtype:
        raise ValueError("q and kv must share a dtype")
    plan = PagedAttention([row.tolist() for row in tables], seq_of.tolist(), positions.tolist(), scale, q.device,
                          chunk_keys)
    return plan.attend(q.contiguous(), kv, layer)
