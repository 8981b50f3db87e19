"""Gemma 3 (text): the llama forward with Gemma's differences, and its weights from a GGUF file or a
Hugging Face directory (model_type `gemma3_text`; its config is read by kvcluster.model.config, its chat
template by kvcluster.model.files).

What differs from llama: the embedding is scaled by sqrt(hidden); every layer has four norms (before
and after attention, before and after the MLP); q and k get a per-head RMSNorm; the MLP is GeGLU
(gelu with the tanh approximation); five layers in six attend only their last `sliding_window`
keys and rotate with their own rope base (10,000), the sixth attends everything with the global
base (1,000,000); the LM head is the embedding. Gemma's RMSNorm multiplies by (1 + weight): GGUF
files store 1 + weight already (llama.cpp's converter adds it), Hugging Face ones store the weight
and 1 is added here, in float32, as transformers does at every call.

Every layer keeps all its K/V in the pool (the layout is the one every family shares); a windowed
layer only masks the keys before its window, so a prefix hit reads the very bytes a cold run wrote.
"""

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvcluster.model.config import ModelConfig
from kvcluster.model.llama import LayerWeights, LlamaModel, Step, rope_frequencies, rope_tables

class Gemma3Model(LlamaModel):
    """The llama forward with Gemma 3's embedding scale, norms, GeGLU and per-layer rope bases."""

    def __init__(self, config: ModelConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        local = dataclasses.replace(config, rope_theta=config.local_rope_theta, rope_freq_factors=None)
        self.local_cos, self.local_sin = rope_tables(config, rope_frequencies(local), self.device, self.dtype)
        # transformers rounds the scale to the weights' dtype before multiplying: so do we.
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=self.dtype, device=self.device)

    def _step_rope(self, pos_t: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        full = (self.cos[pos_t][:, None, :], self.sin[pos_t][:, None, :])
        local = (self.local_cos[pos_t][:, None, :], self.local_sin[pos_t][:, None, :])
        return [local if window else full for window in self.windows]

    def _embed(self, token_t: torch.Tensor) -> torch.Tensor:
        return self.weights.embed[token_t] * self.embed_scale

    def _layer(self, x: torch.Tensor, layer: int, lw: LayerWeights, linears: tuple, step: Step) -> torch.Tensor:
        wqkv, wo, w_gate_up, w_down = linears
        attended = wo(self._attention(self._rms_norm(x, lw.attn_norm), layer, lw, wqkv, step))
        x = x + self._rms_norm(attended, lw.post_attn_norm)
        gate, up = w_gate_up(self._rms_norm(x, lw.ffn_norm)).chunk(2, dim=-1)
        return x + self._rms_norm(w_down(F.gelu(gate, approximate="tanh") * up), lw.post_ffn_norm)


# ---- GGUF -------------------------------------------------------------------------------------

def gguf_layer(load: Callable, as_torch: Callable, i: int, config: ModelConfig) -> LayerWeights:
    """Layer i of a gemma3 GGUF (llama.cpp writes Gemma's Q/K rows unpermuted: NEOX-style rope)."""
    p = f"blk.{i}."
    return LayerWeights(
        attn_norm=as_torch(load(p + "attn_norm.weight")),
        wqkv=as_torch(load(p + "attn_q.weight"), load(p + "attn_k.weight"), load(p + "attn_v.weight")),
        wo=as_torch(load(p + "attn_output.weight")),
        ffn_norm=as_torch(load(p + "ffn_norm.weight")),
        w_gate_up=as_torch(load(p + "ffn_gate.weight"), load(p + "ffn_up.weight")),
        w_down=as_torch(load(p + "ffn_down.weight")),
        qk_norm=_qk_norm(as_torch(load(p + "attn_q_norm.weight")), as_torch(load(p + "attn_k_norm.weight")), config),
        post_attn_norm=as_torch(load(p + "post_attention_norm.weight")),
        post_ffn_norm=as_torch(load(p + "post_ffw_norm.weight")),
    )


def _qk_norm(q_norm: torch.Tensor, k_norm: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    d = config.head_dim
    return torch.cat([q_norm.expand(config.num_heads, d), k_norm.expand(config.num_kv_heads, d)])


# ---- Hugging Face -----------------------------------------------------------------------------

def hf_layer(tensors, p: str, config: ModelConfig) -> LayerWeights:
    """Layer weights under prefix `p` (model.layers.i.) of a Hugging Face checkpoint (`tensors.take(name)`
    gives one); norms + 1."""
    take = tensors.take

    def norm(name: str) -> torch.Tensor:
        return 1.0 + take(p + name).float()

    attn = p + "self_attn."
    return LayerWeights(
        attn_norm=norm("input_layernorm.weight"),
        wqkv=torch.cat([take(attn + f"{x}_proj.weight") for x in "qkv"]),
        wo=take(attn + "o_proj.weight"),
        ffn_norm=norm("pre_feedforward_layernorm.weight"),
        w_gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
        w_down=take(p + "mlp.down_proj.weight"),
        qk_norm=_qk_norm(norm("self_attn.q_norm.weight"), norm("self_attn.k_norm.weight"), config),
        post_attn_norm=norm("post_attention_layernorm.weight"),
        post_ffn_norm=norm("post_feedforward_layernorm.weight"),
    )
