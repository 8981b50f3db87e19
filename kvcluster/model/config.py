"""A model's architecture as the forward needs it (`ModelConfig`), and how each family's files describe
it: a GGUF file's metadata (llama, gemma3) or a Hugging Face config.json (llama, mistral, qwen2, qwen3,
gemma3_text). No torch here: the gateway reads a model's config and tokenizer without loading it
(kvcluster.model.files).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvcluster.errors import UnsupportedModel

if TYPE_CHECKING:
    from kvcluster.kv.pool import KVLayout

GGUF_ARCHITECTURES = ("llama", "gemma3")
GEMMA3 = "gemma3"
GEMMA3_HF_MODEL_TYPE = "gemma3_text"
GEMMA3_SLIDING_PATTERN = 6          # layers i with (i + 1) % 6 != 0 are windowed (as llama.cpp and transformers)
GEMMA3_LOCAL_ROPE_THETA = 10000.0   # the windowed layers' rope base (llama.cpp hard-codes it too)
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           GEMMA3_HF_MODEL_TYPE: "Gemma3ForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a llama-family model (llama, mistral, qwen2, qwen3 share this forward)."""

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
    architecture: str = "llama"                         # the family (a Hugging Face model_type)
    rope_freq_factors: tuple[float, ...] | None = None  # [head_dim / 2] divisors of the rotary frequencies (Llama 3)
    # Gemma 3 (kvcluster.model.gemma3): per layer 0 = full attention or the sliding window's length,
    # the rope base of the windowed layers, and the attention scale when it is not head_dim ** -0.5.
    layer_windows: tuple[int, ...] | None = None
    local_rope_theta: float | None = None
    attention_scale: float | None = None

    def kv_layout(self, block_size: int, dtype: str) -> "KVLayout":
        from kvcluster.kv.pool import KVLayout  # torch's: imported only where a layout is built

        return KVLayout(self.num_layers, block_size, self.num_kv_heads, self.head_dim, dtype)



# ---- GGUF ---------------------------------------------------------------------------------------

def gguf_config(field: Callable, path, vocab_size: int, rope_freq_factors: Callable[[], tuple[float, ...] | None]) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata (`field(key, default)` reads one key; `rope_freq_factors()` reads
    Llama 3's rope_freqs tensor, if any)."""
    arch = field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModel(f"{path}: GGUF architecture {arch!r} is not supported; supported: llama "
                               "(Llama 2 and 3, Mistral, SmolLM), gemma3; Qwen2 and Qwen3 load from a Hugging Face "
                               "directory")
    if arch == "gemma3":
        return _gemma3_gguf_config(field, path, vocab_size)
    scaling = field("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise UnsupportedModel(f"{path}: rope scaling {scaling!r} is not supported (Llama 3's rope_freqs tensor is)")
    hidden = int(field("llama.embedding_length"))
    heads = int(field("llama.attention.head_count"))
    head_dim = int(field("llama.rope.dimension_count", hidden // heads))
    return ModelConfig(
        num_layers=int(field("llama.block_count")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(field("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(field("llama.feed_forward_length")),
        vocab_size=vocab_size,
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        rms_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(field("llama.context_length", 2048)),
        rope_freq_factors=rope_freq_factors(),
    )


def _gemma3_gguf_config(field: Callable, path, vocab_size: int) -> ModelConfig:
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
        architecture=GEMMA3,
        layer_windows=layer_windows(layers, int(field("gemma3.attention.sliding_window"))),
        local_rope_theta=GEMMA3_LOCAL_ROPE_THETA, attention_scale=1.0 / math.sqrt(query_scalar),
    )



# ---- Hugging Face -------------------------------------------------------------------------------

def hf_config(raw: dict) -> ModelConfig:
    """ModelConfig from a config.json (transformers 4's rope_theta/rope_scaling or 5's rope_parameters)."""
    arch = raw.get("model_type", "")
    if arch not in SUPPORTED_ARCHITECTURES:
        named = ", ".join(raw.get("architectures") or []) or "none named"
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise UnsupportedModel(f"architecture {arch or '(no model_type)'!r} ({named}) is not supported; "
                               f"supported: {supported}")
    if arch == GEMMA3_HF_MODEL_TYPE:
        return _gemma3_hf_config(raw)
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"{arch}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
    head_dim = raw.get("head_dim") or hidden // heads
    rope = {"rope_theta": raw.get("rope_theta", 10000.0), **(raw.get("rope_scaling") or {}),
            **(raw.get("rope_parameters") or {})}
    return ModelConfig(
        num_layers=raw["num_hidden_layers"], hidden_size=hidden, num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim,
        intermediate_size=raw["intermediate_size"], vocab_size=raw["vocab_size"],
        rope_theta=float(rope["rope_theta"]), rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
        context_length=_context_length(raw), architecture=arch,
        rope_freq_factors=_hf_rope_freq_factors(rope, head_dim),
    )


def _context_length(raw: dict) -> int:
    """max_position_embeddings, capped at the sliding window when one applies: no sequence then
    reaches past the window, so full attention computes exactly what the windowed model would."""
    length = raw.get("max_position_embeddings", 2048)
    window = raw.get("sliding_window")
    applies = raw.get("use_sliding_window", True) if raw["model_type"] in ("qwen2", "qwen3") else True
    return min(length, window) if window and applies else length


def _hf_rope_freq_factors(rope: dict, head_dim: int) -> tuple[float, ...] | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModel(f"rope scaling {kind!r} is not supported (default and llama3 are)")
    return llama3_freq_factors(float(rope["rope_theta"]), head_dim, float(rope["factor"]),
                               float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                               int(rope["original_max_position_embeddings"]))


def llama3_freq_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_context: int) -> tuple[float, ...]:
    """Llama 3's rope scaling as one divisor per rotary frequency (what llama.cpp stores as
    rope_freqs): long wavelengths are divided by `factor`, short ones kept, the band between
    smoothly interpolated."""
    low_wavelen, high_wavelen = original_context / low_freq_factor, original_context / high_freq_factor
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)



def _gemma3_hf_config(raw: dict) -> ModelConfig:
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
    local = rope.get("sliding_attention", {"rope_theta": raw.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)})
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
        context_length=raw.get("max_position_embeddings", 32768), architecture=GEMMA3,
        layer_windows=layer_windows(layers, raw["sliding_window"], raw.get("layer_types")),
        local_rope_theta=float(local["rope_theta"]),
        attention_scale=1.0 / math.sqrt(raw.get("query_pre_attn_scalar", head_dim)),
    )



# ---- Gemma 3 ------------------------------------------------------------------------------------

def layer_windows(num_layers: int, window: int, kinds: list[str] | None = None) -> tuple[int, ...]:
    """Per layer the window (0 = full attention): from transformers' `layer_types` when given, else
    Gemma 3's pattern."""
    if kinds is None:
        kinds = ["full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention" for i in range(num_layers)]
    unknown = set(kinds) - {"full_attention", "sliding_attention"}
    if unknown or len(kinds) != num_layers:
        raise UnsupportedModel(f"gemma3: layer_types {sorted(unknown) or kinds} not understood")
    return tuple(window if kind == "sliding_attention" else 0 for kind in kinds)
