"""A small typed Python client for `Generate`, sync and asyncio.

    from kvcluster.client import Client
    with Client("127.0.0.1:50051") as client:
        for chunk in client.stream(messages=[("user", "Hi!")], max_tokens=32):
            print(chunk.text, end="")
        result = client.generate(prompt="The capital of France is", temperature=0)
        print(result.text, result.usage.cached_tokens)
"""

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from kvcluster.proto import common_pb2, decode_pb2, decode_pb2_grpc
from kvcluster.rpc.plumbing import channel_options, make_channel
from kvcluster.rpc.security import API_KEY_HEADER

# The one finish-reason map, read off the proto enum: FINISH_REASON_STOP -> "stop", ... (the engine's
# kvcluster.engine.sequence.FinishReason carries the same names; kvcluster.rpc.messages pairs them by name).
FINISH_NAMES = {value: name.removeprefix("FINISH_REASON_").lower()
                for name, value in decode_pb2.FinishReason.items() if value != decode_pb2.FINISH_REASON_UNSPECIFIED}
Message = tuple[str, str] | decode_pb2.ChatMessage


@dataclass
class Completion:
    """A whole Generate answer."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: decode_pb2.Usage = field(default_factory=decode_pb2.Usage)
    logprobs: list[decode_pb2.TokenLogprobs] = field(default_factory=list)  # one per token, when asked for

    def add(self, response: decode_pb2.GenerateResponse) -> None:
        self.text += response.text
        self.token_ids.extend(response.token_ids)
        self.logprobs.extend(response.logprobs)
        if response.finish_reason:
            self.finish_reason = FINISH_NAMES.get(response.finish_reason, "")
            self.usage = response.usage


def build_request(prompt: str | None = None, messages: Sequence[Message] | None = None,
                  token_ids: Sequence[int] | None = None, bypass_cache: bool = False, cache_salt: str = "",
                  resume_token_ids: Sequence[int] = (), **sampling) -> decode_pb2.GenerateRequest:
    """One of prompt / messages / token_ids, plus SamplingParams fields by name (max_tokens=, temperature=,
    logprobs=, logit_bias={id: bias}, structured_output={"json_schema": text}, ...).
    `cache_salt` (e.g. one per tenant) shares cached blocks only with requests of the same salt;
    `resume_token_ids` continues a generation after tokens already produced (see decode.proto)."""
    request = decode_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(**sampling), bypass_cache=bypass_cache,
                                         cache_salt=cache_salt, resume_token_ids=list(resume_token_ids))
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.messages.messages.extend(
            m if isinstance(m, decode_pb2.ChatMessage) else decode_pb2.ChatMessage(role=m[0], content=m[1]) for m in messages)
    elif token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    return request


def call_metadata(api_key: str | None, metadata: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple(metadata) + (((API_KEY_HEADER, f"Bearer {api_key}"),) if api_key else ())


class Client:
    """Blocking client. `api_key` is sent as `authorization: Bearer <key>`; `credentials`
    (grpc.ssl_channel_credentials) switch the channel to TLS."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout_s: float | None = 300.0, api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, metadata: Sequence[tuple[str, str]] = ()):
        self.channel = make_channel(target, credentials=credentials)
        self.stub = decode_pb2_grpc.DecodeServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = call_metadata(api_key, metadata)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(self, **request) -> Iterator[decode_pb2.GenerateResponse]:
        """Responses as they arrive (text deltas); the last one carries finish_reason and usage."""
        return self.stub.Generate(build_request(**request), timeout=self.timeout_s, metadata=self.metadata)

    def generate(self, **request) -> Completion:
        completion = Completion()
        for response in self.stream(**request):
            completion.add(response)
        return completion


class AsyncClient:
    """asyncio client (grpc.aio) with the same methods."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout_s: float | None = 300.0, api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, metadata: Sequence[tuple[str, str]] = ()):
        self.channel = (grpc.aio.secure_channel(target, credentials, options=channel_options()) if credentials
                        else grpc.aio.insecure_channel(target, options=channel_options()))
        self.stub = decode_pb2_grpc.DecodeServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = call_metadata(api_key, metadata)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def stream(self, **request) -> AsyncIterator[decode_pb2.GenerateResponse]:
        call = self.stub.Generate(build_request(**request), timeout=self.timeout_s, metadata=self.metadata)
        async for response in call:
            yield response

    async def generate(self, **request) -> Completion:
        completion = Completion()
        async for response in self.stream(**request):
            completion.add(response)
        return completion
