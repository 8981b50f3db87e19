"""One entry point for every model format: a GGUF file or a Hugging Face checkpoint directory.

`load_model` returns the loader's result (gguf_loader.GGUFModel or hf_loader.HFModel: path,
config, weights, tokenizer data, digest); `read_model_config` reads only the architecture (the
launcher sizes the stores' KV layout with it); `read_tokenizer_data` only the tokenizer and chat
template (the gateway tokenizes prompts to route them); `model_identity` is what the block fingerprint
hashes for the model; `build_model` the forward of the config's family.
"""

from pathlib import Path

import torch
import xxhash

from kvcluster.errors import UnsupportedModel
from kvcluster.model import gguf_loader, hf_loader
from kvcluster.model.gguf_loader import GGUFModel, TokenizerData, default_model_path, load_gguf, read_gguf_config
from kvcluster.model.hf_loader import HFModel, HFTokenizerFiles, is_hf_dir, load_hf, read_hf_config
from kvcluster.model.gemma3 import ARCHITECTURE as GEMMA3, Gemma3Model
from kvcluster.model.llama import NUMERICS_VERSION, LlamaModel, LlamaWeights, ModelConfig
from kvcluster.model.shipped import resolve


def load_model(path: str | Path | None = None) -> GGUFModel | HFModel:
    """The model at `path`: a checkpoint directory, a .gguf file, a shipped model's name
    (kvcluster.model.shipped) or the default SmolLM2 when None."""
    path = resolve(path)
    return load_hf(path) if _is_dir(path) else load_gguf(path)


def read_model_config(path: str | Path | None = None) -> ModelConfig:
    path = resolve(path)
    return read_hf_config(path) if _is_dir(path) else read_gguf_config(path)


def read_tokenizer_data(path: str | Path | None = None) -> TokenizerData | HFTokenizerFiles:
    """The tokenizer and chat template of a model, its weights unread."""
    path = resolve(path)
    if _is_dir(path):
        return hf_loader._read_tokenizer(Path(path), hf_loader._read_json(Path(path) / "config.json"))
    return gguf_loader.read_gguf_tokenizer(path)


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


def _is_dir(path: str | Path | None) -> bool:
    if not path:
        return False
    if Path(path).is_dir():
        if not is_hf_dir(path):
            raise UnsupportedModel(f"{path}: a directory without config.json is not a Hugging Face checkpoint")
        return True
    if not Path(path).is_file():
        raise UnsupportedModel(f"{path}: no such model file or directory")
    return False
