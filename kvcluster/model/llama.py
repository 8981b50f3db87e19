"""The llama forward over a paged KV pool.

Two entry points share the per-layer code: `prefill` (several prompts, each possibly
continuing from KV already in the pool) and `decode` (one new token for each of many sequences
of different lengths). Both write the new tokens' K/V into the pool through a slot mapping and
return logits for the last position of each sequence only.
"""

import importlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcluster.model.attention import CausalAttention, KernelAttention, MaskedAttention, PaddedAttention
from kvcluster.model.config import ModelConfig
from kvcluster.model.kernels import (few_rows_linear_op, invariant_linear_op, invariant_pack_op, kernel_isa,
                                     paged_attention_op, rms_norm_op)
from kvcluster.model.triton_support import triton_unavailable

log = logging.getLogger(__name__)

# Part of every block's fingerprint: bump it when a change to the forward changes K/V bytes.
NUMERICS_VERSION = 2


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor   # [hidden]
    wqkv: torch.Tensor        # [(heads + 2 * kv_heads) * head_dim, hidden]
    wo: torch.Tensor          # [hidden, heads * head_dim]
    ffn_norm: torch.Tensor    # [hidden]
    w_gate_up: torch.Tensor   # [2 * intermediate, hidden]
    w_down: torch.Tensor      # [hidden, intermediate]
    qkv_bias: torch.Tensor | None = None  # [(heads + 2 * kv_heads) * head_dim] (qwen2)
    qk_norm: torch.Tensor | None = None   # [heads + kv_heads, head_dim]: per-head RMSNorm weights of q, k (qwen3)
    post_attn_norm: torch.Tensor | None = None  # [hidden]: norms of the attention's and the MLP's outputs (gemma3)
    post_ffn_norm: torch.Tensor | None = None


