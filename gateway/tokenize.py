"""POST /tokenize and /detokenize, as vLLM and SGLang name and shape them.

/tokenize takes `{"prompt": text}` or `{"messages": [...], "add_generation_prompt": true}` and answers
`{"count", "max_model_len", "tokens", "token_strs"}`: exactly the token ids a completion of that
prompt (or chat) is computed on, so `count` is what `usage.prompt_tokens` will say: a plain prompt
starts with BOS for a model that wants it (Gemma, Llama), as a completion's does, unless
`add_special_tokens` is false; a chat's specials are its template's. /detokenize takes `{"tokens": [...]}` and answers `{"prompt": text}` (special tokens
kept, so a tokenized chat comes back as its rendered template).
"""

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import protocol
from gateway.openai_api import ROLES, ModelLimits, invalid, message_text, parse_body
from kvcluster.errors import InvalidArgument
from kvcluster.model.tokenizer import ChatMessage, Tokenizer


class TokenizeEndpoints:
    """The two handlers over the gateway's tokenizer (they run on the event loop: tokenizing is fast)."""

    def __init__(self, tokenizer: Tokenizer, limits: ModelLimits):
        self.tokenizer = tokenizer
        self.limits = limits

    async def tokenize(self, http: Request) -> Response:
        fields = parse_body(protocol.TokenizeRequest, await http.body(), self.limits)
        if (fields.prompt is None) == (fields.messages is None):
            raise invalid("prompt", "give exactly one of prompt or messages")
        if fields.prompt is None:
            tokens = self._chat(fields)
        else:  # as a completion tokenizes it (BOS first where the model wants one), unless told not to
            tokens = (self.tokenizer.encode_prompt if fields.add_special_tokens else self.tokenizer.encode)(fields.prompt)
        token_strs = [self.tokenizer.decode([t], skip_special=False) for t in tokens] if fields.return_token_strs \
            else None
        return JSONResponse({"count": len(tokens), "max_model_len": self.limits.max_tokens, "tokens": tokens,
                             "token_strs": token_strs})

    def _chat(self, fields: protocol.TokenizeRequest) -> list[int]:
        messages = [ChatMessage(ROLES[m.role], message_text(m.content)) for m in fields.messages]
        try:
            return self.tokenizer.encode(self.tokenizer.render_chat(messages, fields.add_generation_prompt))
        except InvalidArgument as exc:  # the template refused the conversation
            raise invalid(exc.field, exc.problem) from None

    async def detokenize(self, http: Request) -> Response:
        fields = parse_body(protocol.DetokenizeRequest, await http.body(), self.limits)
        return JSONResponse({"prompt": self.tokenizer.decode(fields.tokens, skip_special=False)})
