"""The batched step between the forward's logits and the draw: logit bias, penalties, min_tokens and
the grammar mask shape the scores of the rows that ask for them; logprobs come from the raw logits.

Every operation is row-wise on [rows, vocab] tensors (one index_put, one where, one masked_fill for
the whole batch), so a row's scores never depend on which other requests share its step: under the
engine's batch-invariant numerics a cached, batched or resumed request picks exactly the tokens it
picks alone. The per-sequence inputs (output ids, bias lists, grammar matchers) are gathered once per
step into flat index tensors; the grammar's bitmask is filled by llguidance for all constrained rows
in one call (structured_output.fill_bitmask).

Order, as vLLM applies them: logit bias, repetition penalty (prompt and output tokens), frequency and
presence penalties (output tokens), then the masks (min_tokens holds back EOS and the stop tokens;
the grammar allows only what continues it). When min_tokens would leave a grammar nothing to emit
(its JSON is complete), the grammar wins: the output ends as the grammar says.
"""

import itertools
import sys
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from kvcluster.engine.sampling import sample
from kvcluster.engine.sampling_params import MAX_LOGPROBS
from kvcluster.engine.structured_output import fill_bitmask

assert sys.byteorder == "little", "the grammar bitmask is unpacked as little-endian words"


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability under the model, and the most likely tokens' (id, logprob)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Picked:
    """One step's choices: a token per row, and its logprobs where the request asked for them."""

    tokens: list[int]
    logprobs: list[TokenLogprobs | None]


def pick(logits: torch.Tensor, seqs: Seq) -> Picked:
    """The next token of each sequence from `logits` [B, vocab] (row i is seqs[i]'s)."""
    scores = shape_logits(logits, seqs)
    tokens = sample(scores, [s.params for s in seqs], [len(s.output_ids) for s in seqs])
    return Picked(tokens, token_logprobs(logits, seqs, tokens))


def shape_logits(logits: torch.Tensor, seqs: Seq) -> torch.Tensor:
    """`logits` itself when no row asks for shaping, else a float32 copy whose asking rows are shaped."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.shapes_logits]
    if not rows:
        return logits
    every_row = len(rows) == len(seqs)
    part = logits.to(torch.float32, copy=True) if every_row else logits[rows].float()   # [R, vocab], a copy
    shaped = [seqs[i] for i in rows]
    _add_bias(part, shaped)
    part = _penalize(part, shaped)
    _mask(part, shaped)
    if every_row:
        return part
    scores = logits.to(torch.float32, copy=True)
    scores[rows] = part
    return scores


def _add_bias(part: torch.Tensor, seqs: Seq) -> None:
    entries = [(row, token, bias) for row, seq in enumerate(seqs) for token, bias in seq.params.logit_bias]
    if entries:
        rows, tokens, biases = zip(*entries)
        part.index_put_((torch.tensor(rows), torch.tensor(tokens)), torch.tensor(biases, dtype=part.dtype),
                        accumulate=True)


def _penalize(part: torch.Tensor, seqs: Seq) -> torch.Tensor:
    repetition = [seq.params.repetition_penalty for seq in seqs]
    if any(r != 1.0 for r in repetition):
        seen = _token_rows(part.shape, seqs, lambda seq: seq.params.repetition_penalty != 1.0, with_prompt=True) > 0
        penalty = torch.tensor(repetition, dtype=part.dtype).unsqueeze(1)
        part = torch.where(seen, torch.where(part > 0, part / penalty, part * penalty), part)
    if any(seq.params.presence_penalty or seq.params.frequency_penalty for seq in seqs):
        counts = _token_rows(part.shape, seqs, lambda seq: bool(seq.params.presence_penalty or seq.params.frequency_penalty))
        frequency = torch.tensor([seq.params.frequency_penalty for seq in seqs], dtype=part.dtype).unsqueeze(1)
        presence = torch.tensor([seq.params.presence_penalty for seq in seqs], dtype=part.dtype).unsqueeze(1)
        part = part - frequency * counts - presence * (counts > 0).to(part.dtype)
    return part


def _token_rows(shape: torch.Size, seqs: Seq, wanted, with_prompt: bool = False) -> torch.Tensor:
    """[R, vocab] occurrence counts of each wanted row's output tokens (and prompt tokens, once each)."""
    counts = torch.zeros(shape, dtype=torch.float32)
    chosen = [(row, seq) for row, seq in enumerate(seqs) if wanted(seq)]
    ids = [seq.output_ids for _, seq in chosen] + ([_prompt_set(seq) for _, seq in chosen] if with_prompt else [])
    row_of = [row for row, _ in chosen] * (2 if with_prompt else 1)
    flat = torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.long)
    index = torch.repeat_interleave(torch.tensor(row_of, dtype=torch.long), torch.tensor([len(i) for i in ids], dtype=torch.long))
    counts.index_put_((index, flat), torch.ones(len(flat)), accumulate=True)
    return counts


