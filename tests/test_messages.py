"""Sampling parameters survive the trip through protobuf; unset fields take the defaults."""

import pytest

from kvcluster.engine.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from kvcluster.engine.sampling_params import StructuredOutput
from kvcluster.errors import InvalidArgument
from kvcluster.proto import common_pb2
from kvcluster.rpc.messages import sampling_from_proto, sampling_to_proto


def test_defaults_for_unset_fields():
    params = sampling_from_proto(common_pb2.SamplingParams())
    assert params == SamplingParams(max_tokens=DEFAULT_MAX_TOKENS, temperature=1.0, top_p=1.0)


def test_round_trip_keeps_every_field():
    params = SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5, top_k=3, seed=2**63 + 5,
                            stop=("\n\n", "END"), stop_token_ids=(2, 9), ignore_eos=True, presence_penalty=0.5,
                            frequency_penalty=-1.25, repetition_penalty=1.5, min_tokens=3,
                            logit_bias=((5, -100.0), (77, 2.5)), logprobs=0,
                            structured=StructuredOutput("json_schema", '{"type": "integer"}'))
    assert sampling_from_proto(sampling_to_proto(params)) == params
    any_object = SamplingParams(structured=StructuredOutput("json_object"), logprobs=20)
    assert sampling_from_proto(sampling_to_proto(any_object)) == any_object


@pytest.mark.parametrize("structured", [common_pb2.StructuredOutput(), common_pb2.StructuredOutput(json_object=False)])
def test_an_empty_or_false_structured_output_is_refused(structured):
    message = common_pb2.SamplingParams()
    message.structured_output.CopyFrom(structured)
    with pytest.raises(InvalidArgument) as err:
        sampling_from_proto(message)
    assert err.value.field.startswith("sampling.structured_output")


def test_negative_max_tokens_reaches_validation():
    params = sampling_from_proto(common_pb2.SamplingParams(max_tokens=-4))
    assert params.max_tokens == -4


def test_one_finish_reason_map_the_engines_reasons_and_the_protos_names_agree():
    """The engine's reasons pair with the proto enum by name, and the client's names are the engine's values:
    a reason added on one side only fails here (and at import, for the engine side)."""
    from kvcluster.client import FINISH_NAMES
    from kvcluster.rpc.messages import FINISH_REASONS
    from kvcluster.engine.sequence import FinishReason

    assert set(FINISH_REASONS) == set(FinishReason)
    assert [FINISH_NAMES[proto] for proto in FINISH_REASONS.values()] == [reason.value for reason in FINISH_REASONS]
    assert sorted(FINISH_NAMES) == sorted(FINISH_REASONS.values())
