"""The tokenizer (built from a GGUF vocabulary, or a Hugging Face tokenizer.json), the chat template,
and streaming detokenization.

A GGUF describes its tokenizer with `tokenizer.ggml.model` and, for byte-level BPE, `tokenizer.ggml.pre`
(how text is split before merging). transformers' GGUF conversion builds the `tokenizers` object
(vocabulary, merges or SentencePiece scores, byte fallback, normalizer, decoder, the split regex of the
pre-tokenizers it knows); `PRE_TOKENIZERS` names every `pre` accepted here and adds what that conversion
leaves out. Any other model or pre-tokenizer is refused when the tokenizer is built (at start-up), since
a wrong split still produces plausible tokens.

`tokenizer_fingerprint` names everything the ids of a text or a chat depend on, so a gateway that
tokenized a prompt can tell whether a worker would have got the same ids from its text. It also keys the
build cache: the conversion takes seconds (transformers' import, then the vocabulary: ~1 s for SmolLM2,
~4 s for Gemma 3's 262k pieces) in every worker, gateway and CLI start, so the built tokenizer.json is kept
in the build cache (kvcluster.model.build_cache: `KVC_CACHE_DIR`) under its fingerprint, with a checksum
of its bytes: a later start with the same fingerprint reads it in ~0.1 s.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2.ext
import xxhash
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer, decoders, normalizers, pre_tokenizers

from kvcluster.errors import InvalidArgument, UnsupportedModel
from kvcluster.model.build_cache import cache_dir, write_entry
from kvcluster.model.files import HFTokenizerFiles, TokenizerData

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
GGUF_TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE; SentencePiece (BPE with byte fallback and scores)
# Byte-level BPE pre-tokenizers (llama.cpp's names), grouped by how they split text:
# - "regex": transformers' conversion sets the split regex itself (Llama 3, Qwen2, ...);
# - "digits": every digit alone, then GPT-2's regex (llama.cpp's STARCODER group: SmolLM, StarCoder, ...);
# - "gpt2": GPT-2's regex alone; "default" (and a file that names none) is taken as that, as
#   transformers does (llama.cpp's "default" adds splits no current converter writes).
PRE_TOKENIZERS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "tekken", "qwen2",
                     "deepseek-r1-qwen", "gpt-4o", "llama4"), "regex"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits"),
    **dict.fromkeys(("default", "gpt-2", "phi-2", "mpt", "olmo", "jais"), "gpt2"),
}
NFC_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")  # Qwen2's tokenizer normalizes text to NFC first
# Ends of a chat turn that stop generation besides EOS, when the vocabulary has them as special tokens
# (llama.cpp finds its end-of-generation tokens by these names too).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>")
# Plain ChatML, used when the GGUF carries no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Bump when a change to this module changes the ids some text or chat encodes to (part of the fingerprint).
TOKENIZER_VERSION = 1
# The libraries that turn the files' data into ids: the tokenizer itself, transformers' GGUF conversion
# and the chat template's renderer.
TOKENIZER_LIBRARIES = ("tokenizers", "transformers", "jinja2")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class Tokenizer:
    """Encode/decode text and render chat messages with the model's template."""

    def __init__(self, data: TokenizerData | HFTokenizerFiles):
        hf = isinstance(data, HFTokenizerFiles)
        self.fingerprint = tokenizer_fingerprint(data)
        self._tok = HFTokenizer.from_str(data.tokenizer_json) if hf else cached_gguf_tokenizer(data, self.fingerprint)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self.bos_id = data.bos_id
        self.eos_id = data.eos_id
        self.add_bos = data.add_bos
        # EOS, the file's end-of-turn token and the known end-of-turn specials: each ends generation.
        ends = {None if hf else data.eot_id, *map(self._tok.token_to_id, END_OF_TURN_TOKENS)}
        self.stop_ids = frozenset({data.eos_id} | (ends & self.special_ids))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # As transformers (and llama.cpp) render chat templates, so the prompt's tokens are the ones they would give.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])
        env.globals.update(raise_exception=_raise_template_error, strftime_now=_strftime_now)
        self._template = env.from_string(data.chat_template or CHATML_TEMPLATE)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it are recognised as such."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A plain (completion) prompt's ids: BOS first when the model wants it (SentencePiece
        vocabularies mostly), as llama.cpp and vLLM tokenize a prompt. A chat prompt's BOS is the
        template's."""
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def to_json(self) -> str:
        """The tokenizer as a Hugging Face tokenizer.json (grammar engines and load generators read it)."""
        return self._tok.to_str()

    def decode(self, token_ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise InvalidArgument("messages", "must hold at least one message")
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self._tok.id_to_token(self.bos_id) if self.bos_id is not None else "",
            eos_token=self._tok.id_to_token(self.eos_id),
        )

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.encode(self.render_chat(messages))


