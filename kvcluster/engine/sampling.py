"""Token selection (the parameters and their bounds live in sampling_params.py).

Randomness is stateless per step: the draw for output token `step` of a request uses a generator
seeded from (seed, step). Any worker holding the same logits picks the same token, so the first
token (sampled by prefill) and the rest (sampled by decode) reproduce the single-process engine.
"""

from collections.abc import Sequence
import secrets

import torch

from kvcluster.engine.sampling_params import (  # noqa: F401  (re-exported: the engine's callers import them here)
    DEFAULT_MAX_TOKENS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MIN_TEMPERATURE, MIN_TOP_P, RANDOM_SEED_BITS,
    SamplingParams, StructuredOutput)

SEED_MASK = (1 << 63) - 1


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
    seed = params.seed if params.seed is not None else secrets.randbits(RANDOM_SEED_BITS)
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + step) & SEED_MASK)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())
