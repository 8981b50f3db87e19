"""The CUDA path's Triton kernels (kvcluster/model/triton_kernels/) against fp64 math and the C++ CPU ops,
and their batch invariance, bit for bit: a row alone vs in a batch, a prompt in one chunk vs several,
decode vs prefill, a cached prefix vs computed in the same call; float32, bfloat16 and float16.

Without a GPU every kernel runs on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); with one (`make gpu-check`) the same tests run the compiled kernels on CUDA.
Shapes are tiny and ragged on purpose: the interpreter costs about a millisecond per operation per
program, and ragged sizes exercise every mask (tiles, GQA groups, head sizes not powers of two).

A limitation of the interpreter, named here rather than skipped: it stores bfloat16 as raw uint16
and `tl.dot` multiplies those bit patterns (triton-lang/triton#11584, "not supported yet"), as do
its bf16 elementwise ops. The kernels therefore widen bf16/fp16 to fp32 at every load and round once
at the store, so bf16 arithmetic never reaches the interpreter; that is the arithmetic a GPU runs
too (fp32 dots, input_precision="ieee"). test_the_interpreter_cannot_dot_bf16 pins the limitation:
when a Triton upgrade lifts it, a tensor-core bf16 matmul becomes testable here.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from kvcluster.model import triton_kernels as tk
from kvcluster.model.kernels import invariant_linear_op, invariant_pack_op, paged_attention_op, rms_norm_op
from kvcluster.model.llama import _rope
from kvcluster.model.triton_kernels.rounding import round_to

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_interpreter")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp64 agreement: a few units in the last place of the output dtype, at the magnitudes used here
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
CPU_OP_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ matmul and RMSNorm take


def randn(*shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=TOL[dtype], atol=TOL[dtype])


# ---- matmul ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_matches_fp64_and_the_cpu_op_and_a_row_is_the_same_in_any_batch(dtype):
    M, N, K = 40, 150, 70  # two row tiles, two column tiles, two K steps, each ragged
    x, w = randn(M, K, dtype=dtype, seed=1), randn(N, K, dtype=dtype, seed=2)
    packed = tk.invariant_pack(w)
    full = tk.invariant_linear(x, packed, N, K)
    assert full.dtype == dtype and full.shape == (M, N)
    close(full, x.double() @ w.double().T, dtype)
    if dtype in CPU_OP_DTYPES and invariant_linear_op() is not None:
        cpu = invariant_linear_op()(x.cpu(), invariant_pack_op()(w.cpu()), N, K)
        close(full, cpu, dtype)
        if dtype == torch.float32:  # both are one fma per k, in order (the C++ op's stated contract)
            assert torch.equal(full.cpu(), cpu)
    for rows in ([7], [0, 1, 2], list(range(33, 40)), [39, 3, 17, 32, 5]):  # alone, tile edges, shuffled
        part = tk.invariant_linear(x[rows], packed, N, K)
        assert torch.equal(part, full[rows]), rows


def test_matmul_refuses_mismatched_shapes():
    x, w = randn(3, 8, dtype=torch.float32, seed=0), randn(5, 8, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="must be"):
        tk.invariant_linear(x, w, 5, 9)
    with pytest.raises(ValueError, match="share a dtype"):
        tk.invariant_linear(x.to(torch.bfloat16), w, 5, 8)


# ---- RMSNorm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_fp64_and_the_cpu_op_per_row(dtype):
    x, weight = randn(9, 72, dtype=dtype, seed=3), (1 + 0.1 * randn(72, dtype=torch.float32, seed=4)).to(dtype)
    out = tk.rms_norm(x, weight, 1e-5)
    xd = x.double()
    close(out, xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double(), dtype)
    if dtype in CPU_OP_DTYPES and rms_norm_op() is not None:
        close(out, rms_norm_op()(x.cpu(), weight.cpu(), 1e-5), dtype)
    for rows in ([0], [5], [8, 2], list(range(1, 7))):  # alone, another tile position, shuffled
        assert torch.equal(tk.rms_norm(x[rows], weight, 1e-5), out[rows]), rows


# ---- rotary and the KV write -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_is_the_engines_rope_bit_for_bit(dtype):
    """The engine's torch expression (llama._rope) on the same tables, from a strided view of qkv as
    the forward passes it. Under the interpreter each product and sum rounds as torch's ops do; a GPU
    build may fuse a multiply-add, which still depends on the element alone, so there it is close."""
    tokens, heads, kv_heads, dim = 11, 6, 2, 24
    qkv = randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, seed=5)
    qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
    angles = torch.outer(torch.arange(40, dtype=torch.float64), 1.0 / 10000 ** (torch.arange(0, dim, 2) / dim))
    angles = torch.cat([angles, angles], -1)
    cos = angles.cos().to(dtype).to(DEVICE)
    sin = torch.cat([-angles[:, : dim // 2].sin(), angles[:, dim // 2:].sin()], -1).to(dtype).to(DEVICE)
    positions = torch.tensor([3, 4, 5, 6, 7, 30, 31, 0, 1, 2, 39], device=DEVICE)
    rows_cos, rows_sin = cos[positions][:, None, :], sin[positions][:, None, :]
    out = tk.rotary(qk, rows_cos, rows_sin)
    expected = _rope(qk, rows_cos, rows_sin)
    if DEVICE == "cpu":
        assert torch.equal(out, expected)
    else:
        close(out, expected, dtype)
    assert torch.equal(tk.rotary(qk[4:6], rows_cos[4:6], rows_sin[4:6]), out[4:6])  # invariant


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_puts_each_tokens_rows_in_its_slot(dtype):
    block_size, kv_heads, dim = 4, 2, 24
    pool = torch.zeros(6, 3, 2, block_size, kv_heads, dim, dtype=dtype, device=DEVICE)
    qkv = randn(10, 4 * kv_heads * dim, dtype=dtype, seed=6)              # k and v are strided views
    k = qkv[:, 2 * kv_heads * dim: 3 * kv_heads * dim].view(10, kv_heads, dim)
    v = qkv[:, 3 * kv_heads * dim:].view(10, kv_heads, dim)
    slots = torch.tensor([21, 22, 23, 0, 1, 2, 3, 4, 13, 9], device=DEVICE)
    tk.write_kv(pool, 1, k, v, slots)
    expected = torch.zeros_like(pool)
    expected[slots // block_size, 1, 0, slots % block_size] = k
    expected[slots // block_size, 1, 1, slots % block_size] = v
    assert torch.equal(pool, expected)  # every other layer and slot untouched


# ---- paged attention ---------------------------------------------------------------------------

def scattered_pool(lengths, num_kv, dim, dtype, seed, block_size=16):
    """A one-layer pool whose sequences' blocks are scattered, and their block tables [S, W]."""
    blocks = [-(-n // block_size) for n in lengths]
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(sum(blocks) + 2, 1, 2, block_size, num_kv, dim, generator=gen).to(dtype).to(DEVICE)
    order = torch.randperm(pool.shape[0], generator=gen).tolist()
    tables, at = [], 0
    for n in blocks:
        tables.append(order[at:at + n])
        at += n
    width = max(blocks)
    return pool, torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)


def attend(q, pool, tables, seq_of, positions, chunk_keys):
    ints = lambda values: torch.tensor(values, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return tk.paged_attention(q, pool, 0, tables, ints(seq_of), ints(positions), 1 / math.sqrt(q.shape[-1]), chunk_keys)


def reference_attention(q, pool, tables, seq_of, positions, block_size=16):
    """fp64 softmax attention of each query over keys 0..position of its sequence (KV heads repeated)."""
    group = q.shape[1] // pool.shape[4]
    out = []
    for t, (s, p) in enumerate(zip(seq_of, positions)):
        rows = [pool[tables[s, j // block_size], 0, :, j % block_size] for j in range(p + 1)]
        keys = torch.stack(rows).double().repeat_interleave(group, 2)        # [keys, 2, H, D]
        scores = torch.einsum("hd,khd->hk", q[t].double(), keys[:, 0]) / math.sqrt(q.shape[-1])
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), keys[:, 1]))
    return torch.stack(out)


LENGTHS = [21, 5]  # the first spans two 16-key chunks and two 16-token runs; the second one run
CHUNK_KEYS = 16    # small, so that the chunk merge runs on these short contexts (the engine uses 256)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_fp64_and_the_cpu_op(dtype):
    """GQA groups of 3 (padded to 4 rows each), a head size of 24 (padded to 32), two sequences."""
    num_kv, group, dim = 2, 3, 24
    pool, tables = scattered_pool(LENGTHS, num_kv, dim, dtype, seed=7)
    seq_of = [0] * LENGTHS[0] + [1] * LENGTHS[1]
    positions = list(range(LENGTHS[0])) + list(range(LENGTHS[1]))
    q = randn(len(seq_of), num_kv * group, dim, dtype=dtype, seed=8)
    out = attend(q, pool, tables, seq_of, positions, CHUNK_KEYS)
    assert out.dtype == dtype and out.shape == q.shape
    close(out, reference_attention(q, pool, tables, seq_of, positions), dtype)
    if paged_attention_op() is not None:
        ints = lambda values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
        cpu = paged_attention_op()(q.cpu(), pool.cpu(), 0, tables.cpu(), ints(seq_of), ints(positions),
                                   1 / math.sqrt(dim), CHUNK_KEYS)
        close(out, cpu, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_query_is_the_same_alone_chunked_cached_and_mixed(dtype):
    """Bitwise: each token's output whatever else shares the call. Decode is a query alone at its
    position; chunked prefill (and prefill over a cached prefix, the same call) are runs starting
    mid-prompt; a mixed step puts decodes and chunks of two sequences together. Tokens 0..15 alone
    have one chunk (the kernel's no-merge shortcut), in the whole call they are merged."""
    num_kv, group, dim = 1, 4, 16
    pool, tables = scattered_pool(LENGTHS, num_kv, dim, dtype, seed=9)
    seq_of = [0] * LENGTHS[0] + [1] * LENGTHS[1]
    positions = list(range(LENGTHS[0])) + list(range(LENGTHS[1]))
    q = randn(len(seq_of), num_kv * group, dim, dtype=dtype, seed=10)
    whole = attend(q, pool, tables, seq_of, positions, CHUNK_KEYS)

    def call(tokens):
        return attend(q[tokens], pool, tables, [seq_of[t] for t in tokens], [positions[t] for t in tokens], CHUNK_KEYS)

    for t in (0, 15, 17, 25):  # decode: alone
        assert torch.equal(call([t])[0], whole[t]), f"token {t} alone"
    for start, stop in ((0, 3), (3, 19)):  # chunked prefill over a cached prefix (the rest is in the mix)
        assert torch.equal(call(list(range(start, stop))), whole[start:stop]), (start, stop)
    mix = [20, 22, 23, 24, 16, 17, 18, 19, 2]  # a decode, a chunk of the second prompt, one of the first, a decode
    assert torch.equal(call(mix), whole[mix])


def test_attention_without_key_chunks_equals_the_chunked_result_closely():
    """chunk_keys 0: one chunk per query (no merge), the same math in another summation order."""
    pool, tables = scattered_pool([40], 1, 16, torch.float32, seed=11)
    q = randn(3, 2, 16, dtype=torch.float32, seed=12)
    positions = [39, 10, 33]
    one = attend(q, pool, tables, [0, 0, 0], positions, 0)
    close(one, attend(q, pool, tables, [0, 0, 0], positions, 16), torch.float32)
    close(one, reference_attention(q, pool, tables, [0, 0, 0], positions), torch.float32)


def test_attention_refuses_mismatched_shapes():
    pool, tables = scattered_pool([8], 2, 16, torch.float32, seed=13)
    with pytest.raises(ValueError, match="multiple of its KV heads"):
        attend(randn(1, 3, 16, dtype=torch.float32, seed=0), pool, tables, [0], [4], 0)
    with pytest.raises(ValueError, match="share a dtype"):
        attend(randn(1, 2, 16, dtype=torch.bfloat16, seed=0), pool, tables, [0], [4], 0)


def test_query_runs_cut_at_sequences_gaps_and_the_run_length():
    starts, lengths, seqs = tk.attention.query_runs([0] * 20 + [1, 1, 0], list(range(20)) + [4, 5, 7])
    assert starts == [0, 16, 20, 22] and lengths == [16, 4, 2, 1] and seqs == [0, 0, 1, 0]
    assert tk.attention.query_runs([0, 0], [5, 9])[1] == [1, 1]  # not consecutive positions: two runs


@triton.jit
def to_bf16(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, round_to(tl.load(x_ptr + offs), tl.bfloat16))


@triton.jit
def raw_dot(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    rows, cols = tl.arange(0, N)[:, None], tl.arange(0, N)[None, :]
    c = tl.dot(tl.load(a_ptr + rows * N + cols), tl.load(b_ptr + rows * N + cols))
    tl.store(c_ptr + rows * N + cols, c)


def test_rounding_to_bf16_is_torchs_round_to_nearest_even():
    """Ties, carries into the exponent, the largest values, infinities and NaN (the interpreter's own
    cast truncates; kvcluster.model.triton_kernels.rounding writes the rounding out on the bits)."""
    bits = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3FFF8000, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00001,
            0xBF808001, 0x00008000, 0x80000000, 0x00000001, 0x3F800000, 0x40490FDB, 0xC0490FDB, 0x7F7F8000]
    x = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32).to(DEVICE)
    out = torch.empty(len(bits), dtype=torch.bfloat16, device=DEVICE)
    to_bf16[(1,)](x, out, N=len(bits))
    expected = x.to(torch.bfloat16)
    nan = expected.isnan()  # torch's own NaN bits differ between its scalar (0x7fc0) and vector (0xffff) paths
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16).cpu(), expected[~nan].view(torch.int16).cpu())


