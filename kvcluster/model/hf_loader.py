"""Load a Hugging Face checkpoint directory: config.json, *.safetensors (one file or sharded with
model.safetensors.index.json; bf16, fp16 or fp32), tokenizer.json and the chat template.

Families: llama (Llama 2, Llama 3.x with its `llama3` rope scaling, SmolLM), mistral, qwen2 (q/k/v
biases), qwen3 (per-head q/k RMSNorm) and gemma3_text (kvcluster.model.gemma3), tied or untied
embeddings. Hugging Face stores Q/K rows in
the rotate-half order the forward uses, so they load as they are. Every tensor of the checkpoint
must be used: a weight this forward has no place for (an o_proj bias, MLP biases) is refused rather
than silently dropped.
"""

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from tokenizers import Tokenizer

from kvcluster.errors import UnsupportedModel
from kvcluster.model import gemma3
from kvcluster.model.llama import LayerWeights, LlamaWeights, ModelConfig

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           gemma3.HF_MODEL_TYPE: "Gemma3ForCausalLM"}
INDEX_FILE = "model.safetensors.index.json"
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer older checkpoints saved; recomputed
DIGEST_SAMPLES = 16          # byte ranges sampled from each safetensors file's data
DIGEST_SAMPLE_BYTES = 4096


@dataclass
class HFTokenizerFiles:
    """The tokenizer as the directory stores it."""

    tokenizer_json: str          # tokenizer.json, as the `tokenizers` package serialises it
    bos_id: int | None
    eos_id: int
    chat_template: str | None
    add_bos: bool = False        # a plain prompt starts with BOS (tokenizer_config.json's add_bos_token)


@dataclass
class HFModel:
    """Everything read from one checkpoint directory (the shape of gguf_loader.GGUFModel)."""

    path: Path
    config: ModelConfig
    weights: LlamaWeights
    tokenizer: HFTokenizerFiles
    digest: bytes  # checkpoint_digest: the weights' identity in the fingerprint


def is_hf_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_hf(path: str | Path) -> HFModel:
    path = Path(path)
    raw = _read_json(path / "config.json")
    config = hf_config(raw)
    weights = _read_weights(path, config, raw)
    return HFModel(path, config, weights, _read_tokenizer(path, raw), checkpoint_digest(path))


def read_hf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a directory without touching its weights."""
    return hf_config(_read_json(Path(path) / "config.json"))


def hf_config(raw: dict) -> ModelConfig:
    """ModelConfig from a config.json (transformers 4's rope_theta/rope_scaling or 5's rope_parameters)."""
    arch = raw.get("model_type", "")
    if arch not in SUPPORTED_ARCHITECTURES:
        named = ", ".join(raw.get("architectures") or []) or "none named"
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise UnsupportedModel(f"architecture {arch or '(no model_type)'!r} ({named}) is not supported; "
                               f"supported: {supported}")
    if arch == gemma3.HF_MODEL_TYPE:
        return gemma3.hf_config(raw)
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
        rope_freq_factors=_rope_freq_factors(rope, head_dim),
    )


def _context_length(raw: dict) -> int:
    """max_position_embeddings, capped at the sliding window when one applies: no sequence then
    reaches past the window, so full attention computes exactly what the windowed model would."""
    length = raw.get("max_position_embeddings", 2048)
    window = raw.get("sliding_window")
    applies = raw.get("use_sliding_window", True) if raw["model_type"] in ("qwen2", "qwen3") else True
    return min(length, window) if window and applies else length


def _rope_freq_factors(rope: dict, head_dim: int) -> tuple[float, ...] | None:
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


# ---- weights ---------------------------------------------------------------------------------

def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's files: those the shard index names, else every *.safetensors."""
    if (path / INDEX_FILE).is_file():
        return sorted({path / name for name in _read_json(path / INDEX_FILE)["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{path}: no *.safetensors files (only safetensors checkpoints are supported)")
    return files


class _Tensors:
    """Tensors by name across the checkpoint's files (memory-mapped by safe_open); remembers which
    were taken so unused ones can be refused."""

    def __init__(self, files: list[Path], stack: ExitStack):
        self.file_of = {}
        for file in files:
            handle = stack.enter_context(safe_open(file, framework="pt"))
            self.file_of.update((name, handle) for name in handle.keys())
        self.taken: set[str] = set()

    def take(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise UnsupportedModel(f"checkpoint has no tensor {name!r}")
        self.taken.add(name)
        return self.file_of[name].get_tensor(name)

    def take_optional(self, name: str) -> torch.Tensor | None:
        return self.take(name) if name in self.file_of else None

    def check_all_taken(self) -> None:
        left = sorted(n for n in self.file_of.keys() - self.taken if not n.endswith(IGNORED_TENSOR_SUFFIXES))
        if left:
            raise UnsupportedModel(f"{len(left)} tensors this forward has no place for, e.g. {', '.join(left[:4])}")


def _read_weights(path: Path, config: ModelConfig, raw: dict) -> LlamaWeights:
    """Weights in the checkpoint's own dtype (LlamaModel casts them to the serving dtype once)."""
    with ExitStack() as stack:
        tensors = _Tensors(safetensors_files(path), stack)
        read_layer = gemma3.hf_layer if config.architecture == gemma3.ARCHITECTURE else _read_layer
        layers = [read_layer(tensors, f"model.layers.{i}.", config) for i in range(config.num_layers)]
        embed = tensors.take("model.embed_tokens.weight")
        norm = tensors.take("model.norm.weight")
        if config.architecture == gemma3.ARCHITECTURE:
            norm = 1.0 + norm.float()  # Gemma's RMSNorm multiplies by 1 + weight
        lm_head = tensors.take_optional("lm_head.weight")
        tensors.check_all_taken()
    tied = raw.get("tie_word_embeddings", False) or lm_head is None
    return LlamaWeights(embed, layers, norm, embed if tied else lm_head)


def _read_layer(tensors: _Tensors, p: str, config: ModelConfig) -> LayerWeights:
    attn = [p + f"self_attn.{x}_proj." for x in "qkv"]
    biases = [tensors.take_optional(a + "bias") for a in attn]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise UnsupportedModel(f"{p}self_attn: biases on only some of q, k, v")
    q_norm, k_norm = (tensors.take_optional(p + f"self_attn.{x}_norm.weight") for x in "qk")
    if (q_norm is None) != (k_norm is None):
        raise UnsupportedModel(f"{p}self_attn: a norm on only one of q, k")
    d = config.head_dim
    return LayerWeights(
        attn_norm=tensors.take(p + "input_layernorm.weight"),
        wqkv=torch.cat([tensors.take(a + "weight") for a in attn]),
        wo=tensors.take(p + "self_attn.o_proj.weight"),
        ffn_norm=tensors.take(p + "post_attention_layernorm.weight"),
        w_gate_up=torch.cat([tensors.take(p + "mlp.gate_proj.weight"), tensors.take(p + "mlp.up_proj.weight")]),
        w_down=tensors.take(p + "mlp.down_proj.weight"),
        qkv_bias=None if biases[0] is None else torch.cat(biases),
        qk_norm=None if q_norm is None else torch.cat([q_norm.expand(config.num_heads, d),
                                                       k_norm.expand(config.num_kv_heads, d)]),
    )


# ---- identity --------------------------------------------------------------------------------

def checkpoint_digest(path: str | Path) -> bytes:
    """xxh3-128 of what identifies the weights without reading them all: config.json's bytes, then
    for each safetensors file (sorted by name) its name, its size, its whole header (the 8-byte
    length and the JSON of every tensor's name, dtype, shape and offsets) and DIGEST_SAMPLES ranges
    of DIGEST_SAMPLE_BYTES spread evenly over its data, first and last bytes included. Reads well
    under a megabyte per file, whatever the checkpoint's size."""
    path = Path(path)
    h = xxhash.xxh3_128()
    h.update((path / "config.json").read_bytes())
    for file in safetensors_files(path):
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f"{file.name}|{size}|".encode())
            h.update(f.read(header_len))
            data_start = 8 + header_len
            span = max(size - data_start - DIGEST_SAMPLE_BYTES, 0)
            for i in range(DIGEST_SAMPLES):
                f.seek(data_start + span * i // (DIGEST_SAMPLES - 1))
                h.update(f.read(DIGEST_SAMPLE_BYTES))
    return h.digest()


# ---- tokenizer -------------------------------------------------------------------------------

def _read_tokenizer(path: Path, raw: dict) -> HFTokenizerFiles:
    if not (path / "tokenizer.json").is_file():
        raise UnsupportedModel(f"{path}: no tokenizer.json (the tokenizer must be in the `tokenizers` format)")
    tokenizer_json = (path / "tokenizer.json").read_text()
    settings = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    tokenizer = Tokenizer.from_str(tokenizer_json)
    bos_id = _special_id(settings.get("bos_token"), raw.get("bos_token_id"), tokenizer)
    eos_id = _special_id(settings.get("eos_token"), raw.get("eos_token_id"), tokenizer)
    if eos_id is None:
        raise UnsupportedModel(f"{path}: no end-of-sequence token (eos_token in tokenizer_config.json "
                               "or eos_token_id in config.json)")
    return HFTokenizerFiles(tokenizer_json, bos_id, eos_id, _chat_template(path, settings),
                            bool(settings.get("add_bos_token", False)))


def _special_id(token: str | dict | None, config_id: int | list | None, tokenizer: Tokenizer) -> int | None:
    """A special token's id: tokenizer_config.json's token (a string or an AddedToken dict), else
    config.json's id (the first one when it lists several)."""
    content = token.get("content") if isinstance(token, dict) else token
    if content is not None and tokenizer.token_to_id(content) is not None:
        return tokenizer.token_to_id(content)
    if isinstance(config_id, list):
        return config_id[0] if config_id else None
    return config_id


def _chat_template(path: Path, settings: dict) -> str | None:
    """chat_template.jinja (transformers 5 saves it there), else tokenizer_config.json's
    chat_template (a string, or a list of named ones of which "default" is used)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = settings.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)