def _prompt_set(seq) -> list[int]:
    """The prompt's distinct token ids (computed once per sequence: the prompt never changes)."""
    if seq.prompt_token_set is None:
        seq.prompt_token_set = sorted(set(seq.prompt_ids))
    return seq.prompt_token_set


def _mask(part: torch.Tensor, seqs: Seq) -> None:
    """-inf, in place, where the grammar or min_tokens bans a token."""
    banned = _grammar_banned(part.shape, seqs)
    held = [(row, token) for row, seq in enumerate(seqs) if len(seq.output_ids) < seq.params.min_tokens
            for token in _stop_tokens(seq)]
    if held:
        rows, tokens = zip(*held)
        with_stops = torch.zeros(part.shape, dtype=torch.bool) if banned is None else banned.clone()
        with_stops[torch.tensor(rows), torch.tensor(tokens)] = True
        # A grammar with nothing left but its end beats min_tokens (else no token would remain).
        banned = with_stops if banned is None else torch.where(with_stops.all(dim=-1, keepdim=True), banned, with_stops)
    if banned is not None:  # never a whole row: a grammar always allows at least its end (EOS)
        part.masked_fill_(banned, float("-inf"))


def _stop_tokens(seq) -> list[int]:
    return list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else sorted(seq.eos_ids))


def _grammar_banned(shape: torch.Size, seqs: Seq) -> torch.Tensor | None:
    """[R, vocab] bool: the tokens each constrained row's grammar refuses next (other rows: none)."""
    constrained = [(row, seq.grammar) for row, seq in enumerate(seqs) if seq.grammar is not None]
    if not constrained:
        return None
    bitmask = fill_bitmask(constrained, shape[0], shape[1])     # [R, ceil(vocab / 32)] int32, bit t = token t
    # Little-endian int32 words as bytes, bits least significant first: token order (numpy's C loop
    # unpacks 8 rows x 49k in ~0.1 ms, several times faster than shifting in torch).
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :shape[1]]
    return torch.from_numpy(bits == 0)


def token_logprobs(logits: torch.Tensor, seqs: Seq, tokens: Seq[int]) -> list[TokenLogprobs | None]:
    """Logprobs of the sampled tokens under the raw logits, for the rows that asked. The top list is
    always taken MAX_LOGPROBS deep and then cut, so a row's answer never depends on its neighbours'."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(seqs)
    if not rows:
        return result
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)                       # [R, vocab]
    chosen = logprobs.gather(1, torch.tensor([tokens[i] for i in rows]).unsqueeze(1)).squeeze(1).tolist()
    top = logprobs.topk(min(MAX_LOGPROBS, logprobs.shape[1]), dim=-1)
    top_ids, top_values = top.indices.tolist(), top.values.tolist()
    for j, i in enumerate(rows):
        k = seqs[i].params.logprobs
        result[i] = TokenLogprobs(chosen[j], tuple(zip(top_ids[j][:k], top_values[j][:k])))
    return result
