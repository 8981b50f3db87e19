"""The HTTP API's request bodies as pydantic models (as vLLM's protocol module).

Types are checked strictly (a string is never a number, 1 is never `true`); the bounds are the
engine's own (kvcluster.engine.sampling_params), so HTTP and gRPC callers meet one set of limits. A
limit that depends on the served model (its context length, its vocabulary) comes in the
validation context. Nothing is silently ignored:
- a field no OpenAI-compatible server knows is refused (400 naming it);
- an OpenAI field this server does not implement (tools, audio, echo, ...) is refused with the reason,
  unless its value asks for nothing (`tool_choice: "none"`, `store: false`, `modalities: ["text"]`);
- vLLM's extra sampling fields that the engine implements are accepted (top_k, min_tokens,
  repetition_penalty, ignore_eos, stop_token_ids, cache_salt).
`parse` turns pydantic's first error into ApiError (OpenAI's error object, `param` the field's path).
"""

from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo,
                      field_validator)

from kvcluster.engine.sampling_params import (HTTP_MAX_TEMPERATURE, MAX_CHOICES, MAX_LOGIT_BIAS,
                                             MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, MAX_PENALTY, MAX_REPETITION_PENALTY,
                                             MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, MAX_TOP_P,
                                             MIN_REPETITION_PENALTY, MIN_TOP_P, SEED_LIMIT)

MAX_TOKENIZE_IDS = 1 << 17  # tokens one /detokenize call takes
# What the tool fields may say without asking for a tool call.
TOOLS_ASK_NOTHING = {"tools": [], "functions": [], "tool_choice": "none", "function_call": "none"}


def _form(value: Any) -> str | None:
    """The shape of a union-typed value, by its JSON type (and a list's first element): the tag of
    the member pydantic then validates, so an error names one form, not every alternative's."""
    if isinstance(value, str):
        return "<string>"
    if isinstance(value, list):
        first = value[0] if value else 0
        return {str: "<strings>", list: "<arrays>", dict: "<objects>"}.get(type(first), "<numbers>")
    return None


def one_of(forms: dict[str, Any], expected: str) -> Any:
    """A union whose member is picked by `_form` (a value of another shape fails with `expected`)."""
    members = tuple(Annotated[kind, Tag(tag)] for tag, kind in forms.items())
    return Annotated[Union[members], Discriminator(_form, custom_error_type="invalid_form",
                                                   custom_error_message=f"must be {expected}")]


class ApiModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


def refuse(reason: str, *asks_nothing: Any):
    """A validator refusing every value of the listed fields but null and `asks_nothing` (compared
    with their JSON type: 0 is not false)."""
    def check(cls, value):
        if not _asks_nothing(value, asks_nothing):
            raise ValueError(reason)
        return value
    return check


def _asks_nothing(value: Any, asks_nothing: tuple) -> bool:
    return value is None or any(type(value) is type(ok) and value == ok for ok in asks_nothing)


def tools_refusal(chat_template: str | None) -> str:
    """Why tool fields are refused, for the served model's chat template."""
    if chat_template and "tools" in chat_template:
        return "not supported: this server does not implement tool calling"
    return "not supported: this model's chat template has no tool syntax (SmolLM2's has none)"


class TextPart(ApiModel):
    type: Literal["text"]
    text: str


MessageContent = one_of({"<string>": str, "<objects>": list[TextPart]}, "a string or an array of text parts")


