"""Attention over the paged KV pool, planned once per forward and called by every layer.

A plan is built from the step's sequences before the layer loop (block tables, positions, masks,
gather indices: all tensors made once) and is then called once per layer with that layer's new
q/k/v, after their K/V were written to the pool. Which plan a step gets:
- `KernelAttention`: the compiled op reads each sequence's blocks where they lie (CPU; decode,
  and prefill chunks of a few tokens over a cached prefix: a warm request's last forward).
- `CausalAttention`: one prompt without cached tokens: SDPA's causal kernel over the new K/V,
  the pool is not read at all.
- `MaskedAttention`: any other prefill (several prompts, cached prefixes): one gather of every
  key the step needs and one SDPA with a mask built once per step; no loop per sequence.
- `PaddedAttention`: decode where the op is unavailable (CUDA under --fast-numerics, no compiler):
  each layer gathers the batch's blocks into a padded copy; GQA folded into the matmul.
On CUDA with batch-invariant numerics (the default) the Triton kernels' plan takes KernelAttention's
place (kvcluster.model.triton_kernels.PagedAttention).

Sliding-window layers (Gemma 3): `windows[layer]` > 0 limits a query to its last that many keys
(itself included, as transformers and llama.cpp mask them); 0 or no `windows` is full causal
attention. The compiled op takes the window as an argument; the torch plans build one more mask
per distinct window, once per step.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


Windows = Sequence[int] | None  # per layer: 0 = full attention, w > 0 = the last w keys


def window_of(windows: Windows, layer: int) -> int:
    return windows[layer] if windows else 0


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[Q, K] True where key position <= query position (and within the window when there is one)."""
    visible = key_pos[None, :] <= query_pos[:, None]
    return visible & (key_pos[None, :] > query_pos[:, None] - window) if window else visible


class KernelAttention:
    """Query t attends keys 0..positions[t] of sequence seq_of[t] (its window's, on a windowed layer),
    read in place from the pool."""

    def __init__(self, op, block_tables: Sequence[Sequence[int]], seq_of: Sequence[int], positions: Sequence[int],
                 scale: float, device: torch.device, chunk_keys: int = 0, windows: Windows = None):
        width = max(map(len, block_tables))
        # Rows are padded with block 0: the op never reads past a query's own position.
        self.tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32,
                                   device=device)  # [S, W]
        self.seq_of = torch.tensor(seq_of, dtype=torch.int32, device=device)  # [T]
        self.positions = torch.tensor(positions, dtype=torch.int32, device=device)  # [T]
        self.op, self.scale = op, scale
        self.chunk_keys = chunk_keys  # 0: split as the batch suggests; > 0: fixed cuts (batch-invariant)
        self.windows = windows

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int) -> torch.Tensor:
        window = window_of(self.windows, layer)
        args = (window,) if window else ()  # the op's default: full attention
        out = self.op(q.contiguous(), kv, layer, self.tables, self.seq_of, self.positions, self.scale,
                      self.chunk_keys, *args)  # [T, H, D]
        return out.flatten(1)


class CausalAttention:
    """One prompt from position 0: its own new keys are all it sees."""

    def __init__(self, windows: Windows = None, scale: float | None = None):
        self.windows, self.scale = windows, scale  # scale None: SDPA's 1 / sqrt(head_dim)
        self.masks: dict[int, torch.Tensor] = {}  # window -> [T, T], made by the first layer that needs it

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int) -> torch.Tensor:
        # SDPA takes its fast (flash) CPU kernel only for contiguous 4-D inputs.
        q4, k4, v4 = (x.transpose(0, 1).contiguous()[None] for x in (q, k, v))  # [1, heads, T, D]
        window = window_of(self.windows, layer)
        if window and window < q.shape[0]:
            if window not in self.masks:
                pos = torch.arange(q.shape[0], device=q.device)
                self.masks[window] = window_mask(pos, pos, window)
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=self.masks[window], enable_gqa=True,
                                                 scale=self.scale)
        else:  # no key of this prompt is outside the window
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True, scale=self.scale)
        return out[0].transpose(0, 1).flatten(1)


