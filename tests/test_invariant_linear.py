"""The batch-invariant matmul (csrc/invariant_linear.cpp): a row's result is bitwise the same whatever
shares its batch, however many threads run it, and (fp32) is exactly the stated FMA chain."""

import random

import pytest
import torch
import torch.nn.functional as F

from kvcluster.model.kernels import invariant_linear_op, invariant_pack_op
from kvcluster.model.llama import LlamaModel, LlamaWeights, Linear
from tests.conftest import TINY_CONFIG

needs_op = pytest.mark.skipif(invariant_linear_op() is None, reason="compiled kernels unavailable on this machine")
DTYPES = [torch.float32, torch.bfloat16]
# (N, K): ragged, tiny-model (qkv, o, gate_up, down) and SmolLM2 shapes
SHAPES = [(50, 37), (33, 1), (17, 130), (128, 64), (64, 64), (256, 64), (64, 128), (960, 576), (576, 1536)]


def linear(x, packed, w):
    return invariant_linear_op()(x, packed, w.shape[0], w.shape[1])


def data(N, K, rows, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=gen).to(dtype), torch.randn(rows, K, generator=gen).to(dtype)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K", SHAPES)
def test_a_row_is_the_same_in_any_batch(dtype, N, K):
    w, x = data(N, K, 700, dtype, seed=N * 1000 + K)
    packed = invariant_pack_op()(w)
    full = linear(x, packed, w)                                   # every row inside the 700-row batch
    rng = random.Random(N + K)
    for _ in range(6):                                            # sub-batches of random size and offset
        m = rng.randint(1, 600)
        s = rng.randint(0, 700 - m)
        assert torch.equal(linear(x[s:s + m], packed, w), full[s:s + m]), (m, s)
    for m in (1, 2, 3, 4, 8, 15, 16, 17, 29):                      # every tile height and the M-block edge
        assert torch.equal(linear(x[5:5 + m], packed, w), full[5:5 + m]), m
    for i in rng.sample(range(700), 8):                           # alone
        assert torch.equal(linear(x[i:i + 1], packed, w), full[i:i + 1]), i
    perm = torch.randperm(700, generator=torch.Generator().manual_seed(1))[:123]  # shuffled into another batch
    assert torch.equal(linear(x[perm], packed, w), full[perm])


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, M", [(4000, 576, 1), (4000, 576, 3), (3072, 576, 16), (960, 576, 200), (100, 37, 300)])
def test_thread_count_does_not_change_the_result(dtype, N, K, M):
    w, x = data(N, K, M, dtype, seed=7)
    packed = invariant_pack_op()(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(x, packed, w)
        torch.set_num_threads(2)
        two = linear(x, packed, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_op
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("N, K", SHAPES)
def test_close_to_f_linear(dtype, rtol, N, K):
    w, x = data(N, K, 40, dtype, seed=3)
    out = linear(x, invariant_pack_op()(w), w)
    assert out.dtype == dtype and out.shape == (40, N)
    exact = F.linear(x.double(), w.double())
    scale = exact.abs().max()
    assert ((out.double() - exact).abs().max() / scale) < rtol


def fma_chain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The fp32 contract computed independently of the extension: acc = fma(x[m,k], w[n,k], acc) over
    k in order, each fma rounded once to fp32. The product of two fp32 is exact in fp64; the sum
    with acc is made exact with TwoSum (s + e), and rounding s + e to fp32 differs from rounding s only
    when s is exactly halfway between two fp32 values, where e's sign decides."""
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32)
    for k in range(x.shape[1]):
        p = x[:, k, None].double() * w[None, :, k].double()           # exact
        c = acc.double()
        s = p + c
        bb = s - p
        e = (p - (s - bb)) + (c - bb)                                 # s + e == p + c exactly
        r = s.float()
        lo = torch.where(r.double() <= s, r, torch.nextafter(r, torch.tensor(-float("inf"))))
        hi = torch.nextafter(lo, torch.tensor(float("inf")))
        halfway = (s - lo.double()) == (hi.double() - s)
        acc = torch.where(halfway & (e > 0), hi, torch.where(halfway & (e < 0), lo, r))
    return acc


@needs_op
@pytest.mark.parametrize("N, K", [(50, 37), (33, 1), (17, 130), (64, 64)])
def test_fp32_is_exactly_the_fma_chain(N, K):
    w, x = data(N, K, 20, torch.float32, seed=11)
    x[3] *= 1e-3  # mixed magnitudes: more rounding in the chain
    out = linear(x, invariant_pack_op()(w), w)
    reference = torch.ops.kvcluster.invariant_linear_reference(x, w)  # the scalar std::fma loop
    assert torch.equal(out, reference)
    assert torch.equal(out, fma_chain(x, w))
    rounded_exact = (x.double() @ w.double().T).float()
    if K == 1:  # one product, exact in fp64, rounded once: the chain is exact math
        assert torch.equal(out, rounded_exact)
    else:  # rounded at every step: the chain is not exact math
        assert not torch.equal(out, rounded_exact)


def test_fma_chain_reference_rounds_ties_by_the_lost_bits():
    # 1 + 2^-24 is halfway between fp32 1 and its successor; + 2^-60 pushes a true fma above it.
    x = torch.tensor([[1.0, 2.0**-30]])
    w = torch.tensor([[1.0 + 2.0**-23, 2.0**-30]])  # products: 1 + 2^-23, 2^-60
    x2 = torch.tensor([[1.0, 1.0]])
    w2 = torch.tensor([[1.0, 2.0**-24]])          # 1 + 2^-24: a tie, to even (1.0)
    assert fma_chain(x, w).item() == 1.0 + 2.0**-23
    assert fma_chain(x2, w2).item() == 1.0


def pairs_odd_first(t: torch.Tensor) -> torch.Tensor:
    """[rows, K] -> [rows, 2*ceil(K/2)] in fp32, zero-padded, each k pair swapped: the order in which
    the bf16 contract (and vdpbf16ps) takes k."""
    padded = torch.zeros(t.shape[0], (t.shape[1] + 1) // 2 * 2)
    padded[:, : t.shape[1]] = t.float()
    return padded.view(t.shape[0], -1, 2).flip(-1).reshape(t.shape[0], -1).contiguous()


@needs_op
@pytest.mark.parametrize("N, K", [(50, 37), (33, 1), (17, 130), (128, 64), (960, 576), (64, 1536)])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e3])
def test_bf16_is_exactly_the_pairwise_fma_chain(N, K, scale):
    w, x = data(N, K, 24, torch.bfloat16, seed=13)
    x = (x.float() * scale).to(torch.bfloat16)
    x[::3] = (x[::3].float() * 1e-2).to(torch.bfloat16)  # mixed magnitudes (no denormals: vdpbf16ps flushes them)
    out = linear(x, invariant_pack_op()(w), w)
    chain = torch.ops.kvcluster.invariant_linear_reference(pairs_odd_first(x), pairs_odd_first(w))
    assert torch.equal(out, chain.to(torch.bfloat16))


