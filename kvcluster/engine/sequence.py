"""A request's token sequence as the engine tracks it: blocks, stop conditions, streamed text."""

import enum
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field

from kvcluster.engine.sampling import SamplingParams
from kvcluster.model.tokenizer import IncrementalDetokenizer, Tokenizer


class FinishReason(enum.Enum):
    STOP = "stop"          # EOS, a stop token or a stop string
    LENGTH = "length"      # max_tokens or the context limit
    CANCELLED = "cancelled"


@dataclass
class TokenEvent:
    """One generated token and the text it completed."""

    request_id: str
    token_id: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: object | None = None   # logits_processors.TokenLogprobs, when the request asked for them


@dataclass
class TokenSources:
    """Where a request's prompt K/V came from, in tokens (each prompt token counted once, first source wins)."""

    local_cache: int = 0      # blocks this worker's pool already held
    pulled: int = 0           # handed in by the caller (pulled from a store, or computed by a prefill worker)
    pulled_start: int = 0     # the prompt position where the pulled tokens begin
    computed: int = 0         # computed by this engine
    last: str = "local_cache"  # which of local_cache / pulled supplied the last block taken


@dataclass
class Sequence:
    """Prompt + output ids, the pool blocks holding their KV, and how much of it is computed."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    eos_ids: frozenset[int]        # tokens that end generation (EOS, end of turn: Tokenizer.stop_ids)
    context_length: int
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0          # leading tokens whose K/V is in the pool
    finish_reason: FinishReason | None = None
    text: str = ""                 # output text so far (cut at a stop string)
    num_emitted_chars: int = 0
    keep_blocks: bool = False      # the owner releases the blocks (e.g. after exporting them)
    initial_events: list[TokenEvent] = field(default_factory=list)  # from tokens handed over at admission
    on_chunk: Callable[["Sequence"], None] | None = None  # called on the engine thread after each prefill chunk
    # The worker-local prefix cache (see Engine): a cacheable sequence matches its full blocks
    # against the pool's index and registers the ones it computes.
    cacheable: bool = False
    hash_root: bytes = b""         # the parent of its first block's hash (the chain root of its cache_salt)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its leading full blocks
    num_registered: int = 0        # leading blocks found in or registered with the local cache
    sources: "TokenSources" = field(default_factory=lambda: TokenSources())
    preemptions: int = 0           # times the scheduler took its blocks back (it was recomputed after)
    skipped: int = 0               # consecutive steps it waited while shorter prompts were scheduled
    grammar: object | None = None  # its llguidance matcher under a structured output (see structured_output)
    prompt_token_set: list[int] | None = None  # distinct prompt ids, for the repetition penalty
    stop_search_from: int = 0      # text offset before which stop strings do not count (min_tokens)

    @classmethod
    def create(cls, request_id: str, prompt_ids: Seq[int], params: SamplingParams, tokenizer: Tokenizer,
               context_length: int) -> "Sequence":
        return cls(request_id, list(prompt_ids), params, IncrementalDetokenizer(tokenizer, prompt_ids),
                   tokenizer.stop_ids, context_length)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def blocks_needed(self, num_tokens: int, block_size: int) -> int:
        """Extra blocks required to hold K/V for the first `num_tokens` tokens."""
        return max(0, -(-num_tokens // block_size) - len(self.block_table))

    def append_token(self, token_id: int, logprobs: object | None = None) -> TokenEvent:
        """Record a sampled token, apply the stop rules, and return the text it releases. Before
        min_tokens no stop string counts (EOS and stop tokens are masked then); a grammar that is
        complete ends the output."""
        self.output_ids.append(token_id)
        p = self.params
        grammar_done = self.grammar is not None and self._advance_grammar(token_id)
        if (token_id in self.eos_ids and not p.ignore_eos) or token_id in p.stop_token_ids:
            self.finish_reason = FinishReason.STOP
        else:
            self.text += self.detokenizer.push(token_id)
            if len(self.output_ids) <= p.min_tokens:
                self.stop_search_from = len(self.text)
            cut = min((i for i in (self.text.find(s, max(0, self.stop_search_from - len(s) + 1)) for s in p.stop)
                       if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = FinishReason.STOP
        if self.finish_reason is None and grammar_done:
            self.finish_reason = FinishReason.STOP
        if self.finish_reason is None and (len(self.output_ids) >= p.max_tokens or self.num_tokens >= self.context_length):
            self.finish_reason = FinishReason.LENGTH
        return TokenEvent(self.request_id, token_id, self._release_text(), self.finish_reason, logprobs)

    def _advance_grammar(self, token_id: int) -> bool:
        """Feed the token to the grammar; True when the grammar is complete (nothing may follow)."""
        accepted = self.grammar.consume_token(token_id)
        return not accepted or self.grammar.is_stopped()

    def _release_text(self) -> str:
        # Hold back a possible stop-string prefix until it is ruled out.
        held = 0 if self.finish_reason or not self.params.stop else max(map(len, self.params.stop)) - 1
        end = max(self.num_emitted_chars, len(self.text) - held)
        delta = self.text[self.num_emitted_chars:end]
        self.num_emitted_chars = end
        return delta