# ---- the interpreter's limitation ------------------------------------------------------------

@pytest.mark.skipif(DEVICE != "cpu", reason="about Triton's CPU interpreter; a GPU computes bf16 dots natively")
def test_the_interpreter_cannot_dot_bf16():
    """Why the kernels widen bf16 before every dot: the interpreter multiplies bf16 bit patterns. If
    this starts failing after a Triton upgrade, the interpreter has learned bf16 and a tensor-core
    (bf16-operand) matmul can be tested here."""
    a = torch.randint(-2, 3, (16, 16)).float()
    b = torch.randint(-2, 3, (16, 16)).float()
    results = {}
    for dtype in (torch.float16, torch.bfloat16):
        c = torch.zeros(16, 16)
        raw_dot[(1,)](a.to(dtype), b.to(dtype), c, N=16)
        results[dtype] = c
    assert torch.equal(results[torch.float16], a @ b)      # small integers: exact in any precision
    assert not torch.allclose(results[torch.bfloat16], a @ b)  # the bit patterns were multiplied


def test_the_interpreters_fma_rounds_once():
    """tests/triton_interpreter.py's fma is correctly rounded where a multiply then an add, or an fp64
    fma rounded again to fp32, is not."""
    import numpy as np

    from tests.triton_interpreter import fma_fp32

    one = np.float32(1)
    a = np.array([1 + 2 ** -12, 2 ** -12 * (1 + 2 ** -23)], dtype=np.float32)
    b = np.array([1 + 2 ** -12, 2 ** -12 * (1 - 2 ** -23)], dtype=np.float32)
    c = np.array([-(1 + 2 ** -11), 1 + 2 ** -23], dtype=np.float32)
    fused = fma_fp32(a, b, c)
    assert fused[0] == np.float32(2.0 ** -24) and (a * b + c)[0] == 0                    # product not rounded
    assert fused[1] == one + np.float32(2 ** -23)                                        # exact: just below a tie
    assert (a.astype(np.float64) * b + c.astype(np.float64)).astype(np.float32)[1] == one + np.float32(2 ** -22)