@needs_op
def test_bf16_output_is_rounded_once_to_nearest_even():
    # K = 1: the bf16 product is exact in fp32, so the output must be static_cast<BFloat16>(x * w).
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(300, 1, generator=gen).to(torch.bfloat16)
    x = torch.randn(64, 1, generator=gen).to(torch.bfloat16)
    out = linear(x, invariant_pack_op()(w), w)
    assert torch.equal(out, (x.float() @ w.float().T).to(torch.bfloat16))


@needs_op
def test_empty_and_strided_inputs():
    w, x = data(50, 37, 10, torch.float32, seed=2)
    packed = invariant_pack_op()(w)
    assert linear(x[:0], packed, w).shape == (0, 50)
    wide = torch.randn(10, 74)
    assert torch.equal(linear(wide[:, ::2], packed, w), linear(wide[:, ::2].contiguous(), packed, w))
    with pytest.raises(RuntimeError):
        invariant_linear_op()(x, packed, 100, 37)  # (the packed tensor knows N only to its panel of 32)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_takes_the_invariant_op_at_every_row_count(dtype):
    w, x = data(256, 64, 40, dtype, seed=9)
    layer = Linear.make(w, invariant=True)
    full = layer(x)
    for m in (1, 2, 3, 4, 9, 40):
        assert torch.equal(layer(x[:m]), full[:m])
    assert torch.equal(full, linear(x, invariant_pack_op()(w), w))


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_model_builds_invariant_linears(dtype):
    weights = LlamaWeights.random(TINY_CONFIG, 0)
    model = LlamaModel(TINY_CONFIG, weights, "cpu", dtype, deterministic=True)
    assert all(lin.invariant is not None for layer in model.linears for lin in layer) and model.lm_head.invariant is not None
    plain = LlamaModel(TINY_CONFIG, weights, "cpu", dtype, deterministic=False)
    assert all(lin.invariant is None for layer in plain.linears for lin in layer)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_decode_logits_do_not_depend_on_the_batch(dtype):
    """With every matmul invariant (and the per-row attention, norm and rope ops), a sequence's decode
    logits are the same alone, in the full batch and in a sub-batch."""
    from kvcluster.model.llama import DecodeSeq, PrefillSeq

    model = LlamaModel(TINY_CONFIG, LlamaWeights.random(TINY_CONFIG, 0), "cpu", dtype, deterministic=True)
    kv = torch.zeros(48, TINY_CONFIG.num_layers, 2, 16, TINY_CONFIG.num_kv_heads, TINY_CONFIG.head_dim, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(6):
        ids = torch.randint(100, 40000, (20 + 7 * i,), generator=gen).tolist()
        table = list(range(i * 8, i * 8 + 8))
        model.prefill(kv, [PrefillSeq(ids, 0, table)])
        seqs.append(DecodeSeq(ids[-1], len(ids), table))
    together = model.decode(kv, seqs)
    assert torch.equal(torch.cat([model.decode(kv, [s]) for s in seqs]), together)
    assert torch.equal(model.decode(kv, seqs[2:5]), together[2:5])
