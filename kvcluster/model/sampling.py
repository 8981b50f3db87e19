"""Sampling parameters, their validation, and token selection.

Randomness is stateless per step: the draw for output token `step` of a request uses a generator
seeded from (seed, step). Any worker holding the same logits picks the same token, so the first
token (sampled by prefill) and the rest (sampled by decode) reproduce the single-process engine.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
import secrets
import struct

import torch

from kvcluster.errors import InvalidArgument

DEFAULT_MAX_TOKENS = 128
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
SEED_MASK = (1 << 63) - 1


def _float32(value: float) -> float:
    """`value` as the wire (a proto float) carries it, so a client sending the bound passes."""
    return struct.unpack("f", struct.pack("f", value))[0]


MIN_TEMPERATURE = _float32(1e-4)  # logits / temperature stays far inside float32 range
MAX_TEMPERATURE = 100.0
MIN_TOP_P = _float32(1e-6)        # a normal float32; smaller cuts keep only the best token anyway


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int, max_tokens_limit: int) -> None:
        """Raise InvalidArgument naming the first bad field and its limit."""
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise InvalidArgument("sampling.max_tokens", f"must be in [1, {max_tokens_limit}], got {self.max_tokens}")
        # Comparisons written so that NaN fails them; the lower bounds keep logits / temperature and
        # the top-p cut finite and normal in float32 (a subnormal temperature overflows the scores).
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise InvalidArgument("sampling.temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                                  f"{MAX_TEMPERATURE:g}], got {self.temperature}")
        if not MIN_TOP_P <= self.top_p <= 1.0:
            raise InvalidArgument("sampling.top_p", f"must be in [{MIN_TOP_P:g}, 1], got {self.top_p}")
        if not 0 <= self.top_k <= vocab_size:
            raise InvalidArgument("sampling.top_k", f"must be in [0, {vocab_size}] (0 disables), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise InvalidArgument("sampling.seed", f"must be in [0, 2^64), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not 0 < len(s) <= MAX_STOP_STRING_CHARS:
                raise InvalidArgument("sampling.stop", f"each stop string needs 1 to {MAX_STOP_STRING_CHARS} characters, got {len(s)}")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise InvalidArgument("sampling.stop_token_ids", f"must be in [0, {vocab_size}), got {t}")

    def with_seed(self) -> "SamplingParams":
        """A copy with a concrete seed, so every worker draws the same randomness."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(63))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> list[int]:
    """One token per row of `logits` [B, vocab]; `steps[i]` is row i's output index."""
    greedy = logits.argmax(dim=-1).tolist()
    return [greedy[i] if p.greedy else _draw(logits[i], p, step) for i, (p, step) in enumerate(zip(params, steps))]


def _draw(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens ranked above it already cover top_p; the best always stays.
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + step) & SEED_MASK)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())
