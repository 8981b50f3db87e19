"""Load a GGUF file (architectures llama and gemma3): config, dequantized weights, tokenizer data,
file digest.

Llama 3's rope scaling travels in the file as the `rope_freqs.weight` tensor (one divisor per rotary
frequency, as llama.cpp's converter writes it) and is applied; any other rope scaling is refused.
The file's metadata, config and tokenizer are read by kvcluster.model.files (torch-free); this adds the
weights.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvcluster.model import gemma3
from kvcluster.model.config import ModelConfig
from kvcluster.model.files import (VOCABULARY_KEYS, GGUFFile, TokenizerData, default_model_path, file_digest,
                                   gguf_file_config, read_gguf_tokenizer_of)
from kvcluster.model.llama import LayerWeights, LlamaWeights


@dataclass
class GGUFModel:
    """Everything read from one GGUF file."""

    path: Path
    config: ModelConfig
    weights: LlamaWeights
    tokenizer: TokenizerData
    digest: bytes  # xxh3-128 of the file: the model's identity in the fingerprint


def load_gguf(path: str | Path | None = None) -> GGUFModel:
    path = Path(path) if path else default_model_path()
    file = GGUFFile(path, VOCABULARY_KEYS)
    config = gguf_file_config(file)
    return GGUFModel(path, config, _read_weights(file, config), read_gguf_tokenizer_of(file), file_digest(path))


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo the Q/K row permutation GGUF applies for interleaved rotary (back to rotate-half)."""
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _read_weights(file: GGUFFile, config: ModelConfig) -> LlamaWeights:
    tensors = file.tensors()

    def load(name: str) -> np.ndarray:
        return tensors[name]()

    def as_torch(*arrays: np.ndarray) -> torch.Tensor:
        # A copy: dequantize may return read-only views of the memory-mapped file.
        return torch.from_numpy(np.array(np.concatenate(arrays) if len(arrays) > 1 else arrays[0], order="C"))

    if config.architecture == "gemma3":
        layers = [gemma3.gguf_layer(load, as_torch, i, config) for i in range(config.num_layers)]
        embed = as_torch(load("token_embd.weight"))
        return LlamaWeights(embed, layers, as_torch(load("output_norm.weight")), embed)
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
