"""Load a GGUF file (architectures llama and gemma3): config, dequantized weights, tokenizer data,
file digest.

Llama 3's rope scaling travels in the file as the `rope_freqs.weight` tensor (one divisor per rotary
frequency, as llama.cpp's converter writes it) and is applied; any other rope scaling is refused.
The file's metadata, config and tokenizer are read by kvcluster.model.files (torch-free); this adds the
weights.

Dequantizing takes seconds (~3 s for SmolLM2-135M on a 2-core CPU, about half a worker's start), so the
result is kept in the build cache (kvcluster.model.build_cache: `KVC_CACHE_DIR`, folder `weights/`) as
a safetensors file named by the GGUF file's digest and the versions of what computed it, with an xxh3
checksum of every tensor's bytes in its metadata. A later start memory-maps it (the page cache then holds
one copy for every worker on the machine) and checks the checksum (~0.05 s): the same bits as a fresh
dequantization, or a fresh dequantization when the entry does not match.
"""

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import xxhash

from kvcluster.model import gemma3
from kvcluster.model.build_cache import cache_dir, write_entry
from kvcluster.model.config import ModelConfig
from kvcluster.model.files import (VOCABULARY_KEYS, GGUFFile, TokenizerData, default_model_path, file_digest,
                                   gguf_file_config, read_gguf_tokenizer_of)
from kvcluster.model.llama import LayerWeights, LlamaWeights

log = logging.getLogger(__name__)
WEIGHTS_CACHE_VERSION = 1  # bump when _read_weights changes what it returns


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
    digest = file_digest(path)
    return GGUFModel(path, config, cached_weights(file, config, digest), read_gguf_tokenizer_of(file), digest)


def weights_cache_entry(digest: bytes) -> Path | None:
    """The build-cache file of the weights of the GGUF file with this digest (None: cache off). Its name
    holds what the dequantized values depend on: the file, this loader's version, gguf's and numpy's."""
    folder = cache_dir("weights")
    if folder is None:
        return None
    versions = "-".join(f"{p}{importlib.metadata.version(p)}" for p in ("gguf", "numpy"))
    return folder / f"{digest.hex()}-v{WEIGHTS_CACHE_VERSION}-{versions}.safetensors"


def tensors_checksum(named: dict[str, torch.Tensor]) -> str:
    """xxh3-128 over the names, shapes, dtypes and bytes of the tensors, in name order."""
    h = xxhash.xxh3_128()
    for name in sorted(named):
        t = named[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def cached_weights(file: GGUFFile, config: ModelConfig, digest: bytes) -> LlamaWeights:
    """_read_weights(file, config), read from the build cache when a start before dequantized the same
    file (see the module's docstring), else dequantized and written there."""
    path = weights_cache_entry(digest)
    if path is not None:
        try:
            with safetensors.safe_open(path, framework="pt") as entry:  # memory-mapped
                checksum = (entry.metadata() or {}).get("xxh3_128")
                named = {name: entry.get_tensor(name) for name in entry.keys()}
            if checksum == tensors_checksum(named):
                return LlamaWeights.from_named(named, config.num_layers)
            log.warning("weights cache entry %s is corrupt: dequantizing again", path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # OSError, safetensors' errors on a damaged header, a missing tensor
            log.warning("weights cache entry %s unreadable (%s): dequantizing again", path, exc)
    weights = _read_weights(file, config)
    if path is not None:
        named = weights.named_tensors()
        metadata = {"xxh3_128": tensors_checksum(named), "source": str(file.path)}
        write_entry(path, lambda temporary: safetensors.torch.save_file(named, temporary, metadata),
                    size=sum(t.numel() * t.element_size() for t in named.values()))
    return weights


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
