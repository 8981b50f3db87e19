"""Sampling parameters survive the trip through protobuf; unset fields take the defaults."""

from kvcluster.messages import sampling_from_proto, sampling_to_proto
from kvcluster.model.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from kvcluster.proto import common_pb2


def test_defaults_for_unset_fields():
    params = sampling_from_proto(common_pb2.SamplingParams())
    assert params == SamplingParams(max_tokens=DEFAULT_MAX_TOKENS, temperature=1.0, top_p=1.0)


def test_round_trip_keeps_every_field():
    params = SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5, top_k=3, seed=2**63 + 5,
                            stop=("\n\n", "END"), stop_token_ids=(2, 9), ignore_eos=True)
    assert sampling_from_proto(sampling_to_proto(params)) == params


def test_negative_max_tokens_reaches_validation():
    params = sampling_from_proto(common_pb2.SamplingParams(max_tokens=-4))
    assert params.max_tokens == -4
