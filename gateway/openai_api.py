"""The OpenAI wire format: request bodies (checked by gateway/protocol.py) turned into Generate requests,
and responses, stream chunks, logprobs and error objects built from what the replicas stream back.

Validation happens here, before any routing, and fails with `ApiError` (HTTP 400 naming the field
and its limit, as OpenAI's `{"error": {"message", "type", "param", "code"}}`).

`n` > 1: choice i is its own Generate call with seed + i (mod 2^64), so each choice is reproducible
alone and choice 0 is what n = 1 gives; the gateway sends them to one replica (see server.py).
"""

import json
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from gateway import protocol
from kvcluster.client import FINISH_NAMES
from kvcluster.errors import InvalidArgument
from kvcluster.engine.sampling_params import DEFAULT_MAX_TOKENS, RANDOM_SEED_BITS, SEED_LIMIT
from kvcluster.model.tokenizer import ChatMessage
from kvcluster.proto import common_pb2, decode_pb2

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH = {**FINISH_NAMES, decode_pb2.FINISH_REASON_CANCELLED: "stop"}  # OpenAI has no "cancelled"
TokenText = Callable[[int], str]


class ApiError(Exception):
    """An error the client sees as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(param: str, problem: str) -> ApiError:
    return ApiError(400, f"{param}: {problem}", param, "invalid_value")


@dataclass(frozen=True)
class ModelLimits:
    """What the served model allows: the validation context of every request body."""

    name: str
    max_tokens: int       # context length
    vocab_size: int
    tools_refusal: str = protocol.tools_refusal(None)

    def context(self) -> dict:
        return {"max_tokens_limit": self.max_tokens, "vocab_size": self.vocab_size, "tools_refusal": self.tools_refusal}


@dataclass
class ApiRequest:
    """A checked /v1/chat/completions or /v1/completions body."""

    chat: bool
    model: str
    messages: list[ChatMessage] = field(default_factory=list)
    prompt: str = ""
    prompt_ids: list[int] = field(default_factory=list)   # a prompt given as token ids
    # The prompt's ids: the client's, or what the gateway's tokenizer made of the prompt or messages
    # (set before routing; sent in place of the text to replicas with the same tokenizer).
    token_ids: list[int] = field(default_factory=list)
    ids_problem: InvalidArgument | None = None  # why a replica with the gateway's tokenizer would refuse token_ids
    sampling: common_pb2.SamplingParams = field(default_factory=common_pb2.SamplingParams)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    cache_salt: str = ""
    request_id: str = ""

    def __post_init__(self):
        self.token_ids = self.token_ids or list(self.prompt_ids)

    @property
    def logprobs(self) -> bool:
        return self.sampling.HasField("logprobs")

    @property
    def prompt_field(self) -> str:
        """Where the body gave the prompt: what an error about its length names."""
        return "messages" if self.chat else "prompt"

    def to_grpc(self, resume_token_ids: Sequence[int] = (), index: int = 0,
                as_token_ids: bool = False) -> decode_pb2.GenerateRequest:
        """Choice `index`'s Generate request (its seed is the request's + index); with `as_token_ids` the
        prompt goes as `token_ids` (the replica then tokenizes nothing), else as the client gave it."""
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(self.sampling)
        sampling.seed = (self.sampling.seed + index) % SEED_LIMIT
        request = decode_pb2.GenerateRequest(request_id=self.request_id, sampling=sampling, cache_salt=self.cache_salt,
                                             resume_token_ids=list(resume_token_ids))
        if self.prompt_ids or (as_token_ids and self.token_ids):
            request.token_ids.ids.extend(self.prompt_ids or self.token_ids)
        elif self.chat:
            request.messages.messages.extend(decode_pb2.ChatMessage(role=m.role, content=m.content)
                                             for m in self.messages)
        else:
            request.prompt = self.prompt
        return request


def parse_body(model: type[protocol.ApiModel], body: bytes, limits: ModelLimits) -> protocol.ApiModel:
    """The body as `model`, or ApiError naming the first bad field (404 for another model's name)."""
    try:
        parsed = model.model_validate_json(body or b"null", context=limits.context())
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "model_type":
            raise invalid("body", "must be a JSON object") from None
        param, message = protocol.first_error(exc)
        raise ApiError(400, message, param, "invalid_json" if param == "body" else "invalid_value") from None
    if parsed.model not in (None, limits.name):
        raise ApiError(404, f"The model `{parsed.model}` does not exist; this server serves `{limits.name}`", "model",
                       "model_not_found")
    return parsed


def parse_request(body: bytes, chat: bool, limits: ModelLimits) -> ApiRequest:
    """Check an OpenAI body (see gateway/protocol.py for what is accepted and what is refused)."""
    fields = parse_body(protocol.ChatCompletionRequest if chat else protocol.CompletionRequest, body, limits)
    request = ApiRequest(chat=chat, model=fields.model, n=fields.n, stream=fields.stream,
                         include_usage=bool(fields.stream_options and fields.stream_options.include_usage),
                         cache_salt=fields.cache_salt or "",
                         request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}")
    if chat:
        request.messages = [ChatMessage(ROLES[m.role], message_text(m.content)) for m in fields.messages]
    else:
        request.prompt, request.prompt_ids = _prompt(fields.prompt)
    request.sampling = sampling_params(fields, limits)
    return request


def message_text(content) -> str:
    """A string, or text parts joined; null is empty (an assistant turn with no text)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def _prompt(prompt) -> tuple[str, list[int]]:
    """(text, token ids): one prompt, as text or as token ids; batches of prompts are refused."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid("prompt", f"batches of prompts are not supported, got {len(prompt)} (send one per request)")
        prompt = prompt[0]
    if not prompt:
        raise invalid("prompt", "must not be empty")
    return (prompt, []) if isinstance(prompt, str) else ("", list(prompt))


def sampling_params(fields: protocol.SamplingFields, limits: ModelLimits) -> common_pb2.SamplingParams:
    """The body's sampling fields as SamplingParams; every request gets a seed (random when the client
    gave none) so a failover resumes with exactly the tokens the first replica would have sent."""
    sampling = common_pb2.SamplingParams(
        top_k=fields.top_k, stop_token_ids=fields.stop_token_ids or [], ignore_eos=fields.ignore_eos,
        presence_penalty=fields.presence_penalty, frequency_penalty=fields.frequency_penalty,
        min_tokens=fields.min_tokens, logit_bias={int(k): v for k, v in (fields.logit_bias or {}).items()})
    chat_limit = getattr(fields, "max_completion_tokens", None)
    sampling.max_tokens = chat_limit or fields.max_tokens or min(DEFAULT_MAX_TOKENS, limits.max_tokens)
    if fields.min_tokens > sampling.max_tokens:
        raise invalid("min_tokens", f"must be at most max_tokens ({sampling.max_tokens}), got {fields.min_tokens}")
    for name in ("temperature", "top_p", "repetition_penalty"):
        if getattr(fields, name) is not None:
            setattr(sampling, name, getattr(fields, name))
    sampling.seed = fields.seed if fields.seed is not None else secrets.randbits(RANDOM_SEED_BITS)
    sampling.stop.extend([fields.stop] if isinstance(fields.stop, str) else fields.stop or [])
    _logprobs(fields, sampling)
    _response_format(fields.response_format, sampling)
    return sampling


def _logprobs(fields, sampling: common_pb2.SamplingParams) -> None:
    if isinstance(fields, protocol.ChatCompletionRequest):
        if fields.top_logprobs is not None and not fields.logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
        if fields.logprobs:
            sampling.logprobs = fields.top_logprobs or 0
    elif fields.logprobs is not None:
        sampling.logprobs = fields.logprobs


def _response_format(response_format: protocol.ResponseFormat | None, sampling: common_pb2.SamplingParams) -> None:
    if response_format is None or response_format.type == "text":
        return
    if response_format.type == "json_object":
        sampling.structured_output.json_object = True
        return
    if response_format.json_schema is None:
        raise invalid("response_format.json_schema", "is required when type is json_schema")
    sampling.structured_output.json_schema = json.dumps(response_format.json_schema.schema_)


# ---- responses -------------------------------------------------------------------------------

def usage_object(usages: Sequence[decode_pb2.Usage], replica_ids: Sequence[str]) -> dict:
    """OpenAI usage over every choice (the prompt counted once, from choice 0), plus where the prompt's
    KV came from (kvcluster's own fields) and the replica; with several choices, each one's sources."""
    first = usages[0]
    completion = sum(u.completion_tokens for u in usages)
    usage = {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
             "total_tokens": first.prompt_tokens + completion,
             "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
             "kvcluster": _sources(first, replica_ids[0])}
    if len(usages) > 1:
        usage["kvcluster"]["choices"] = [_sources(u, r) for u, r in zip(usages, replica_ids)]
    return usage


def _sources(usage: decode_pb2.Usage, replica_id: str) -> dict:
    return {"local_cache_tokens": usage.local_cache_tokens, "store_tokens": usage.store_tokens,
            "prefill_tokens": usage.prefill_tokens, "local_computed_tokens": usage.local_computed_tokens,
            "replica": replica_id}


def logprobs_object(chat: bool, token_ids: Sequence[int], logprobs: Sequence[decode_pb2.TokenLogprobs],
                    token_text: TokenText, text_offset: int = 0) -> dict:
    """OpenAI's logprobs of these tokens: chat's `{"content": [...]}` or the completions' lists."""
    if chat:
        return {"content": [{**_token(t, lp.logprob, token_text),
                             "top_logprobs": [_token(top.token_id, top.logprob, token_text) for top in lp.top]}
                            for t, lp in zip(token_ids, logprobs)], "refusal": None}
    texts = [token_text(t) for t in token_ids]
    offsets = [text_offset + sum(len(x) for x in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(top.token_id): top.logprob for top in lp.top} for lp in logprobs],
            "text_offset": offsets}