def tokenizer_fingerprint(data: TokenizerData | HFTokenizerFiles) -> str:
    """Hex xxh3-128 of what encode, encode_prompt and encode_chat depend on: the files' tokenizer data
    (vocabulary, merges or scores, special tokens, BOS/EOS and add-BOS, chat template), this module's
    version and the versions of the libraries that build and render them. Equal fingerprints give
    equal ids for every text and chat; a difference anywhere only makes callers send text instead."""
    # The fields as they are (lists of str, int and float): dataclasses.asdict would copy every element
    # first (2 s for Gemma 3's vocabulary) for the same JSON.
    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    described = json.dumps({"format": type(data).__name__, **fields}, sort_keys=True)
    libraries = "|".join(f"{name}={_version(name)}" for name in TOKENIZER_LIBRARIES)
    return xxhash.xxh3_128_hexdigest(f"v{TOKENIZER_VERSION}|{libraries}|{described}".encode())


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cached_gguf_tokenizer(data: TokenizerData, fingerprint: str) -> HFTokenizer:
    """gguf_tokenizer(data), read from the build cache when a start before built the same one (same
    fingerprint), else built and written there. An entry is its checksum's line, then the tokenizer.json."""
    folder = cache_dir("tokenizers")
    path = folder / f"{fingerprint}.json" if folder is not None else None
    if path is not None:
        try:
            checksum, _, text = path.read_text(encoding="utf-8").partition("\n")
            if checksum == xxhash.xxh3_128_hexdigest(text.encode()):
                return HFTokenizer.from_str(text)
            log.warning("tokenizer cache entry %s is corrupt: rebuilding it", path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # OSError, bad UTF-8, or tokenizers' (plain) Exception on bad JSON
            log.warning("tokenizer cache entry %s unreadable (%s): rebuilding it", path, exc)
    tok = gguf_tokenizer(data)
    if path is not None:
        text = tok.to_str()
        entry = f"{xxhash.xxh3_128_hexdigest(text.encode())}\n{text}".encode()
        write_entry(path, lambda temporary: temporary.write_bytes(entry), size=len(entry))
    return tok


def gguf_tokenizer(data: TokenizerData) -> HFTokenizer:
    """The tokenizer a GGUF vocabulary describes (see the module's docstring); UnsupportedModel names a
    tokenizer model or pre-tokenizer this cannot build exactly."""
    if data.model not in GGUF_TOKENIZER_MODELS:
        raise UnsupportedModel(f"GGUF tokenizer model {data.model!r} is not supported; supported: "
                               f"{', '.join(GGUF_TOKENIZER_MODELS)}")
    pre = data.pre or "default"
    if data.model == "gpt2" and pre not in PRE_TOKENIZERS:
        raise UnsupportedModel(f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
                               f"{', '.join(sorted(PRE_TOKENIZERS))}")
    # Imported here: transformers takes seconds to import, and only GGUF vocabularies need it.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    described = {"tokenizer_type": data.model, "pre_tokenizer_type": pre, "tokens": data.tokens,
                 "token_type": data.token_types}
    if data.merges:
        described["merges"] = data.merges
    if data.scores is not None:
        described["scores"] = data.scores
    tok, _ = convert_gguf_tokenizer(data.architecture, described)
    if data.model == "gpt2" and PRE_TOKENIZERS[pre] == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if data.model == "gpt2" and pre in NFC_PRE_TOKENIZERS:
        tok.normalizer = normalizers.NFC()
    if data.model == "llama" and isinstance(tok.pre_tokenizer, pre_tokenizers.Metaspace):
        _sentencepiece_spaces(tok, data.add_space_prefix is not False)
    return tok


def _sentencepiece_spaces(tok: HFTokenizer, prefix: bool) -> None:
    """Spaces as SentencePiece (and llama.cpp) write them: every space becomes \u2581 and, with `prefix`,
    one more starts the text and each run after a special token, even a text that starts with a space
    (transformers' Metaspace adds none there). The decoder undoes both."""
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    strip = [decoders.Strip(content=" ", left=1)] if prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])


def _raise_template_error(message: str) -> None:
    raise InvalidArgument("messages", f"the model's chat template refused them: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, prompt_tail: Sequence[int] = ()):
        self._tokenizer = tokenizer
        # A few prompt tokens give the byte-level decoder the right context for the first token.
        self._ids: list[int] = list(prompt_tail)[-4:]
        self._prefix = len(self._ids)
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; the newly completed text (possibly empty)."""
        self._ids.append(token_id)
        before = self._tokenizer.decode(self._ids[self._prefix:self._read])
        after = self._tokenizer.decode(self._ids[self._prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]
