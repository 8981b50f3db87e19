"""Conversions between protobuf messages and the engine's own types (sampling, finish reasons, logprobs)."""

from kvcluster.engine.sampling_params import SamplingParams, StructuredOutput
from kvcluster.engine.sequence import FinishReason
from kvcluster.errors import InvalidArgument
from kvcluster.proto import common_pb2, decode_pb2

DEFAULTS = SamplingParams()  # what an unset optional field means
FINISH_REASONS = {reason: decode_pb2.FinishReason.Value(f"FINISH_REASON_{reason.name}") for reason in FinishReason}


def sampling_from_proto(message: common_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults; values are validated by the engine."""
    return SamplingParams(
        max_tokens=message.max_tokens if message.HasField("max_tokens") else DEFAULTS.max_tokens,
        temperature=message.temperature if message.HasField("temperature") else DEFAULTS.temperature,
        top_p=message.top_p if message.HasField("top_p") else DEFAULTS.top_p,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
        stop_token_ids=tuple(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        repetition_penalty=(message.repetition_penalty if message.HasField("repetition_penalty")
                            else DEFAULTS.repetition_penalty),
        min_tokens=message.min_tokens,
        logit_bias=tuple(sorted(message.logit_bias.items())),
        logprobs=message.logprobs if message.HasField("logprobs") else None,
        structured=structured_from_proto(message.structured_output) if message.HasField("structured_output") else None,
    )


def structured_from_proto(message: common_pb2.StructuredOutput) -> StructuredOutput:
    kind = message.WhichOneof("format")
    if kind is None:
        raise InvalidArgument("sampling.structured_output", "set json_object or json_schema")
    if kind == "json_object" and not message.json_object:
        raise InvalidArgument("sampling.structured_output.json_object", "must be true when set")
    return StructuredOutput(kind, message.json_schema)


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    message = common_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        stop=list(params.stop), stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        min_tokens=params.min_tokens, logit_bias=dict(params.logit_bias))
    if params.seed is not None:
        message.seed = params.seed
    if params.repetition_penalty != DEFAULTS.repetition_penalty:
        message.repetition_penalty = params.repetition_penalty
    if params.logprobs is not None:
        message.logprobs = params.logprobs
    if params.structured is not None:
        message.structured_output.CopyFrom(structured_to_proto(params.structured))
    return message


def structured_to_proto(spec: StructuredOutput) -> common_pb2.StructuredOutput:
    if spec.kind == "json_object":
        return common_pb2.StructuredOutput(json_object=True)
    return common_pb2.StructuredOutput(json_schema=spec.schema)


def logprobs_to_proto(logprobs) -> decode_pb2.TokenLogprobs:
    """A TokenEvent's logprobs (logits_processors.TokenLogprobs) on the wire."""
    return decode_pb2.TokenLogprobs(logprob=logprobs.logprob, top=[decode_pb2.TopLogprob(token_id=t, logprob=v)
                                                                   for t, v in logprobs.top])
