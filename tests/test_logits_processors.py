"""The batched logits step: penalties, logit bias, min_tokens and logprobs do what OpenAI/vLLM say, and
a shaped request gets the same tokens (and bitwise the same logprobs) alone, batched with others,
warm from the prefix cache, after a preemption and resumed elsewhere, as the no-cache reference."""

from types import SimpleNamespace

import pytest
import torch

from kvcluster.engine.logits_processors import pick, shape_logits
from kvcluster.engine.sampling_params import SamplingParams
from kvcluster.errors import InvalidArgument

VOCAB = 50
EOS = 2


def fake_seq(params: SamplingParams, output_ids=(), prompt_ids=(7,)) -> SimpleNamespace:
    return SimpleNamespace(params=params, output_ids=list(output_ids), prompt_ids=list(prompt_ids), eos_ids={EOS},
                           grammar=None, prompt_token_set=None)


def flat(value: float = 1.0) -> torch.Tensor:
    return torch.full((1, VOCAB), value)


def test_presence_and_frequency_penalties_subtract_per_appearance_and_per_count():
    seq = fake_seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), output_ids=[3, 3, 3, 9])
    scores = shape_logits(flat(), [seq])[0]
    assert scores[3].item() == pytest.approx(1 - 0.5 - 3 * 0.25)
    assert scores[9].item() == pytest.approx(1 - 0.5 - 0.25)
    assert scores[7].item() == 1.0  # a prompt token: these penalties look at the output only


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = flat()
    logits[0, 4] = -2.0
    seq = fake_seq(SamplingParams(repetition_penalty=2.0), output_ids=[4], prompt_ids=[5, 5])
    scores = shape_logits(logits, [seq])[0]
    assert scores[5].item() == 0.5 and scores[4].item() == -4.0 and scores[6].item() == 1.0


def test_logit_bias_adds_to_the_listed_tokens_and_can_force_one():
    seq = fake_seq(SamplingParams(temperature=0.0, logit_bias=((11, 100.0), (12, -100.0))))
    scores = shape_logits(flat(), [seq])[0]
    assert scores[11].item() == 101.0 and scores[12].item() == -99.0
    assert pick(flat(), [seq]).tokens == [11]


def test_min_tokens_holds_back_eos_and_stop_tokens_until_reached():
    logits = flat()
    logits[0, EOS] = 50.0
    logits[0, 8] = 40.0
    early = fake_seq(SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(8,)), output_ids=[1])
    done = fake_seq(SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(8,)), output_ids=[1, 1])
    assert pick(logits.repeat(2, 1), [early, done]).tokens[1] == EOS
    scores = shape_logits(logits, [early])[0]
    assert scores[EOS].item() == float("-inf") and scores[8].item() == float("-inf")
    ignoring = fake_seq(SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True))
    assert pick(logits, [ignoring]).tokens == [EOS]  # with ignore_eos EOS is an ordinary token


def test_rows_without_shaping_are_left_alone():
    plain, biased = fake_seq(SamplingParams()), fake_seq(SamplingParams(logit_bias=((3, 5.0),)))
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    scores = shape_logits(logits, [plain, biased])
    assert torch.equal(scores[0], logits[0]) and scores[1, 3] == logits[1, 3] + 5
    assert shape_logits(logits, [plain, plain]) is logits  # nothing to shape: no copy at all


def test_logprobs_are_the_raw_log_softmax_and_the_top_list_is_ordered():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    seq = fake_seq(SamplingParams(temperature=0.0, logprobs=3, presence_penalty=1.0))
    picked = pick(logits, [seq])
    expected = torch.log_softmax(logits[0], dim=-1)
    entry = picked.logprobs[0]
    assert entry.logprob == expected[picked.tokens[0]].item()
    assert [t for t, _ in entry.top] == expected.topk(3).indices.tolist()
    assert [v for _, v in entry.top] == expected.topk(3).values.tolist()
    assert pick(logits, [fake_seq(SamplingParams(logprobs=None))]).logprobs == [None]


@pytest.mark.parametrize("field, value, limit", [
    ("presence_penalty", 2.5, "[-2, 2]"), ("frequency_penalty", float("nan"), "[-2, 2]"),
    ("repetition_penalty", 0.0, "[0.01, 2]"), ("min_tokens", 200, "max_tokens = 128"),
    ("logit_bias", ((1, 101.0),), "[-100, 100]"), ("logit_bias", ((10 ** 6, 1.0),), "[0, 49152)"),
    ("logit_bias", tuple((i, 1.0) for i in range(301)), "at most 300"), ("logprobs", 21, "[0, 20]"),
    ("stop_token_ids", tuple(range(65)), "at most 64"),
])
def test_out_of_range_values_name_the_field_and_the_limit(field, value, limit):
    with pytest.raises(InvalidArgument) as err:
        SamplingParams(**{field: value}).validate(49152, 8192)
    assert err.value.field == f"sampling.{field}" and limit in str(err.value)


SHAPED = [
    SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, frequency_penalty=1.5, presence_penalty=0.5,
                   logprobs=2),
    SamplingParams(max_tokens=10, temperature=0.9, seed=5, repetition_penalty=1.3, logit_bias=((100, 3.0),),
                   logprobs=0),
    SamplingParams(max_tokens=10, temperature=0.7, seed=9, min_tokens=6, top_p=0.9),
]


def reference(engine, prompt, params) -> list[tuple[int, object]]:
    return [(e.token_id, e.logprobs) for e in engine.generate_no_cache(prompt, params)]


def run_all(engine, prompts, params_list) -> list[list[tuple[int, object]]]:
    seqs = [engine.add_request(p, params) for p, params in zip(prompts, params_list)]
    events = {s.request_id: [] for s in seqs}
    while any(s.finish_reason is None for s in seqs):
        for event in engine.step():
            events[event.request_id].append((event.token_id, event.logprobs))
    return [events[s.request_id] for s in seqs]


def test_shaped_requests_match_the_reference_alone_batched_and_warm(tiny_engine):
    prompts = [list(range(5, 5 + 40)), list(range(300, 340)), list(range(5, 5 + 40)) + [9, 9]]
    expected = [reference(tiny_engine, p, params) for p, params in zip(prompts, SHAPED)]
    assert all(out[0][1] is not None for out in expected[:2])  # logprobs were asked for and came back
    assert run_all(tiny_engine, prompts, SHAPED) == expected          # one batch, cold
    assert run_all(tiny_engine, prompts, SHAPED) == expected          # warm: every prompt block cached
    alone = [run_all(tiny_engine, [p], [params])[0] for p, params in zip(prompts, SHAPED)]
    assert alone == expected


def test_preempted_and_resumed_shaped_requests_continue_exactly(tokenizer):
    from tests.conftest import make_tiny_engine
    engine = make_tiny_engine(tokenizer, kv_blocks=8)  # too small for three: preemptions happen
    prompts = [list(range(20 + 30 * i, 50 + 30 * i)) for i in range(3)]
    expected = [reference(engine, p, params) for p, params in zip(prompts, SHAPED)]
    assert run_all(engine, prompts, SHAPED) == expected
    assert engine.num_preemptions > 0
    for prompt, params, want in zip(prompts, SHAPED, expected):  # failover: the first 4 tokens handed over
        handed = [t for t, _ in want[:4]]
        seq = engine.add_request(prompt, params, output_ids=handed)
        while seq.finish_reason is None:
            engine.step()
        assert seq.output_ids == [t for t, _ in want]  # penalties counted the handed-over tokens
