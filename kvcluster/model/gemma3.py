"""Gemma 3 (text): the llama forward with Gemma's differences, and its config, weights and chat
template from a GGUF file or a Hugging Face directory (model_type `gemma3_text`).

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
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvcluster.errors import UnsupportedModel
from kvcluster.model.llama import LayerWeights, LlamaModel, ModelConfig, Step, rope_frequencies, rope_tables

ARCHITECTURE = "gemma3"
HF_MODEL_TYPE = "gemma3_text"
SLIDING_PATTERN = 6          # layers i with (i + 1) % 6 != 0 are windowed (as llama.cpp and transformers)
LOCAL_ROPE_THETA = 10000.0   # the windowed layers' rope base (llama.cpp hard-codes it too)
END_OF_TURN = "<end_of_turn>"  # ends a chat turn: a stop token besides <eos>

# Gemma 3's chat template (google/gemma-3-*-it), for files that carry none: a system message is
# prepended to the first user turn, the assistant's role is called "model".
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""


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


def layer_windows(num_layers: int, window: int, kinds: list[str] | None = None) -> tuple[int, ...]:
    """Per layer the window (0 = full attention): from transformers' `layer_types` when given, else
    Gemma 3's pattern."""
    if kinds is None:
        kinds = ["full_attention" if (i + 1) % SLIDING_PATTERN == 0 else "sliding_attention" for i in range(num_layers)]
    unknown = set(kinds) - {"full_attention", "sliding_attention"}
    if unknown or len(kinds) != num_layers:
        raise UnsupportedModel(f"gemma3: layer_types {sorted(unknown) or kinds} not understood")
    return tuple(window if kind == "sliding_attention" else 0 for kind in kinds)


# ---- GGUF -------------------------------------------------------------------------------------

def gguf_config(field: Callable, path, vocab_size: int) -> ModelConfig:
    """ModelConfig from a gemma3 GGUF's metadata (`field(key, default)` reads one key)."""
    scaling = field("gemma3.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and float(field("gemma3.rope.scaling.factor", 1.0)) != 1.0):
        raise UnsupportedModel(f"{path}: rope scaling {scaling!r} of gemma3 is not supported (Gemma 3 270M and 1B have none)")
    hidden, heads, layers = int(field("gemma3.embedding_length")), int(field("gemma3.attention.head_count")), int(field("gemma3.block_count"))
    head_dim = int(field("gemma3.attention.key_length", 256))
    # llama.cpp's rule, since the file does not carry query_pre_attn_scalar: 27B (62 layers) scales
    # queries by (hidden / heads) ** -0.5, every other size by head_dim ** -0.5.
    query_scalar = hidden / heads if layers == 62 else head_dim
    return ModelConfig(
        num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=int(field("gemma3.attention.head_count_kv", heads)), head_dim=head_dim,
        intermediate_size=int(field("gemma3.feed_forward_length")),
        vocab_size=vocab_size,
        rope_theta=float(field("gemma3.rope.freq_base", 1_000_000.0)),
        rms_eps=float(field("gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
        context_length=int(field("gemma3.context_length", 32768)),
        architecture=ARCHITECTURE,
        layer_windows=layer_windows(layers, int(field("gemma3.attention.sliding_window"))),
        local_rope_theta=LOCAL_ROPE_THETA, attention_scale=1.0 / math.sqrt(query_scalar),
    )


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

def hf_config(raw: dict) -> ModelConfig:
    """ModelConfig from a `gemma3_text` config.json (transformers 4's rope_theta and
    rope_local_base_freq, or 5's rope_parameters per layer kind)."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if raw.get(key) is not None:
            raise UnsupportedModel(f"gemma3: {key} is not supported")
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise UnsupportedModel(f"gemma3: hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
    rope = raw.get("rope_parameters") or {}
    full = rope.get("full_attention", {"rope_theta": raw.get("rope_theta", 1_000_000.0), **(raw.get("rope_scaling") or {})})
    local = rope.get("sliding_attention", {"rope_theta": raw.get("rope_local_base_freq", LOCAL_ROPE_THETA)})
    for kind, params in (("full_attention", full), ("sliding_attention", local)):
        if params.get("rope_type", params.get("type", "default")) != "default":
            raise UnsupportedModel(f"gemma3: rope scaling {params.get('rope_type', params.get('type'))!r} of the "
                                   f"{kind} layers is not supported")
    layers, heads = raw["num_hidden_layers"], raw["num_attention_heads"]
    head_dim = raw.get("head_dim", 256)
    return ModelConfig(
        num_layers=layers, hidden_size=raw["hidden_size"], num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim,
        intermediate_size=raw["intermediate_size"], vocab_size=raw["vocab_size"],
        rope_theta=float(full["rope_theta"]), rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
        context_length=raw.get("max_position_embeddings", 32768), architecture=ARCHITECTURE,
        layer_windows=layer_windows(layers, raw["sliding_window"], raw.get("layer_types")),
        local_rope_theta=float(local["rope_theta"]),
        attention_scale=1.0 / math.sqrt(raw.get("query_pre_attn_scalar", head_dim)),
    )


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
