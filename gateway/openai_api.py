"""The OpenAI wire format: request bodies checked and turned into a GenerateRequest, and responses,
stream chunks and error objects built from what the replicas stream back.

Validation happens here, before any routing, and fails with `ApiError` (HTTP 400 naming the field
and its limit, as OpenAI's `{"error": {"message", "type", "param", "code"}}`).
"""

import secrets
import time
import uuid
from dataclasses import dataclass, field

from kvcluster.model.sampling import DEFAULT_MAX_TOKENS, MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS
from kvcluster.model.tokenizer import ChatMessage
from kvcluster.proto import common_pb2, decode_pb2

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH = {decode_pb2.FINISH_REASON_STOP: "stop", decode_pb2.FINISH_REASON_LENGTH: "length",
          decode_pb2.FINISH_REASON_CANCELLED: "stop"}
SEED_BITS = 63


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


@dataclass
class CompletionRequest:
    """A checked /v1/chat/completions or /v1/completions body."""

    chat: bool
    model: str
    messages: list[ChatMessage] = field(default_factory=list)
    prompt: str = ""
    sampling: common_pb2.SamplingParams = field(default_factory=common_pb2.SamplingParams)
    stream: bool = False
    include_usage: bool = False
    cache_salt: str = ""
    request_id: str = ""

    def to_grpc(self, resume_token_ids: list[int] = ()) -> decode_pb2.GenerateRequest:
        request = decode_pb2.GenerateRequest(request_id=self.request_id, sampling=self.sampling,
                                             cache_salt=self.cache_salt, resume_token_ids=list(resume_token_ids))
        if self.chat:
            request.messages.messages.extend(decode_pb2.ChatMessage(role=m.role, content=m.content)
                                             for m in self.messages)
        else:
            request.prompt = self.prompt
        return request


def _typed(body: dict, name: str, kinds: tuple[type, ...], what: str):
    value = body.get(name)
    # bool is an int in Python; JSON true is never a number here
    if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        raise invalid(name, f"must be {what}, got {type(value).__name__}")
    return value


def parse_request(body: object, chat: bool, served_model: str, max_tokens_limit: int) -> CompletionRequest:
    """Check an OpenAI body; ApiError names the first bad field (unknown fields are ignored)."""
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    model = _typed(body, "model", (str,), "a string")
    if not model:
        raise invalid("model", "is required")
    if model != served_model:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{served_model}`", "model",
                       "model_not_found")
    request = CompletionRequest(chat=chat, model=model, request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}")
    if chat:
        request.messages = parse_messages(body.get("messages"))
    else:
        request.prompt = parse_prompt(body.get("prompt"))
    request.sampling = parse_sampling(body, max_tokens_limit)
    request.stream = bool(_typed(body, "stream", (bool,), "a boolean"))
    options = _typed(body, "stream_options", (dict,), "an object") or {}
    request.include_usage = bool(_typed(options, "include_usage", (bool,), "a boolean"))
    n = _typed(body, "n", (int,), "an integer")
    if n is not None and n != 1:
        raise invalid("n", f"only 1 is supported, got {n}")
    _typed(body, "user", (str,), "a string")
    request.cache_salt = _typed(body, "cache_salt", (str,), "a string") or ""
    return request


def parse_messages(messages: object) -> list[ChatMessage]:
    if messages is None:
        raise invalid("messages", "is required")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty array")
    parsed = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(param, "must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{param}.role", f"must be one of {sorted(ROLES)}, got {role!r}")
        parsed.append(ChatMessage(ROLES[role], _content(message.get("content"), f"{param}.content")))
    return parsed


def _content(content: object, param: str) -> str:
    """A string, or an array of text parts (joined); null is empty (an assistant turn with no text)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(param, "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(param, f"must be a string or an array of text parts, got {type(content).__name__}")


def parse_prompt(prompt: object) -> str:
    if prompt is None:
        raise invalid("prompt", "is required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt", "must be a string (batches of prompts are not supported)")
    if not prompt:
        raise invalid("prompt", "must not be empty")
    return prompt


def parse_sampling(body: dict, max_tokens_limit: int) -> common_pb2.SamplingParams:
    """OpenAI sampling fields as SamplingParams; every sampled request gets a seed (random when the
    client gave none) so a failover resumes with exactly the tokens the first replica would have sent."""
    sampling = common_pb2.SamplingParams()
    for name in ("max_completion_tokens", "max_tokens"):
        value = _typed(body, name, (int,), "an integer")
        if value is not None:
            if not 1 <= value <= max_tokens_limit:
                raise invalid(name, f"must be in [1, {max_tokens_limit}], got {value}")
            sampling.max_tokens = value
            break
    else:
        sampling.max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    temperature = _typed(body, "temperature", (int, float), "a number")
    if temperature is not None:
        if not 0 <= temperature <= 2:
            raise invalid("temperature", f"must be in [0, 2], got {temperature}")
        sampling.temperature = float(temperature)
    top_p = _typed(body, "top_p", (int, float), "a number")
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise invalid("top_p", f"must be in (0, 1], got {top_p}")
        sampling.top_p = float(top_p)
    seed = _typed(body, "seed", (int,), "an integer")
    if seed is not None and not 0 <= seed < 1 << 64:
        raise invalid("seed", f"must be in [0, 2^64), got {seed}")
    sampling.seed = seed if seed is not None else secrets.randbits(SEED_BITS)
    sampling.stop.extend(parse_stop(body.get("stop")))
    sampling.ignore_eos = bool(_typed(body, "ignore_eos", (bool,), "a boolean"))  # vLLM's extra field (benchmarks)
    return sampling


def parse_stop(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "must be a string or an array of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"has {len(stops)} strings; the limit is {MAX_STOP_STRINGS}")
    if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in stops):
        raise invalid("stop", f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters")
    return stops


# ---- responses -------------------------------------------------------------------------------

def usage_object(usage: decode_pb2.Usage, replica_id: str) -> dict:
    """OpenAI usage, plus where the prompt's KV came from (kvcluster's own fields) and the replica."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            "kvcluster": {"local_cache_tokens": usage.local_cache_tokens, "store_tokens": usage.store_tokens,
                          "prefill_tokens": usage.prefill_tokens, "local_computed_tokens": usage.local_computed_tokens,
                          "replica": replica_id}}


def completion_object(request: CompletionRequest, text: str, finish: str, usage: dict) -> dict:
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": request.request_id, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": [choice], "usage": usage}


def chunk_object(request: CompletionRequest, text: str | None, finish: str | None, first: bool = False,
                 usage: dict | None = None) -> dict:
    """One stream chunk: a text delta, the finish, or (choices empty) the usage."""
    if usage is not None:
        choices = []
    elif request.chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    chunk = {"id": request.request_id, "object": "chat.completion.chunk" if request.chat else "text_completion",
             "created": int(time.time()), "model": request.model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk
