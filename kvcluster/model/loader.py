"""One entry point for every model format: a GGUF file or a Hugging Face checkpoint directory.

`load_model` returns the loader's result (gguf_loader.GGUFModel or hf_loader.HFModel: path,
config, weights, tokenizer data, digest); `model_identity` is what the block fingerprint hashes for
the model; `build_model` the forward of the config's family. What the files say without the weights
(config, tokenizer) is kvcluster.model.files, which needs no torch.
"""

from pathlib import Path

import torch
import xxhash

from kvcluster.model.config import GEMMA3, ModelConfig
from kvcluster.model.files import is_model_dir
from kvcluster.model.gemma3 import Gemma3Model
from kvcluster.model.gguf_loader import GGUFModel, load_gguf
from kvcluster.model.hf_loader import HFModel, load_hf
from kvcluster.model.llama import NUMERICS_VERSION, LlamaModel, LlamaWeights
from kvcluster.model.shipped import resolve


def load_model(path: str | Path | None = None) -> GGUFModel | HFModel:
    """The model at `path`: a checkpoint directory, a .gguf file, a shipped model's name
    (kvcluster.model.shipped) or the default SmolLM2 when None."""
    path = resolve(path)
    return load_hf(path) if is_model_dir(path) else load_gguf(path)


def build_model(config: ModelConfig, weights: LlamaWeights, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, deterministic: bool = True) -> LlamaModel:
    """The forward of the config's family over `weights` (Gemma 3's, or the llama one the others share)."""
    model_class = Gemma3Model if config.architecture == GEMMA3 else LlamaModel
    return model_class(config, weights, device, dtype, deterministic)


def model_identity(weights_digest: bytes, config: ModelConfig) -> bytes:
    """What the fingerprint hashes for the model: the weights' digest, the architecture and the
    forward's numerics version (the KV layout, dtype and block size join it in make_fingerprint)."""
    tag = f"|{config.architecture}|numerics-v{NUMERICS_VERSION}".encode()
    return xxhash.xxh3_128_digest(weights_digest + tag)
