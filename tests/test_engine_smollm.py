"""The real SmolLM2 model: paged-cache greedy decoding equals full recomputation."""

import pytest

from kvcluster.engine.sampling import SamplingParams
from kvcluster.engine.sequence import FinishReason
from kvcluster.errors import InvalidArgument
from kvcluster.model.tokenizer import ChatMessage

PROMPTS = [
    "What is the capital of France?",
    "Write a short Python function that reverses a string.",
    "Explain in two sentences why the sky is blue.",
]


@pytest.mark.parametrize("question", PROMPTS)
def test_paged_cache_greedy_equals_no_cache(smollm_engine, question):
    ids = smollm_engine.tokenizer.encode_chat([ChatMessage("user", question)])
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    cached = [e.token_id for e in smollm_engine.generate(ids, params)]
    reference = [e.token_id for e in smollm_engine.generate_no_cache(ids, params)]
    assert len(cached) == 32
    assert cached == reference


def test_generates_sensible_text_and_stops_at_eos(smollm_engine):
    ids = smollm_engine.tokenizer.encode_chat([ChatMessage("user", PROMPTS[0])])
    events = list(smollm_engine.generate(ids, SamplingParams(max_tokens=64, temperature=0.0)))
    assert "Paris" in "".join(e.text for e in events)
    assert events[-1].finish_reason is FinishReason.STOP
    assert events[-1].token_id == smollm_engine.tokenizer.eos_id


def test_stop_string_cuts_output(smollm_engine):
    ids = smollm_engine.tokenizer.encode_chat([ChatMessage("user", "Count from 1 to 20, separated by commas.")])
    full = "".join(e.text for e in smollm_engine.generate(ids, SamplingParams(max_tokens=40, temperature=0.0)))
    assert "5" in full
    events = list(smollm_engine.generate(ids, SamplingParams(max_tokens=40, temperature=0.0, stop=("5",))))
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason is FinishReason.STOP
    assert text == full[:full.index("5")]


@pytest.mark.parametrize("prompt_ids, params, field", [
    ([], SamplingParams(), "prompt"),
    ([5] * 8192, SamplingParams(), "prompt"),
    ([5, 49152], SamplingParams(), "token_ids"),
    ([5], SamplingParams(max_tokens=0), "sampling.max_tokens"),
    ([5], SamplingParams(max_tokens=-3), "sampling.max_tokens"),
    ([5], SamplingParams(top_p=0.0), "sampling.top_p"),
    ([5], SamplingParams(top_p=1.5), "sampling.top_p"),
    ([5], SamplingParams(temperature=-1.0), "sampling.temperature"),
    ([5], SamplingParams(top_k=-1), "sampling.top_k"),
    ([5], SamplingParams(stop=("",)), "sampling.stop"),
])
def test_bad_input_raises_typed_error_naming_field(smollm_engine, prompt_ids, params, field):
    with pytest.raises(InvalidArgument) as err:
        smollm_engine.add_request(prompt_ids, params)
    assert err.value.field == field
    assert field in str(err.value)
    assert not smollm_engine.has_work()
