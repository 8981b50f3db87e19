"""Sampling parameters and their one set of bounds (torch-free: the gateway imports it).

Every limit lives here once: `SamplingParams.validate` enforces them for gRPC callers (InvalidArgument
naming the field and the limit), and the gateway's request models (gateway/protocol.py) and the CLI's
flags (kvcluster/cli/main.py) take the same constants for HTTP and command-line callers. The meanings are OpenAI's and vLLM's:
- presence / frequency penalty: subtracted from a token's logit once it appeared in the output (once,
  or per occurrence); repetition penalty (vLLM/transformers): a logit of a token seen in the prompt
  or the output is divided by it when positive, multiplied when negative;
- min_tokens: EOS and the stop tokens are masked until that many tokens were generated (stop strings
  count only past them);
- logit_bias: added to the model's logit of each listed token id before sampling;
- logprobs: k >= 0 asks for each sampled token's log-probability and the k most likely tokens', from
  the model's own distribution (raw logits, before penalties, bias, temperature and grammar: vLLM's
  default);
- structured: the output must follow a JSON grammar (any JSON object, or a JSON Schema).
"""

import json
import secrets
import struct
from dataclasses import dataclass, field, replace

from kvcluster.errors import InvalidArgument

DEFAULT_MAX_TOKENS = 128
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64           # (min_tokens bans them all at once: far fewer than any vocabulary)


def check_prompt_ids(prompt_ids, field: str, context_length: int, vocab_size: int) -> None:
    """Raise InvalidArgument unless the prompt fits the context with room for one output token and every
    id is in the vocabulary. `field` is where the caller gave the prompt (prompt, messages or token_ids);
    an id out of the vocabulary is always named `token_ids`."""
    limit = context_length - 1
    if not prompt_ids:
        raise InvalidArgument(field, "must not be empty")
    if len(prompt_ids) > limit:
        raise InvalidArgument(field, f"has {len(prompt_ids)} tokens; the limit is {limit} (context {limit + 1} minus one output token)")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgument("token_ids", f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def _float32(value: float) -> float:
    """`value` as the wire (a proto float) carries it, so a client sending the bound passes."""
    return struct.unpack("f", struct.pack("f", value))[0]


MIN_TEMPERATURE = _float32(1e-4)  # logits / temperature stays far inside float32 range
MAX_TEMPERATURE = 100.0
HTTP_MAX_TEMPERATURE = 2.0        # the OpenAI API's range, which the gateway keeps to
MIN_TOP_P = _float32(1e-6)        # a normal float32; smaller cuts keep only the best token anyway
MAX_TOP_P = 1.0
SEED_LIMIT = 1 << 64              # seeds lie in [0, 2^64)
RANDOM_SEED_BITS = 63             # a seed drawn for a request that gave none
MAX_CHOICES = 16                  # n: choices one HTTP request may ask for
MAX_PENALTY = 2.0                 # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI)
MIN_REPETITION_PENALTY = _float32(0.01)  # dividing a logit by less could overflow float32
MAX_REPETITION_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0            # each bias lies in [-100, 100] (OpenAI)
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGPROBS = 20                 # top logprobs per token (OpenAI's top_logprobs limit)
MAX_SCHEMA_CHARS = 64 * 1024      # a JSON Schema's text
STRUCTURED_KINDS = ("json_object", "json_schema")
ANY_JSON_OBJECT = '{"type": "object"}'


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the output must follow: `json_object` (any JSON object) or `json_schema` (`schema`,
    a JSON Schema as JSON text)."""

    kind: str
    schema: str = ""

    @property
    def json_schema(self) -> str:
        """The schema the grammar is compiled from."""
        return ANY_JSON_OBJECT if self.kind == "json_object" else self.schema

    def validate(self) -> None:
        field_name = f"sampling.structured_output.{self.kind}"
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidArgument("sampling.structured_output", f"must be one of {STRUCTURED_KINDS}, got {self.kind!r}")
        if self.kind == "json_object":
            return
        if not 0 < len(self.schema) <= MAX_SCHEMA_CHARS:
            raise InvalidArgument(field_name, f"must be 1 to {MAX_SCHEMA_CHARS} characters of JSON, got {len(self.schema)}")
        try:
            schema = json.loads(self.schema)
        except (ValueError, RecursionError) as exc:  # nesting deeper than Python's stack is refused too
            raise InvalidArgument(field_name, f"is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidArgument(field_name, f"must be a JSON object (a JSON Schema), got {type(schema).__name__}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (the OpenAI/vLLM meanings)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)  # (token id, bias), ids ascending
    logprobs: int | None = None
    structured: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def shapes_logits(self) -> bool:
        """Whether anything changes the logits before the draw (penalties, bias, min_tokens, a grammar)."""
        return self.penalized or bool(self.logit_bias) or self.min_tokens > 0 or self.structured is not None

    @property
    def needs_own_first_token(self) -> bool:
        """A first token sampled elsewhere (the prefill service) cannot serve: its logprobs or the
        grammar state belong to the worker that streams the request."""
        return self.logprobs is not None or self.structured is not None

    def for_first_token_elsewhere(self) -> "SamplingParams":
        """What a prefill worker needs to sample a first token: without logprobs and grammar (see
        needs_own_first_token: that token is then recomputed where the request is streamed)."""
        return replace(self, logprobs=None, structured=None) if self.needs_own_first_token else self

    def validate(self, vocab_size: int, max_tokens_limit: int) -> None:
        """Raise InvalidArgument naming the first bad field and its limit."""
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise InvalidArgument("sampling.max_tokens", f"must be in [1, {max_tokens_limit}], got {self.max_tokens}")
        # Comparisons written so that NaN fails them; the lower bounds keep logits / temperature and
        # the top-p cut finite and normal in float32 (a subnormal temperature overflows the scores).
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise InvalidArgument("sampling.temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                                  f"{MAX_TEMPERATURE:g}], got {self.temperature}")
        if not MIN_TOP_P <= self.top_p <= MAX_TOP_P:
            raise InvalidArgument("sampling.top_p", f"must be in [{MIN_TOP_P:g}, {MAX_TOP_P:g}], got {self.top_p}")
        if not 0 <= self.top_k <= vocab_size:
            raise InvalidArgument("sampling.top_k", f"must be in [0, {vocab_size}] (0 disables), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise InvalidArgument("sampling.seed", f"must be in [0, 2^64), got {self.seed}")
        self._validate_stops(vocab_size)
        self._validate_shaping(vocab_size)

    def _validate_stops(self, vocab_size: int) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not 0 < len(s) <= MAX_STOP_STRING_CHARS:
                raise InvalidArgument("sampling.stop", f"each stop string needs 1 to {MAX_STOP_STRING_CHARS} characters, got {len(s)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument("sampling.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise InvalidArgument("sampling.stop_token_ids", f"must be in [0, {vocab_size}), got {t}")

    def _validate_shaping(self, vocab_size: int) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidArgument(f"sampling.{name}", f"must be in [{-MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidArgument("sampling.repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY:g}, "
                                  f"{MAX_REPETITION_PENALTY:g}] (1 disables), got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidArgument("sampling.min_tokens", f"must be in [0, max_tokens = {self.max_tokens}], "
                                  f"got {self.min_tokens}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidArgument("sampling.logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(self.logit_bias)}")
        for token_id, bias in self.logit_bias:
            if not 0 <= token_id < vocab_size:
                raise InvalidArgument("sampling.logit_bias", f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidArgument("sampling.logit_bias", f"the bias of token {token_id} must be in "
                                      f"[{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidArgument("sampling.logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.structured is not None:
            self.structured.validate()

    def with_seed(self) -> "SamplingParams":
        """A copy with a concrete seed, so every worker draws the same randomness."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(RANDOM_SEED_BITS))
