"""The paged-attention op's query blocking: a query's output is bitwise the same whatever shares its call.

The op groups up to 16 consecutive query tokens of one sequence into a block that shares every key
and value load (scores 4 rows x 4 keys at a time, values into 6 rows at a time). Under fixed key
chunks (the default batch-invariant numerics) each query must still compute exactly its own
arithmetic: the same bits alone, in its prompt's block at any offset, chunked, or next to other
sequences — for every dtype, GQA group size and head size (including ones that are not multiples
of the 16-lane vectors or of the row tiles).
"""

import math
import random

import pytest
import torch

from kvcluster.model.kernels import paged_attention_op
from kvcluster.model.llama import DETERMINISTIC_CHUNK_KEYS

needs_op = pytest.mark.skipif(paged_attention_op() is None, reason="compiled kernels unavailable on this machine")


def call(q, kv, tables, seq_of, positions, chunk_keys=DETERMINISTIC_CHUNK_KEYS):
    return paged_attention_op()(q, kv, 0, tables, torch.tensor(seq_of, dtype=torch.int32),
                                torch.tensor(positions, dtype=torch.int32), 1 / math.sqrt(q.shape[-1]), chunk_keys)


def pool_and_tables(gen, num_kv, dim, dtype, lengths, block_size=16):
    blocks = [-(-n // block_size) for n in lengths]
    kv = torch.randn(sum(blocks) + 3, 1, 2, block_size, num_kv, dim, generator=gen).to(dtype)
    order = torch.randperm(kv.shape[0], generator=gen).tolist()  # scattered blocks
    tables, at = [], 0
    for n in blocks:
        tables.append(order[at:at + n])
        at += n
    width = max(blocks)
    return kv, torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_kv, group, dim", [(3, 3, 64), (1, 1, 40), (2, 5, 80), (1, 8, 128)])
def test_a_query_gives_the_same_bits_alone_in_its_block_chunked_and_in_a_mix(dtype, num_kv, group, dim):
    gen = torch.Generator().manual_seed(dim + group)
    lengths = [613, 37]  # 613: three fixed key chunks, blocks of 16 queries plus a ragged last one
    kv, tables = pool_and_tables(gen, num_kv, dim, dtype, lengths)
    q_all = torch.randn(sum(lengths), num_kv * group, dim, generator=gen).to(dtype)
    seq_of = [0] * lengths[0] + [1] * lengths[1]
    positions = list(range(lengths[0])) + list(range(lengths[1]))
    whole = call(q_all, kv, tables, seq_of, positions)  # both prompts, every token: blocks of 16

    rng = random.Random(dim)
    picks = sorted(rng.sample(range(len(seq_of)), 24)) + [0, 255, 256, 612, 613]
    for t in picks:  # alone: a block of one query
        alone = call(q_all[t:t + 1], kv, tables, [seq_of[t]], [positions[t]])
        assert torch.equal(alone[0], whole[t]), f"token {t} alone differs from its block"
    for start, stop in [(0, 7), (7, 300), (300, 613), (250, 270)]:  # chunked prefill: other block offsets
        part = call(q_all[start:stop], kv, tables, seq_of[start:stop], positions[start:stop])
        assert torch.equal(part, whole[start:stop]), f"chunk [{start}, {stop}) differs"
    mix = list(range(600, 613)) + list(range(613, 650)) + [3, 400]  # decode-like and prefill-like together
    mixed = call(q_all[mix], kv, tables, [seq_of[t] for t in mix], [positions[t] for t in mix])
    assert torch.equal(mixed, whole[mix])


@needs_op
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_blocked_queries_over_several_chunks_equal_plain_math(dtype, tol):
    """A full prompt's causal attention through the blocked path, against fp64 softmax attention."""
    gen = torch.Generator().manual_seed(7)
    n, num_kv, group, dim = 530, 2, 3, 64
    kv, tables = pool_and_tables(gen, num_kv, dim, dtype, [n])
    q = torch.randn(n, num_kv * group, dim, generator=gen).to(dtype)
    out = call(q, kv, tables, [0] * n, list(range(n)))
    keys = torch.stack([kv[tables[0, p // 16], 0, 0, p % 16] for p in range(n)]).double()   # [S, KV, D]
    values = torch.stack([kv[tables[0, p // 16], 0, 1, p % 16] for p in range(n)]).double()
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)               # [S, H, D]
    scores = torch.einsum("thd,shd->hts", q.double(), k) / math.sqrt(dim)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("hts,shd->thd", scores.softmax(-1), v)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def windowed_plain_math(q, kv, tables, n, window, group, dim):
    """Causal attention over the last `window` keys of each query, fp64 softmax."""
    keys = torch.stack([kv[tables[0, p // 16], 0, 0, p % 16] for p in range(n)]).double()   # [S, KV, D]
    values = torch.stack([kv[tables[0, p // 16], 0, 1, p % 16] for p in range(n)]).double()
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)               # [S, H, D]
    scores = torch.einsum("thd,shd->hts", q.double(), k) / math.sqrt(dim)
    pos = torch.arange(n)
    hidden = (pos[None, :] > pos[:, None]) | (pos[None, :] <= pos[:, None] - window)         # [T, S]
    return torch.einsum("hts,shd->thd", scores.masked_fill(hidden, float("-inf")).softmax(-1), v)


@needs_op
@pytest.mark.parametrize("window", [1, 16, 37, 256, 300])
def test_a_sliding_window_equals_plain_math_and_keeps_every_query_invariant(window):
    """Sliding-window layers (Gemma 3): a query sees its last `window` keys only. Windows at, inside and
    across the fixed key chunks (256), and longer than early contexts; each query's bits the same alone,
    chunked and in its block."""
    gen = torch.Generator().manual_seed(window)
    n, num_kv, group, dim = 613, 1, 4, 64
    kv, tables = pool_and_tables(gen, num_kv, dim, torch.float32, [n])
    q = torch.randn(n, num_kv * group, dim, generator=gen)

    def windowed(rows):
        return paged_attention_op()(q[rows], kv, 0, tables, torch.zeros(len(rows), dtype=torch.int32),
                                    torch.tensor(rows, dtype=torch.int32), 1 / math.sqrt(dim),
                                    DETERMINISTIC_CHUNK_KEYS, window)

    whole = windowed(list(range(n)))
    torch.testing.assert_close(whole.double(), windowed_plain_math(q, kv, tables, n, window, group, dim),
                               rtol=1e-5, atol=1e-5)
    for t in [0, window - 1, window, 255, 256, 257, 511, 612]:
        if 0 <= t < n:
            assert torch.equal(windowed([t])[0], whole[t]), f"token {t} alone differs"
    for start, stop in [(0, 7), (250, 270), (500, 613)]:
        assert torch.equal(windowed(list(range(start, stop))), whole[start:stop])
    full = call(q, kv, tables, [0] * n, list(range(n)))
    assert torch.equal(full[:window], whole[:window])  # before the window fills, nothing is masked
    assert not torch.equal(full[window:], whole[window:])
