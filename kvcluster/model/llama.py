"""The llama forward over a paged KV pool.

Two entry points share the per-layer code: `prefill` (several prompts, each possibly
continuing from KV already in the pool) and `decode` (one new token for each of many sequences
of different lengths). Both write the new tokens' K/V into the pool through a slot mapping and
return logits for the last position of each sequence only.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcluster.kvpool import KVLayout


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a llama-family model."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    context_length: int

    def kv_layout(self, block_size: int, dtype: str) -> KVLayout:
        return KVLayout(self.num_layers, block_size, self.num_kv_heads, self.head_dim, dtype)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor   # [hidden]
    wqkv: torch.Tensor        # [(heads + 2 * kv_heads) * head_dim, hidden]
    wo: torch.Tensor          # [hidden, heads * head_dim]
    ffn_norm: torch.Tensor    # [hidden]
    w_gate_up: torch.Tensor   # [2 * intermediate, hidden]
    w_down: torch.Tensor      # [hidden, intermediate]


@dataclass
class LlamaWeights:
    embed: torch.Tensor       # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor        # [hidden]
    lm_head: torch.Tensor     # [vocab, hidden]; the embedding itself when tied

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "LlamaWeights":
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()
        tied = self.lm_head is self.embed
        layers = [LayerWeights(*(cast(getattr(w, f)) for f in LayerWeights.__dataclass_fields__)) for w in self.layers]
        embed = cast(self.embed)
        return LlamaWeights(embed, layers, cast(self.norm), embed if tied else cast(self.lm_head))

    @classmethod
    def random(cls, config: ModelConfig, seed: int) -> "LlamaWeights":
        """Seeded random weights (fp32) for fast tests of the engine's mechanics."""
        gen = torch.Generator().manual_seed(seed)
        h, d = config.hidden_size, config.head_dim

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])

        def norm() -> torch.Tensor:
            return 1.0 + 0.1 * torch.randn(h, generator=gen)

        layers = [LayerWeights(
            attn_norm=norm(),
            wqkv=rand((config.num_heads + 2 * config.num_kv_heads) * d, h),
            wo=rand(h, config.num_heads * d),
            ffn_norm=norm(),
            w_gate_up=rand(2 * config.intermediate_size, h),
            w_down=rand(h, config.intermediate_size),
        ) for _ in range(config.num_layers)]
        embed = torch.randn(config.vocab_size, h, generator=gen)
        return cls(embed, layers, norm(), embed)


@dataclass
class PrefillSeq:
    """One prompt (or chunk of one) to prefill: `token_ids` continue `num_cached` tokens already in the pool."""

    token_ids: Sequence[int]
    num_cached: int
    block_table: Sequence[int]


@dataclass
class DecodeSeq:
    """One sequence to advance by one token: `token_id` sits at position `position`."""

    token_id: int
    position: int
    block_table: Sequence[int]


Attend = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LlamaModel:
    """Weights plus the forward. Stateless between calls: all KV state lives in the pool tensor."""

    def __init__(self, config: ModelConfig, weights: LlamaWeights, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.weights = weights.to(self.device, dtype)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim))
        angles = torch.outer(torch.arange(config.context_length, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [context, head_dim], rotate-half layout
        self.cos = angles.cos().to(self.device, dtype)
        self.sin = angles.sin().to(self.device, dtype)

    # ---- public entry points -------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, kv: torch.Tensor, seqs: Sequence[PrefillSeq]) -> torch.Tensor:
        """Compute and store K/V for each sequence's new tokens; logits of each last token [S, vocab]."""
        bs = kv.shape[3]
        tokens, positions, slots, bounds = [], [], [], []
        start = 0
        for seq in seqs:
            n = len(seq.token_ids)
            pos = range(seq.num_cached, seq.num_cached + n)
            tokens.extend(seq.token_ids)
            positions.extend(pos)
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in pos)
            bounds.append((start, start + n, seq))
            start += n
        dev = self.device
        pos_t = torch.tensor(positions, device=dev)
        slot_t = torch.tensor(slots, device=dev)
        tables = [torch.tensor(seq.block_table[: -(-(seq.num_cached + e - s) // bs)], device=dev)
                  for s, e, seq in bounds]

        def attend(q: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
            return torch.cat([self._attend_one(q[s:e], kv_layer, table, seq.num_cached)
                              for (s, e, seq), table in zip(bounds, tables)])

        hidden = self._forward(kv, torch.tensor(tokens, device=dev), pos_t, slot_t, attend)
        last = torch.tensor([e - 1 for _, e, _ in bounds], device=dev)
        return self._logits(hidden[last])

    @torch.inference_mode()
    def decode(self, kv: torch.Tensor, seqs: Sequence[DecodeSeq]) -> torch.Tensor:
        """Advance each sequence by one token; logits [B, vocab]."""
        bs = kv.shape[3]
        dev = self.device
        width = max(len(s.block_table) for s in seqs)
        # Padding blocks repeat the first block; the mask hides them.
        tables = torch.tensor([list(s.block_table) + [s.block_table[0]] * (width - len(s.block_table)) for s in seqs], device=dev)
        pos_t = torch.tensor([s.position for s in seqs], device=dev)
        slot_t = torch.tensor([s.block_table[s.position // bs] * bs + s.position % bs for s in seqs], device=dev)
        key_pos = torch.arange(width * bs, device=dev)
        mask = torch.zeros(len(seqs), 1, 1, width * bs, device=dev, dtype=self.dtype)  # [B, 1, 1, S]
        mask.masked_fill_(key_pos[None, None, None, :] > pos_t[:, None, None, None], float("-inf"))

        def attend(q: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
            return self._attend_batch(q, kv_layer, tables, mask)

        hidden = self._forward(kv, torch.tensor([s.token_id for s in seqs], device=dev), pos_t, slot_t, attend)
        return self._logits(hidden)

    # ---- the layers -----------------------------------------------------------------------

    def _forward(self, kv: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, attend: Attend) -> torch.Tensor:
        cfg, w = self.config, self.weights
        n, nh, nkv, d = tokens.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bs = kv.shape[3]
        slot_block, slot_off = slots // bs, slots % bs
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]  # [T, 1, D]
        x = w.embed[tokens]  # [T, hidden]
        for layer_idx, lw in enumerate(w.layers):
            h = self._rms_norm(x, lw.attn_norm)
            q, k, v = F.linear(h, lw.wqkv).split([nh * d, nkv * d, nkv * d], dim=-1)
            q = _rope(q.view(n, nh, d), cos, sin)           # [T, H, D]
            k = _rope(k.view(n, nkv, d), cos, sin)          # [T, KV, D]
            kv_layer = kv[:, layer_idx]                     # [N, 2, bs, KV, D] view of the pool
            kv_layer[:, 0][slot_block, slot_off] = k
            kv_layer[:, 1][slot_block, slot_off] = v.view(n, nkv, d)
            x = x + F.linear(attend(q, kv_layer), lw.wo)
            gate, up = F.linear(self._rms_norm(x, lw.ffn_norm), lw.w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, lw.w_down)
        return x

    def _attend_one(self, q: torch.Tensor, kv_layer: torch.Tensor, table: torch.Tensor, num_cached: int) -> torch.Tensor:
        """Causal attention of one sequence's new tokens over its cached + new keys. q: [T, H, D]."""
        t, nh, d = q.shape
        ctx = num_cached + t
        blocks = kv_layer[table]                                    # [nb, 2, bs, KV, D]
        # SDPA takes its fast (flash) CPU kernel only for contiguous 4-D inputs.
        k = blocks[:, 0].flatten(0, 1)[:ctx].transpose(0, 1).contiguous()[None]  # [1, KV, ctx, D]
        v = blocks[:, 1].flatten(0, 1)[:ctx].transpose(0, 1).contiguous()[None]
        q4 = q.transpose(0, 1).contiguous()[None]                   # [1, H, T, D]
        if num_cached == 0:
            out = F.scaled_dot_product_attention(q4, k, v, is_causal=True, enable_gqa=True)
        else:
            key_pos = torch.arange(ctx, device=q.device)
            query_pos = torch.arange(num_cached, ctx, device=q.device)
            allowed = key_pos[None, :] <= query_pos[:, None]        # [T, ctx]
            out = F.scaled_dot_product_attention(q4, k, v, attn_mask=allowed, enable_gqa=True)
        out = out[0]
        return out.transpose(0, 1).reshape(t, nh * d)

    def _attend_batch(self, q: torch.Tensor, kv_layer: torch.Tensor, tables: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One query token per sequence over its padded keys; GQA folded into the matmul. q: [B, H, D]."""
        b, nh, d = q.shape
        nkv = self.config.num_kv_heads
        blocks = kv_layer[tables]                                   # [B, nb, 2, bs, KV, D]
        k = blocks[:, :, 0].flatten(1, 2).permute(0, 2, 3, 1)      # [B, KV, D, S]
        v = blocks[:, :, 1].flatten(1, 2).transpose(1, 2)          # [B, KV, S, D]
        scores = torch.matmul(q.view(b, nkv, nh // nkv, d), k) * self.scale + mask  # [B, KV, G, S]
        out = torch.matmul(torch.softmax(scores, dim=-1), v)       # [B, KV, G, D]
        return out.reshape(b, nh * d)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.config.rms_eps)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self._rms_norm(hidden, self.weights.norm), self.weights.lm_head).float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half layout (GGUF's interleaved Q/K rows are un-permuted at load)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
