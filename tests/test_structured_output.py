"""Structured output through llguidance on the tiny engine with SmolLM2's real tokenizer: the output
validates against its JSON Schema, constrained and unconstrained requests batched together get the
tokens each gets alone, a resumed request continues in the same grammar state, and bad schemas are
refused with INVALID_ARGUMENT naming the field."""

import json

import jsonschema
import pytest

from kvcluster.engine.sampling_params import MAX_SCHEMA_CHARS, SamplingParams, StructuredOutput
from kvcluster.engine.sequence import FinishReason
from kvcluster.errors import InvalidArgument

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}}}
PROMPT = list(range(200, 230))


def person_params(seed: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=120, temperature=1.0, seed=seed,
                          structured=StructuredOutput("json_schema", json.dumps(PERSON)), **extra)


def text_of(events) -> str:
    return "".join(e.text for e in events)


def test_output_validates_against_the_schema(tiny_engine):
    for seed in range(3):
        events = list(tiny_engine.generate(PROMPT, person_params(seed)))
        assert events[-1].finish_reason is FinishReason.STOP
        jsonschema.validate(json.loads(text_of(events)), PERSON)


def test_json_object_with_a_bias_toward_the_closing_brace(tiny_engine, tokenizer):
    close = tokenizer.encode("}")[0]
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, logit_bias=((close, 100.0),),
                            structured=StructuredOutput("json_object"))
    events = list(tiny_engine.generate(PROMPT, params))
    assert json.loads(text_of(events)) == {} and events[-1].finish_reason is FinishReason.STOP  # the grammar ended it


def test_min_tokens_gives_way_to_a_complete_grammar(tiny_engine, tokenizer):
    close = tokenizer.encode("}")[0]
    params = SamplingParams(max_tokens=50, temperature=0.0, min_tokens=10, logit_bias=((close, 100.0),),
                            structured=StructuredOutput("json_object"))
    assert text_of(tiny_engine.generate(PROMPT, params)) == "{}"


def test_constrained_and_free_requests_batched_match_each_alone(tiny_engine):
    free = SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:20], list(range(900, 925)), PROMPT[5:]]
    params = [person_params(1), free, person_params(2, presence_penalty=0.5), free]
    alone = [[e.token_id for e in tiny_engine.generate_no_cache(p, sp)] for p, sp in zip(prompts, params)]
    seqs = [tiny_engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while any(s.finish_reason is None for s in seqs):
        tiny_engine.step()
    assert [s.output_ids for s in seqs] == alone


def test_a_resumed_request_continues_in_the_same_grammar_state(tiny_engine):
    params = person_params(7)
    full = [e.token_id for e in tiny_engine.generate(PROMPT, params)]
    seq = tiny_engine.add_request(PROMPT, params, output_ids=full[:5])
    while seq.finish_reason is None:
        tiny_engine.step()
    assert seq.output_ids == full
    with pytest.raises(InvalidArgument) as err:  # handed-over tokens that break the grammar
        tiny_engine.add_request(PROMPT, params, output_ids=[full[1], full[0]])
    assert err.value.field == "resume_token_ids"


@pytest.mark.parametrize("schema, problem", [
    ('{"type": "object"', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"type": "nope"}', "not a usable JSON Schema"),
    ('{"properties": {"a": {"$ref": "#/definitions/missing"}}}', "not a usable JSON Schema"),
    ('{"type": "string", "minLength": -1}', "not a usable JSON Schema"),
    ("[" * 30_000 + "]" * 30_000, "not valid JSON"),
    ('{"description": "' + "x" * MAX_SCHEMA_CHARS + '"}', f"1 to {MAX_SCHEMA_CHARS} characters"),
    ("", f"1 to {MAX_SCHEMA_CHARS} characters"),
])
def test_bad_schemas_are_refused_naming_the_field(tiny_engine, schema, problem):
    params = SamplingParams(structured=StructuredOutput("json_schema", schema))
    with pytest.raises(InvalidArgument) as err:
        tiny_engine.check_sampling(params)
    assert err.value.field == "sampling.structured_output.json_schema" and problem in err.value.problem
    plain = list(tiny_engine.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0.0)))  # the engine goes on
    assert len(plain) == 3
