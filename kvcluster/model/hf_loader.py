"""Load a Hugging Face checkpoint directory: config.json, *.safetensors (one file or sharded with
model.safetensors.index.json; bf16, fp16 or fp32), tokenizer.json and the chat template.

Its config and tokenizer are read by kvcluster.model.config and kvcluster.model.files (torch-free);
this adds the weights. Families: llama (Llama 2, Llama 3.x with its `llama3` rope scaling, SmolLM), mistral, qwen2 (q/k/v
biases), qwen3 (per-head q/k RMSNorm) and gemma3_text (kvcluster.model.gemma3), tied or untied
embeddings. Hugging Face stores Q/K rows in
the rotate-half order the forward uses, so they load as they are. Every tensor of the checkpoint
must be used: a weight this forward has no place for (an o_proj bias, MLP biases) is refused rather
than silently dropped.
"""

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open

from kvcluster.errors import UnsupportedModel
from kvcluster.model import gemma3
from kvcluster.model.config import GEMMA3, ModelConfig, hf_config
from kvcluster.model.files import HFTokenizerFiles, read_hf_tokenizer, read_json
from kvcluster.model.llama import LayerWeights, LlamaWeights

INDEX_FILE = "model.safetensors.index.json"
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer older checkpoints saved; recomputed
DIGEST_SAMPLES = 16          # byte ranges sampled from each safetensors file's data
DIGEST_SAMPLE_BYTES = 4096


@dataclass
class HFModel:
    """Everything read from one checkpoint directory (the shape of gguf_loader.GGUFModel)."""

    path: Path
    config: ModelConfig
    weights: LlamaWeights
    tokenizer: HFTokenizerFiles
    digest: bytes  # checkpoint_digest: the weights' identity in the fingerprint


def load_hf(path: str | Path) -> HFModel:
    path = Path(path)
    raw = read_json(path / "config.json")
    config = hf_config(raw)
    weights = _read_weights(path, config, raw)
    return HFModel(path, config, weights, read_hf_tokenizer(path, raw), checkpoint_digest(path))


# ---- weights ---------------------------------------------------------------------------------

def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's files: those the shard index names, else every *.safetensors."""
    if (path / INDEX_FILE).is_file():
        return sorted({path / name for name in read_json(path / INDEX_FILE)["weight_map"].values()})
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
        read_layer = gemma3.hf_layer if config.architecture == GEMMA3 else _read_layer
        layers = [read_layer(tensors, f"model.layers.{i}.", config) for i in range(config.num_layers)]
        embed = tensors.take("model.embed_tokens.weight")
        norm = tensors.take("model.norm.weight")
        if config.architecture == GEMMA3:
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