class MaskedAttention:
    """Several sequences' new tokens in one SDPA: key j is visible to query t when both belong to the
    same sequence and j's position <= t's. Keys are the new ones when nothing was cached, else one
    gather from the pool (cached prefix and new tokens alike) through per-step indices."""

    def __init__(self, seqs: Sequence[tuple[int, int, Sequence[int]]], block_size: int, device: torch.device,
                 windows: Windows = None, scale: float | None = None):
        """seqs: (num_cached, num_new, block_table) per sequence, in the order of the step's tokens."""
        query_seq, query_pos, key_seq, key_pos, key_block, key_off = [], [], [], [], [], []
        self.gather = any(cached for cached, _, _ in seqs)
        for i, (cached, new, table) in enumerate(seqs):
            query_seq += [i] * new
            query_pos += range(cached, cached + new)
            keys = range(cached + new) if self.gather else range(cached, cached + new)
            key_seq += [i] * len(keys)
            key_pos += keys
            key_block += (table[p // block_size] for p in keys)
            key_off += (p % block_size for p in keys)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, device=device)

        self.key_block, self.key_off = tensor(key_block), tensor(key_off)  # [K]
        same_seq = tensor(key_seq)[None, :] == tensor(query_seq)[:, None]
        self.windows, self.scale = windows, scale  # scale None: SDPA's 1 / sqrt(head_dim)
        self.masks = {w: same_seq & window_mask(tensor(query_pos), tensor(key_pos), w)  # window -> [T, K]
                      for w in {0, *(windows or ())}}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int) -> torch.Tensor:
        if self.gather:
            keys = kv[:, layer][self.key_block, :, self.key_off]  # [K, 2, KV, D]
            k, v = keys[:, 0], keys[:, 1]
        q4, k4, v4 = (x.transpose(0, 1).contiguous()[None] for x in (q, k, v))  # [1, heads, T or K, D]
        mask = self.masks[window_of(self.windows, layer)]
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, enable_gqa=True, scale=self.scale)
        return out[0].transpose(0, 1).flatten(1)


class PaddedAttention:
    """One query per sequence over its blocks gathered into a padded copy, per layer (torch-only decode)."""

    def __init__(self, block_tables: Sequence[Sequence[int]], positions: Sequence[int], block_size: int,
                 scale: float, dtype: torch.dtype, device: torch.device, windows: Windows = None):
        width = max(map(len, block_tables))
        # Padding blocks repeat the first block; the mask hides them.
        self.tables = torch.tensor([list(t) + [t[0]] * (width - len(t)) for t in block_tables], device=device)
        key_pos = torch.arange(width * block_size, device=device)
        pos = torch.tensor(positions, device=device)
        self.windows = windows
        self.masks = {}  # window -> [B, 1, 1, S] additive mask
        for window in {0, *(windows or ())}:
            mask = torch.zeros(len(positions), 1, 1, width * block_size, device=device, dtype=dtype)
            mask.masked_fill_(~window_mask(pos, key_pos, window)[:, None, None, :], float("-inf"))
            self.masks[window] = mask
        self.scale = scale

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int) -> torch.Tensor:
        b, nh, d = q.shape
        nkv = k.shape[1]
        blocks = kv[:, layer][self.tables]                          # [B, nb, 2, bs, KV, D]
        keys = blocks[:, :, 0].flatten(1, 2).permute(0, 2, 3, 1)   # [B, KV, D, S]
        values = blocks[:, :, 1].flatten(1, 2).transpose(1, 2)     # [B, KV, S, D]
        mask = self.masks[window_of(self.windows, layer)]
        scores = torch.matmul(q.view(b, nkv, nh // nkv, d), keys) * self.scale + mask  # [B, KV, G, S]
        out = torch.matmul(torch.softmax(scores, dim=-1), values)   # [B, KV, G, D]
        return out.reshape(b, nh * d)