class ChatMessageIn(ApiModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: MessageContent | None = None
    name: Any = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None

    _no_name = field_validator("name")(refuse("not supported: the chat template has no participant names"))
    _no_tools = field_validator("tool_calls", "tool_call_id", "function_call")(
        refuse("not supported: tool calls are not implemented here", []))
    _no_audio = field_validator("refusal", "audio")(refuse("not supported: text content only"))


class StreamOptions(ApiModel):
    include_usage: bool = False


class JsonSchemaFormat(ApiModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None   # the grammar always holds the output to the schema


class ResponseFormat(ApiModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


StopField = one_of({"<string>": str, "<strings>": Annotated[list[Annotated[str, Field(
    min_length=1, max_length=MAX_STOP_STRING_CHARS)]], Field(max_length=MAX_STOP_STRINGS)]},
    "a string or an array of strings")


class SamplingFields(ApiModel):
    """What chat and text completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=HTTP_MAX_TEMPERATURE)
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=MAX_TOP_P)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: StopField | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    response_format: ResponseFormat | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int = Field(0, ge=0)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    cache_salt: str | None = None
    # OpenAI fields without an effect here unless they ask for something
    store: Any = None
    metadata: Any = None
    service_tier: Any = None

    _no_store = field_validator("store")(refuse("not supported: completions are not stored here", False))
    _no_metadata = field_validator("metadata")(refuse("not supported: completions (and their metadata) are not stored here"))
    _no_tier = field_validator("service_tier")(refuse("not supported: only the default tier exists here", "auto", "default"))

    @field_validator("max_tokens")
    @classmethod
    def _within_context(cls, value, info: ValidationInfo):
        return _in_range(value, info, 1, "max_tokens_limit", "the model's context length")

    @field_validator("top_k")
    @classmethod
    def _top_k_in_vocabulary(cls, value, info: ValidationInfo):
        return _in_range(value, info, 0, "vocab_size", "0 disables; at most the vocabulary size")

    @field_validator("logit_bias", "stop_token_ids")
    @classmethod
    def _token_ids_in_vocabulary(cls, value, info: ValidationInfo):
        vocab = (info.context or {}).get("vocab_size")
        for key in value or ():
            if (isinstance(key, str) and not (key.isascii() and key.isdigit())) or (
                    vocab is not None and not 0 <= int(key) < vocab):
                raise ValueError(f"{key!r} is not a token id in [0, {vocab})")
        return value


def _in_range(value, info: ValidationInfo, low: int, key: str, what: str):
    """`value` within [low, the served model's `key`] (from the validation context)."""
    limit = (info.context or {}).get(key)
    if value is not None and (value < low or (limit is not None and value > limit)):
        raise ValueError(f"must be in [{low}, {limit}] ({what}), got {value}")
    return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    @field_validator("tools", "functions", "tool_choice", "function_call", "parallel_tool_calls")
    @classmethod
    def _no_tools(cls, value, info: ValidationInfo):
        if not _asks_nothing(value, (TOOLS_ASK_NOTHING.get(info.field_name),)):
            raise ValueError((info.context or {}).get("tools_refusal", tools_refusal(None)))
        return value

    _text_only = field_validator("audio", "prediction", "web_search_options")(refuse("not supported: text output only"))
    _text_modality = field_validator("modalities")(refuse("not supported: text output only", ["text"]))
    _no_reasoning = field_validator("reasoning_effort")(refuse("not supported: this model has no reasoning mode"))

    @field_validator("max_completion_tokens")
    @classmethod
    def _completion_within_context(cls, value, info: ValidationInfo):
        return _in_range(value, info, 1, "max_tokens_limit", "the model's context length")


TokenIds = list[Annotated[int, Field(ge=0)]]
PromptField = one_of({"<string>": str, "<strings>": list[str], "<numbers>": TokenIds, "<arrays>": list[TokenIds]},
                     "a string, an array of strings, an array of token ids or an array of such arrays")


class CompletionRequest(SamplingFields):
    prompt: PromptField
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt_ids_in_vocabulary(cls, value, info: ValidationInfo):
        vocab = (info.context or {}).get("vocab_size")
        ids = [t for part in value for t in (part if isinstance(part, list) else [part])] if isinstance(value, list) else []
        bad = next((t for t in ids if isinstance(t, int) and vocab is not None and t >= vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        return value

    _no_echo = field_validator("echo")(refuse("not supported: the prompt is not echoed", False))
    _no_suffix = field_validator("suffix")(refuse("not supported: no insertion", ""))
    _no_best_of = field_validator("best_of")(refuse("not supported (n gives several completions)", 1))


class TokenizeRequest(ApiModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = Field(None, min_length=1)
    add_special_tokens: bool = True      # a plain prompt as a completion tokenizes it (BOS where the model adds one)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @field_validator("continue_final_message")
    @classmethod
    def _no_continue(cls, value):
        if value:
            raise ValueError("continuing the final message is not supported")
        return value


class DetokenizeRequest(ApiModel):
    model: str | None = None
    tokens: TokenIds = Field(max_length=MAX_TOKENIZE_IDS)

    @field_validator("tokens")
    @classmethod
    def _in_vocabulary(cls, value, info: ValidationInfo):
        vocab = (info.context or {}).get("vocab_size")
        bad = next((i for i, t in enumerate(value) if vocab is not None and t >= vocab), None)
        if bad is not None:
            raise ValueError(f"tokens[{bad}] = {value[bad]} is outside the vocabulary [0, {vocab})")
        return value


def error_param(loc: tuple) -> str:
    """pydantic's error location as OpenAI's `param`: `messages[0].content`, with union tags left out."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not str(part).startswith("<"):
            param += f".{part}" if param else str(part)
    return param or "body"


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(param, message) of the error a client should fix first."""
    error = exc.errors(include_url=False)[0]
    param = error_param(error["loc"])
    if error["type"] == "json_invalid":
        return "body", f"body: not valid JSON ({error['msg']})"
    if error["type"] == "extra_forbidden":
        return param, f"{param}: unknown field (not an API field this server implements)"
    message = error["msg"].removeprefix("Value error, ")
    return param, f"{param}: {message}"