@dataclass
class LlamaWeights:
    embed: torch.Tensor       # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor        # [hidden]
    lm_head: torch.Tensor     # [vocab, hidden]; the embedding itself when tied

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "LlamaWeights":
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype).contiguous()
        tied = self.lm_head is self.embed
        layers = [LayerWeights(*(cast(getattr(w, f)) for f in LayerWeights.__dataclass_fields__)) for w in self.layers]
        embed = cast(self.embed)
        return LlamaWeights(embed, layers, cast(self.norm), embed if tied else cast(self.lm_head))

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under a flat name (embed, norm, layers.<i>.<field>); lm_head only when it is not
        the embedding itself. `from_named` inverts it."""
        named = {"embed": self.embed, "norm": self.norm}
        if self.lm_head is not self.embed:
            named["lm_head"] = self.lm_head
        for i, layer in enumerate(self.layers):
            for f in LayerWeights.__dataclass_fields__:
                if (t := getattr(layer, f)) is not None:
                    named[f"layers.{i}.{f}"] = t
        return named

    @classmethod
    def from_named(cls, named: dict[str, torch.Tensor], num_layers: int) -> "LlamaWeights":
        """The weights `named_tensors` gave; KeyError or TypeError when a required tensor is missing."""
        layers = [LayerWeights(**{f: named[f"layers.{i}.{f}"] for f in LayerWeights.__dataclass_fields__
                                  if f"layers.{i}.{f}" in named}) for i in range(num_layers)]
        embed = named["embed"]
        return cls(embed, layers, named["norm"], named.get("lm_head", embed))

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


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
KERNEL_MAX_NEW_TOKENS = 8  # prefill chunks up to this many tokens per sequence take the compiled op
DETERMINISTIC_CHUNK_KEYS = 256  # the deterministic mode's fixed cut of every query's keys (see paged_attention.cpp)
FEW_ROWS_MAX = 3  # matmuls of up to this many rows take the compiled few-rows op (see Linear)


class LlamaModel:
    """Weights plus the forward. Stateless between calls: all KV state lives in the pool tensor."""

    def __init__(self, config: ModelConfig, weights: LlamaWeights, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, deterministic: bool = True, kernels: str = "auto"):
        """kernels: "auto" = the batch-invariant kernels of the device (compiled C++ on CPU, Triton on
        CUDA); "triton" = the Triton kernels wherever they run (on CPU: under TRITON_INTERPRET=1, tests)."""
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.weights = weights.to(self.device, dtype)
        self.scale = config.attention_scale or 1.0 / math.sqrt(config.head_dim)
        self.windows = config.layer_windows  # None: every layer attends its whole context
        self.cos, self.sin = rope_tables(config, rope_frequencies(config), self.device, dtype)
        # The Triton kernels (kvcluster.model.triton_kernels) when batch-invariant numerics run on CUDA.
        self.triton = self._triton_kernels(kernels) if deterministic else None
        cpu = self.device.type == "cpu" and self.triton is None
        # None on CUDA or without a compiler: the plain torch attention path (see attention.py).
        self.paged_op = paged_attention_op() if cpu else None
        # One compiled op instead of torch's chain of seven, on CPU in fp32 and bf16.
        self.rms_op = rms_norm_op() if cpu and dtype in (torch.float32, torch.bfloat16) else None
        if self.triton is not None:
            self.rms_op = self.triton.rms_norm
        # Batch-invariant numerics (see `numerics`): every matmul by the batch-invariant op, every
        # attention through the compiled op with fixed key chunks, every norm through the per-row op.
        able = self.triton is not None or (self.paged_op is not None and self.rms_op is not None
                                           and invariant_linear_op() is not None)
        self.deterministic = deterministic and able
        if deterministic and not able:
            log.warning("batch-invariant numerics need the compiled CPU kernels in float32 or bfloat16, or the Triton "
                        "kernels on CUDA (here %s %s): running the fast kernels, exactness is not guaranteed",
                        self.device, dtype)
        # Per layer: qkv, o, gate_up, down; each multiplied by its fastest kernel on this device
        # (deterministic: the batch-invariant one, over a packed copy that replaces the matrix).
        few_rows = few_rows_linear_op() if cpu else None

        def linear(weight: torch.Tensor) -> Linear:
            if self.triton is not None:
                return Linear.invariant_from(weight, self.triton.invariant_linear, self.triton.invariant_pack)
            return Linear.make(weight, few_rows, self.deterministic)

        self.linears = [tuple(linear(m) for m in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)) for lw in self.weights.layers]
        self.lm_head = linear(self.weights.lm_head)
        if self.deterministic:  # the packed copies are all the forward reads: don't hold the weights twice
            for lw in self.weights.layers:
                lw.wqkv = lw.wo = lw.w_gate_up = lw.w_down = None

    def _triton_kernels(self, kernels: str):
        """The Triton kernels module when this device should and can run it, else None (and why, logged)."""
        if kernels not in ("auto", "triton"):
            raise ValueError(f"kernels must be auto or triton, got {kernels!r}")
        if kernels == "auto" and self.device.type != "cuda":
            return None
        why_not = triton_unavailable(self.device)
        if not why_not and any(self.config.layer_windows or ()):
            why_not = "sliding-window attention (Gemma 3) is not in the Triton kernels yet"
        if why_not and kernels == "triton":
            raise RuntimeError(f"the Triton kernels cannot run here: {why_not}")
        if why_not:
            log.warning("no batch-invariant kernels on %s: %s", self.device, why_not)
            return None
        return importlib.import_module("kvcluster.model.triton_kernels")

    @property
    def numerics(self) -> str:
        """Which arithmetic computes K/V: part of the block fingerprint, since the two modes' bytes differ.
        "batch-invariant": a token's K/V and logits are bitwise the same whatever shares its batch, however
        its prompt was chunked, and whichever path (prefill, cached prefix, decode) computed its context."""
        return "batch-invariant" if self.deterministic else "fast"

    @property
    def numerics_identity(self) -> str:
        """The numerics as the block fingerprint sees them: batch-invariant bytes also depend on the
        instruction set the compiled kernels run (kvcluster.model.kernels.kernel_isa)."""
        if not self.deterministic:
            return self.numerics
        return f"{self.numerics}/{self.triton.identity(self.device) if self.triton else kernel_isa()}"

    # ---- public entry points -------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, kv: torch.Tensor, seqs: Sequence[PrefillSeq]) -> torch.Tensor:
        """Compute and store K/V for each sequence's new tokens; logits of each last token [S, vocab]."""
        bs = kv.shape[3]
        tokens, positions, slots, seq_of, last = [], [], [], [], []
        for i, seq in enumerate(seqs):
            pos = range(seq.num_cached, seq.num_cached + len(seq.token_ids))
            tokens += seq.token_ids
            positions += pos
            slots += (seq.block_table[p // bs] * bs + p % bs for p in pos)
            seq_of += [i] * len(pos)
            last.append(len(tokens) - 1)
        hidden = self._forward(kv, tokens, positions, slots, self._prefill_attention(seqs, seq_of, positions, bs))
        return self._logits(hidden[torch.tensor(last, device=self.device)])

    @torch.inference_mode()
    def decode(self, kv: torch.Tensor, seqs: Sequence[DecodeSeq]) -> torch.Tensor:
        """Advance each sequence by one token; logits [B, vocab]."""
        bs = kv.shape[3]
        tables = [s.block_table[: s.position // bs + 1] for s in seqs]
        positions = [s.position for s in seqs]
        slots = [s.block_table[s.position // bs] * bs + s.position % bs for s in seqs]
        if self.paged_op is not None or self.triton is not None:
            attend = self._paged_attention(tables, range(len(seqs)), positions)
        else:
            attend = PaddedAttention(tables, positions, bs, self.scale, self.dtype, self.device, self.windows)
        return self._logits(self._forward(kv, [s.token_id for s in seqs], positions, slots, attend))

    def _prefill_attention(self, seqs: Sequence[PrefillSeq], seq_of: list[int], positions: list[int], bs: int) -> Attend:
        """The step's attention plan (see kvcluster.model.attention)."""
        cached = any(s.num_cached for s in seqs)
        few_new = cached and max(len(s.token_ids) for s in seqs) <= KERNEL_MAX_NEW_TOKENS
        if self.deterministic or (self.paged_op is not None and few_new):
            tables = [s.block_table[: -(-(s.num_cached + len(s.token_ids)) // bs)] for s in seqs]
            return self._paged_attention(tables, seq_of, positions)
        if len(seqs) == 1 and not cached:
            return CausalAttention(self.windows, self.scale)
        return MaskedAttention([(s.num_cached, len(s.token_ids), s.block_table) for s in seqs], bs, self.device,
                               self.windows, self.scale)

    def _paged_attention(self, tables: Sequence[Sequence[int]], seq_of: Sequence[int], positions: Sequence[int]) -> Attend:
        """Attention over blocks read in place: the Triton kernels' plan, or the compiled CPU op's."""
        if self.triton is not None:
            return self.triton.PagedAttention(tables, seq_of, positions, self.scale, self.device, self._chunk_keys)
        return KernelAttention(self.paged_op, tables, seq_of, positions, self.scale, self.device, self._chunk_keys,
                               self.windows)

    # ---- the layers -----------------------------------------------------------------------

    def _forward(self, kv: torch.Tensor, tokens: list[int], positions: list[int], slots: list[int],
                 attend: Attend) -> torch.Tensor:
        """The layer loop. Everything per step (positions, slots, rope tables, the attention plan) is
        made before it; each layer only computes and writes its own K/V."""
        dev, bs = self.device, kv.shape[3]
        pos_t, slot_t = torch.tensor(positions, device=dev), torch.tensor(slots, device=dev)
        step = Step(kv, slot_t // bs, slot_t % bs, self._step_rope(pos_t), attend)
        x = self._embed(torch.tensor(tokens, device=dev))                           # [T, hidden]
        for layer, (lw, linears) in enumerate(zip(self.weights.layers, self.linears)):
            x = self._layer(x, layer, lw, linears, step)
        return x

    def _step_rope(self, pos_t: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's rotary (cos, sin) rows for the step's positions, [T, 1, D] each."""
        return [(self.cos[pos_t][:, None, :], self.sin[pos_t][:, None, :])] * self.config.num_layers

    def _embed(self, token_t: torch.Tensor) -> torch.Tensor:
        return self.weights.embed[token_t]

    def _layer(self, x: torch.Tensor, layer: int, lw: LayerWeights, linears: tuple, step: "Step") -> torch.Tensor:
        wqkv, wo, w_gate_up, w_down = linears
        x = x + wo(self._attention(self._rms_norm(x, lw.attn_norm), layer, lw, wqkv, step))
        gate, up = w_gate_up(self._rms_norm(x, lw.ffn_norm)).chunk(2, dim=-1)
        return x + w_down(F.silu(gate) * up)

    def _attention(self, h: torch.Tensor, layer: int, lw: LayerWeights, wqkv: "Linear", step: "Step") -> torch.Tensor:
        """Attention of the normed hidden states `h` [T, hidden]: q/k/v, this layer's K/V written to the
        pool, the plan's attention over it; [T, H * D] (before the output projection)."""
        cfg = self.config
        n, nh, nkv, d = h.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = wqkv(h)                                                               # [T, (H + 2KV) * D]
        if lw.qkv_bias is not None:
            qkv = qkv + lw.qkv_bias
        qk = qkv[:, : (nh + nkv) * d].view(n, nh + nkv, d)                          # [T, H + KV, D]
        if lw.qk_norm is not None:
            qk = self._qk_norm(qk, lw.qk_norm)
        qk = _rope(qk, *step.rope[layer]) if self.triton is None else self.triton.rotary(qk, *step.rope[layer])
        q, k = qk[:, :nh], qk[:, nh:]
        v = qkv[:, (nh + nkv) * d:].view(n, nkv, d)                                 # [T, KV, D]
        if self.triton is not None:
            self.triton.write_kv(step.kv, layer, k, v, step.slot_block * step.kv.shape[3] + step.slot_off)
        else:
            kv_layer = step.kv[:, layer]                                             # [N, 2, bs, KV, D] view
            kv_layer[:, 0][step.slot_block, step.slot_off] = k
            kv_layer[:, 1][step.slot_block, step.slot_off] = v
        return step.attend(q, k, v, step.kv, layer)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # x: [T, hidden]
        if self.rms_op is not None:
            return self.rms_op(x.contiguous(), weight, self.config.rms_eps)
        return F.rms_norm(x, (x.shape[-1],), weight, self.config.rms_eps)

    @property
    def _chunk_keys(self) -> int:
        return DETERMINISTIC_CHUNK_KEYS if self.deterministic else 0

    def _qk_norm(self, qk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # qk: [T, heads, D]; weight [heads, D]
        if self.deterministic:  # the per-row op: one row per head, whatever the row count
            d = qk.shape[-1]
            ones = torch.ones(d, dtype=qk.dtype, device=qk.device)
            return self.rms_op(qk.reshape(-1, d).contiguous(), ones, self.config.rms_eps).view_as(qk) * weight
        return F.rms_norm(qk, (qk.shape[-1],), None, self.config.rms_eps) * weight

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._rms_norm(hidden, self.weights.norm)).float()


@dataclass
class Step:
    """What every layer of one forward shares: the pool, where the step's tokens go in it, each
    layer's rotary rows and the attention plan."""

    kv: torch.Tensor
    slot_block: torch.Tensor  # [T]
    slot_off: torch.Tensor    # [T]
    rope: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (cos, sin) [T, 1, D]
    attend: Attend


def rope_tables(config: ModelConfig, inv_freq: torch.Tensor, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [context, head_dim] of every position, rotate-half layout, the rotate-half sign folded
    into sin (x2 * -sin == -x2 * sin exactly)."""
    angles = torch.outer(torch.arange(config.context_length, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    half = config.head_dim // 2
    sin = torch.cat([-angles[:, :half].sin(), angles[:, half:].sin()], dim=-1)
    return angles.cos().to(device, dtype), sin.to(device, dtype)


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] in float64, each divided by its factor when the
    model scales them (Llama 3: `rope_freq_factors`, as GGUF's rope_freqs tensor holds them)."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim))
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float64)
    return inv_freq


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half layout (GGUF's interleaved Q/K rows are un-permuted at load);
    `sin` carries the sign of the rotated first half. x: [T, heads, D]."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
    return x * cos + swapped * sin


class Linear:
    """`x @ weight.T` by the fastest kernel this CPU has for x's row count. Up to FEW_ROWS_MAX rows
    (decode, a warm request's last forward) a matmul only reads the weights: the compiled
    `few_rows_linear` op streams them at close to the memory bandwidth (MKL's gemv and oneDNN reach
    about 40% of it here). More rows: oneDNN with the weight reordered once into its blocked layout
    (plain F.linear reorders a bf16 weight on every call, and MKL's fp32 gemm is 1.2-2.5x slower
    than oneDNN's at 2-16 rows). Without the compiled op: oneDNN for bf16 at every row count, MKL's
    gemv for one fp32 row. CUDA: F.linear.

    invariant=True (the model's deterministic mode): every row count goes through the compiled
    `invariant_linear` op, whose per-element arithmetic does not depend on the row count or on the
    other rows (csrc/invariant_linear.cpp states the contract), over a weight packed once here."""

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor | None, packed_rows: int, few_rows=None,
                 invariant=None):
        self.weight, self.packed, self.packed_rows = weight, packed, packed_rows  # packed from this many rows
        self.few_rows = few_rows  # the compiled op for up to FEW_ROWS_MAX rows, or None
        self.invariant = invariant  # (invariant_linear op, its packed weight), or None
        self.shape = None if weight is None else tuple(weight.shape)  # [out, in]

    @classmethod
    def invariant_from(cls, weight: torch.Tensor, op, pack) -> "Linear":
        """Every row count through a batch-invariant `op(x, pack(weight), N, K)`; the packed copy
        replaces the weight."""
        linear = cls(None, None, 0, invariant=(op, pack(weight)))
        linear.shape = tuple(weight.shape)
        return linear

    @classmethod
    def make(cls, weight: torch.Tensor, few_rows_op=None, invariant: bool = False) -> "Linear":
        if invariant:
            op, pack = invariant_linear_op(), invariant_pack_op()
            if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and op is not None:
                return cls.invariant_from(weight, op, pack)
            log.warning("no batch-invariant matmul for %s %s: results may depend on the batch", weight.device, weight.dtype)
        if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return cls(weight, None, 0)
        few_rows = few_rows_op if weight.dtype in (torch.float32, torch.bfloat16) else None
        if weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return cls(weight, torch.ops.mkldnn._reorder_linear_weight(weight, None), 1, few_rows)
        if weight.dtype == torch.float32:
            return cls(weight, torch.ops.mkldnn._reorder_linear_weight(weight, None), 2, few_rows)
        return cls(weight, None, 0, few_rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in]
        if self.invariant is not None:
            return self.invariant[0](x, self.invariant[1], *self.shape)
        if self.few_rows is not None and x.shape[0] <= FEW_ROWS_MAX:
            return self.few_rows(x, self.weight)
        if self.packed is not None and x.shape[0] >= self.packed_rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.weight)