def _token(token_id: int, logprob: float, token_text: TokenText) -> dict:
    text = token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


@dataclass
class Choice:
    """One choice's whole answer, gathered from its stream."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[decode_pb2.TokenLogprobs] = field(default_factory=list)
    finish: str = "stop"


def completion_object(request: ApiRequest, choices: Sequence[Choice], usage: dict, token_text: TokenText) -> dict:
    out = []
    for index, choice in enumerate(choices):
        logprobs = (logprobs_object(request.chat, choice.token_ids, choice.logprobs, token_text)
                    if request.logprobs else None)
        body = {"message": {"role": "assistant", "content": choice.text}} if request.chat else {"text": choice.text}
        out.append({"index": index, **body, "logprobs": logprobs, "finish_reason": choice.finish})
    return {"id": request.request_id, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": out, "usage": usage}


def chunk_object(request: ApiRequest, text: str | None, finish: str | None, first: bool = False,
                 usage: dict | None = None, index: int = 0, logprobs: dict | None = None) -> dict:
    """One stream chunk of choice `index`: a text delta, the finish, or (choices empty) the usage."""
    if usage is not None:
        choices = []
    elif request.chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choices = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
    else:
        choices = [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}]
    chunk = {"id": request.request_id, "object": "chat.completion.chunk" if request.chat else "text_completion",
             "created": int(time.time()), "model": request.model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk
