"""The step's attention paths (kvcluster.model.attention) against plain math and each other."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from kvcluster.engine.sampling import SamplingParams
from kvcluster.model.kernels import few_rows_linear_op, paged_attention_op, rms_norm_op
from kvcluster.model.llama import DecodeSeq, PrefillSeq
from tests.conftest import TINY_CONFIG, make_tiny_engine

needs_op = pytest.mark.skipif(paged_attention_op() is None, reason="compiled kernels unavailable on this machine")


def reference_attention(q, kv, layer, table, position):
    """One query token [H, D] over keys 0..position of a sequence, by explicit gather, in fp64."""
    block_size, nkv = kv.shape[3], kv.shape[4]
    keys = torch.stack([kv[table[p // block_size], layer, 0, p % block_size] for p in range(position + 1)])  # [S, KV, D]
    values = torch.stack([kv[table[p // block_size], layer, 1, p % block_size] for p in range(position + 1)])
    group = q.shape[0] // nkv
    k, v = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)  # [S, H, D]
    scores = torch.einsum("hd,shd->hs", q.double(), k) / math.sqrt(q.shape[-1])
    return torch.einsum("hs,shd->hd", scores.softmax(-1), v)


@needs_op
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_op_equals_plain_math_over_ragged_tables(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(40, 3, 2, 16, 2, 32, generator=gen).to(dtype)  # [N, L, 2, bs, KV, D]
    tables = [[7, 3, 39], [0], [12, 5, 6, 30]]                          # scattered, out of order
    seq_of, positions = [0, 0, 1, 2, 2], [33, 47, 0, 15, 63]            # block edges: 15/16, 47, 63
    q = torch.randn(len(seq_of), 6, 32, generator=gen).to(dtype)       # 6 query heads over 2 kv heads
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    out = paged_attention_op()(q, kv, 1, padded, torch.tensor(seq_of, dtype=torch.int32),
                               torch.tensor(positions, dtype=torch.int32), 1 / math.sqrt(32))
    assert out.dtype == dtype and out.shape == q.shape
    for t, (s, p) in enumerate(zip(seq_of, positions)):
        expected = reference_attention(q[t], kv, 1, tables[s], p)
        torch.testing.assert_close(out[t].double(), expected, rtol=tol, atol=tol)


@needs_op
@pytest.mark.parametrize("positions", [[700], [700, 20], [255, 1000, 511]])
def test_op_splits_long_contexts_and_still_equals_plain_math(positions):
    """Few queries over long contexts are split into chunks across threads, then merged."""
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(70, 1, 2, 16, 2, 32, generator=gen)
    order = torch.randperm(70, generator=gen).tolist()
    tables = [order[:64], order[6:70], order[3:67]][: len(positions)]  # 1,024 tokens each
    q = torch.randn(len(positions), 6, 32, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(8)  # 2-3 chunks per query whatever the machine; the 20-token one leaves a chunk empty
    try:
        out = paged_attention_op()(q, kv, 0, torch.tensor(tables, dtype=torch.int32),
                                   torch.arange(len(positions), dtype=torch.int32),
                                   torch.tensor(positions, dtype=torch.int32), 1 / math.sqrt(32))
    finally:
        torch.set_num_threads(threads)
    for t, p in enumerate(positions):
        torch.testing.assert_close(out[t].double(), reference_attention(q[t], kv, 0, tables[t], p), rtol=1e-5, atol=1e-5)


@needs_op
def test_op_refuses_tables_outside_the_pool():
    kv = torch.zeros(4, 1, 2, 16, 1, 8)
    q = torch.zeros(1, 1, 8)
    first, zero, past_block = (torch.tensor(v, dtype=torch.int32) for v in ([[1]], [0], [16]))
    paged_attention_op()(q, kv, 0, first, zero, zero, 1.0)  # in range: fine
    with pytest.raises(RuntimeError, match="outside the pool"):
        paged_attention_op()(q, kv, 0, first + 3, zero, zero, 1.0)
    with pytest.raises(RuntimeError, match="beyond its block table"):
        paged_attention_op()(q, kv, 0, first, zero, past_block, 1.0)


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


def torch_only(engine):
    """The plain torch attention path: no compiled op, so an engine of the fast numerics (built with
    deterministic=False: the batch-invariant numerics run every attention through the op)."""
    assert engine.model.numerics == "fast"
    engine.model.paged_op = None
    return engine


@needs_op
def test_decode_and_short_prefill_kernel_equal_torch_path(tokenizer):
    # The fast numerics' paths (an explicit opt-out: the default runs every attention through the op).
    fast, plain = (make_tiny_engine(tokenizer, deterministic=False) for _ in range(2))
    torch_only(plain)
    lengths = (5, 16, 31, 70)
    for eng in (fast, plain):
        eng.tables = [eng.blocks.allocate(6) for _ in lengths]
        for n, table in zip(lengths, eng.tables):
            eng.model.prefill(eng.pool.kv, [PrefillSeq(prompt(n, n), 0, table)])
    decode = [eng.model.decode(eng.pool.kv, [DecodeSeq(9, n, t) for n, t in zip(lengths, eng.tables)])
              for eng in (fast, plain)]
    torch.testing.assert_close(decode[0], decode[1], rtol=1e-5, atol=1e-5)
    # A warm request's last forward: 3 new tokens over 71 cached go through the op (KernelAttention).
    chunk = [eng.model.prefill(eng.pool.kv, [PrefillSeq([4, 5, 6], 71, eng.tables[3]), PrefillSeq([8], 6, eng.tables[0])])
             for eng in (fast, plain)]
    # Logits of order 1 after two layers and a 49,152-row head: fp32 reordering noise stays below 5e-5.
    torch.testing.assert_close(chunk[0], chunk[1], rtol=1e-4, atol=5e-5)


def test_several_prompts_in_one_forward_equal_each_alone(tokenizer):
    eng = make_tiny_engine(tokenizer, deterministic=False)  # the fast numerics' SDPA paths (an explicit opt-out)
    seqs = [PrefillSeq(prompt(n, n), 0, eng.blocks.allocate(5)) for n in (3, 40, 17)]
    together = eng.model.prefill(eng.pool.kv, seqs)      # one masked SDPA per layer
    keys_together = eng.pool.kv[seqs[1].block_table].clone()
    alone = torch.cat([eng.model.prefill(eng.pool.kv, [s]) for s in seqs])  # the causal path
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys_together, eng.pool.kv[seqs[1].block_table], rtol=1e-6, atol=1e-6)
    # A chunk continuing a cached prefix next to a fresh prompt: the gathering masked path.
    mixed = eng.model.prefill(eng.pool.kv, [PrefillSeq(prompt(12, 1), 40, seqs[1].block_table), seqs[0]])
    torch.testing.assert_close(mixed[1], alone[0], rtol=1e-5, atol=1e-5)


def test_rope_with_folded_sign_equals_rotate_half(tiny_engine):
    from kvcluster.model.llama import _rope

    model = tiny_engine.model
    x = torch.randn(5, 3, TINY_CONFIG.head_dim)
    pos = torch.tensor([0, 1, 7, 100, 511])
    half = TINY_CONFIG.head_dim // 2
    true_sin = model.sin[pos].clone()
    true_sin[:, :half] = -true_sin[:, :half]
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    expected = x * model.cos[pos][:, None] + rotated * true_sin[:, None]
    assert torch.equal(_rope(x, model.cos[pos][:, None], model.sin[pos][:, None]), expected)


@pytest.mark.parametrize("path", ["batch-invariant", "fast", "torch"])
def test_bf16_cached_equals_uncached_greedy(tokenizer, path):
    from kvcluster.engine.engine import EngineConfig, random_engine

    config = EngineConfig(kv_capacity_bytes=8 << 20, deterministic=path == "batch-invariant")
    eng = random_engine(TINY_CONFIG, tokenizer, seed=1234, engine_config=config, dtype="bfloat16")
    if path == "torch":
        torch_only(eng)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for length in (1, 17, 40):
        ids = prompt(length, length)
        cached = [e.token_id for e in eng.generate(ids, params)]
        assert cached == [e.token_id for e in eng.generate_no_cache(ids, params)]


def test_bf16_prepacked_linear_equals_plain_linear():
    from kvcluster.model.llama import Linear

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bf16 on this CPU")
    w = torch.randn(96, 64).bfloat16()
    linear = Linear.make(w)  # no few-rows op: oneDNN at every row count
    assert linear.packed is not None
    for rows in (1, 7, 300):
        x = torch.randn(rows, 64).bfloat16()
        assert torch.equal(linear(x), F.linear(x, w))


def test_fp32_linear_close_to_plain_linear():
    from kvcluster.model.llama import Linear

    w = torch.randn(96, 64)
    linear = Linear.make(w)
    for rows in (1, 2, 16, 300):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(linear(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_op
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)])
def test_few_rows_linear_equals_plain_math(dtype, tol):
    """1-6 rows (the op takes x rows 4 at a time), K with a tail of 8 past a multiple of 16, odd N."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(37, 200, generator=gen).to(dtype)
    for rows in range(1, 7):
        x = torch.randn(rows, 200, generator=gen).to(dtype)
        out = few_rows_linear_op()(x, w)
        assert out.dtype == dtype and out.shape == (rows, 37)
        # fp32 accumulation, one rounding to the dtype at the end
        torch.testing.assert_close(out.double(), x.double() @ w.double().T, rtol=tol, atol=tol)


@needs_op
def test_linear_takes_the_few_rows_op_up_to_its_limit():
    from kvcluster.model.llama import FEW_ROWS_MAX, Linear

    calls = []

    def counted(x, w):
        calls.append(x.shape[0])
        return few_rows_linear_op()(x, w)

    w = torch.randn(96, 64)
    linear = Linear.make(w, counted)
    for rows in (1, FEW_ROWS_MAX, FEW_ROWS_MAX + 1, 300):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(linear(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert calls == [1, FEW_ROWS_MAX]


@needs_op
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)])
def test_rms_norm_op_equals_plain_math(dtype, tol):
    gen = torch.Generator().manual_seed(4)
    weight = (1 + 0.1 * torch.randn(200, generator=gen)).to(dtype)  # 200: a tail past a multiple of 16
    for rows in (1, 3, 70):
        x = (3 * torch.randn(rows, 200, generator=gen)).to(dtype)
        out = rms_norm_op()(x, weight, 1e-5)
        assert out.dtype == dtype and out.shape == x.shape
        expected = F.rms_norm(x.double(), (200,), weight.double(), 1e-5)
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
