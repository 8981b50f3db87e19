"""Sampling: seeded draws reproduce, temperature 0 is greedy, top-k/top-p restrict the choice."""

import torch

from kvcluster.engine.sampling import SamplingParams, sample


def logits(seed: int = 0, vocab: int = 1000) -> torch.Tensor:
    return torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draws(params: SamplingParams, n: int = 40) -> list[int]:
    return [sample(logits(i), [params], [i])[0] for i in range(n)]


def test_same_seed_reproduces_and_other_seed_differs():
    p = SamplingParams(temperature=1.0, seed=42)
    assert draws(p) == draws(p)
    assert draws(p) != draws(SamplingParams(temperature=1.0, seed=43))


def test_temperature_zero_is_greedy():
    for i in range(10):
        row = logits(i)
        assert sample(row, [SamplingParams(temperature=0.0)], [0]) == [int(row.argmax())]


def test_top_k_one_is_greedy_and_top_k_bounds_choices():
    row = logits(5)
    assert {sample(row, [SamplingParams(top_k=1, seed=s)], [0])[0] for s in range(20)} == {int(row.argmax())}
    top3 = set(torch.topk(row[0], 3).indices.tolist())
    assert {sample(row, [SamplingParams(top_k=3, seed=s)], [0])[0] for s in range(50)} <= top3


def test_top_p_keeps_the_nucleus():
    row = torch.full((1, 10), -10.0)
    row[0, 3], row[0, 7] = 5.0, 4.0  # ~73% and ~27% of the mass
    picks = {sample(row, [SamplingParams(top_p=0.5, seed=s)], [0])[0] for s in range(30)}
    assert picks == {3}
    wider = {sample(row, [SamplingParams(top_p=0.99, seed=s)], [0])[0] for s in range(60)}
    assert wider == {3, 7}


def test_each_row_uses_its_own_params():
    rows = torch.cat([logits(1), logits(2)])
    out = sample(rows, [SamplingParams(temperature=0.0), SamplingParams(top_k=1, seed=1)], [0, 0])
    assert out == rows.argmax(dim=-1).tolist()


def test_seeded_engine_generation_reproduces(tiny_engine):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    a = [e.token_id for e in tiny_engine.generate([5, 6, 7], params)]
    b = [e.token_id for e in tiny_engine.generate_no_cache([5, 6, 7], params)]
    assert a == b
