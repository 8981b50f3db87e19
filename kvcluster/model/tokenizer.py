"""The tokenizer (byte-level BPE built from a GGUF vocabulary, or a Hugging Face tokenizer.json),
the chat template, and streaming detokenization."""

from collections.abc import Sequence
from dataclasses import dataclass

import datetime

import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from kvcluster.errors import InvalidArgument
from kvcluster.model.gguf_loader import TokenizerData
from kvcluster.model.hf_loader import HFTokenizerFiles

CONTROL_TOKEN_TYPES = (3, 4)  # GGUF CONTROL and USER_DEFINED
CHAT_ROLES = ("system", "user", "assistant")
# Plain ChatML, used when the GGUF carries no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class Tokenizer:
    """Encode/decode text and render chat messages with the model's template."""

    def __init__(self, data: TokenizerData | HFTokenizerFiles):
        if isinstance(data, HFTokenizerFiles):
            self._tok = HFTokenizer.from_str(data.tokenizer_json)
            self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
            # As transformers renders chat templates, so the prompt's tokens are the ones it would give.
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                               extensions=[jinja2.ext.loopcontrols])
            env.globals.update(raise_exception=_raise_template_error, strftime_now=_strftime_now)
        else:
            self._tok, self.special_ids = _gguf_tokenizer(data)
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        self.bos_id = data.bos_id
        self.eos_id = data.eos_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = env.from_string(data.chat_template or CHATML_TEMPLATE)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it are recognised as such."""
        return self._tok.encode(text, add_special_tokens=False).ids

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


def _gguf_tokenizer(data: TokenizerData) -> tuple[HFTokenizer, frozenset[int]]:
    """The byte-level BPE a GGUF vocabulary describes, and its control tokens' ids."""
    bpe = models.BPE(
        vocab={token: i for i, token in enumerate(data.tokens)},
        merges=[tuple(m.split(" ", 1)) for m in data.merges],
        fuse_unk=False,
    )
    tok = HFTokenizer(bpe)
    # SmolLM/StarCoder pre-tokenization: digits split one by one, then GPT-2 byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(data.tokens, data.token_types) if kind in CONTROL_TOKEN_TYPES]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok, frozenset(i for i, kind in enumerate(data.token_types) if kind in CONTROL_TOKEN_TYPES)


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
