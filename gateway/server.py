"""The gateway's HTTP app (Starlette on uvicorn) and the request path: check the body, route it to a
decode replica, stream Generate back as OpenAI objects, and fail over mid-stream.

Failover: every request carries a seed (openai_api.sampling_params). When the replica's
stream breaks (UNAVAILABLE and the like) before it finished, the request goes to another replica
with `resume_token_ids` = the tokens already sent; that replica treats them as output, continues
with the same seed and output positions, and streams only what follows, so the client sees one
uninterrupted stream with the tokens an undisturbed run gives.

Tokenized once: the gateway encodes every prompt (routing hashes its blocks) and sends those ids in
place of the text to each replica whose tokenizer fingerprint equals its own, checked first as the
replica would check them so an error names the same field; a replica with another tokenizer, or one
that publishes none, gets the text and tokenizes it itself.
"""

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from gateway.choices import Piece, choice_pieces, collect, sse_events
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.openai_api import (ApiError, ApiRequest, ModelLimits, completion_object, invalid, parse_request,
                                usage_object)
from gateway.prefix_follower import PrefixFollower
from gateway.protocol import tools_refusal
from gateway.replicas import Replica, ReplicaSet
from gateway.router import Route, Router
from gateway.tokenize import TokenizeEndpoints
from kvcluster.engine.sampling_params import check_prompt_ids
from kvcluster.errors import InvalidArgument, Unavailable
from kvcluster.kv.blocks import prefix_hashes
from kvcluster.model.files import default_model_path
from kvcluster.model.files import read_model_config, read_tokenizer_data
from kvcluster.model.tokenizer import Tokenizer
from kvcluster.proto import decode_pb2
from kvcluster.rpc.security import API_KEY_HEADER, _same_secret

log = logging.getLogger(__name__)

# Codes after which the request moves to another replica (resuming after the tokens already sent).
FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                  grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Fields a replica names (INVALID_ARGUMENT) whose HTTP name differs; the schema is compiled only there.
GRPC_FIELDS = {"sampling.structured_output.json_schema": "response_format.json_schema.schema",
               "sampling.structured_output": "response_format"}


class Gateway:
    """Replicas, router, tokenizer and metrics; `app` is its HTTP face."""

    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None):
        self.config = config
        model = config.model or None
        tokenizer_data = read_tokenizer_data(model)
        self.tokenizer = Tokenizer(tokenizer_data)
        model_config = read_model_config(model)
        self.served_model = config.served_model_name or Path(model or default_model_path()).stem
        self.limits = ModelLimits(self.served_model, model_config.context_length, model_config.vocab_size,
                                  tools_refusal(tokenizer_data.chat_template))
        self.tokenize_endpoints = TokenizeEndpoints(self.tokenizer, self.limits)
        self.replicas = ReplicaSet(config)
        self.router = Router(config.routing, config.overlap_weight)
        self.follower = (PrefixFollower(self.replicas.index) if config.routing_index == "local"
                         and self.replicas.index is not None else None)
        self.registry = registry or CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry, lambda: len(self.replicas.up()),
                                      lambda: self.follower.blocks_by_member() if self.follower is not None else {})
        self.keys = config.keys()
        self.metadata = ((API_KEY_HEADER, f"Bearer {config.decode_api_key}"),) if config.decode_api_key else ()
        self._registry_healthy = True
        self._text_replicas: set[str] = set()  # replicas told apart by their tokenizer (logged once each)

    # ---- replicas --------------------------------------------------------------------------

    async def refresh(self) -> None:
        try:
            listing = await asyncio.to_thread(self.replicas.read_registry)
        except Unavailable as exc:
            if self._registry_healthy:
                log.warning("replica registry unreachable, keeping the last list: %s", exc)
            self._registry_healthy = False
            return
        self._registry_healthy = True
        self.replicas.apply(listing)
        if self.follower is not None:
            try:
                await asyncio.to_thread(self.follower.sync, [member for member, _ in listing])
            except Unavailable as exc:
                log.warning("KV events unreadable, routing on the last copy: %s", exc)

    async def refresh_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.config.refresh_seconds)

    async def route(self, request: ApiRequest, exclude: set[str], prefer: str | None = None) -> Route:
        replicas = self.replicas.up(exclude)
        if not replicas:
            raise ApiError(503, "no decode replica is available", None, "no_replica", "service_unavailable_error")
        pinned = next((r for r in replicas if r.replica_id == prefer), None)
        if pinned is not None:  # another choice of the same request: not a routing decision of its own
            return Route(pinned, "cache_hit", 0)
        overlaps, prompt_tokens = [0] * len(replicas), 0
        if self.config.routing == "cache_aware" and self.replicas.index is not None:
            prompt_tokens, overlaps = await asyncio.to_thread(self.overlaps, request, replicas)
        route = self.router.pick(replicas, overlaps, prompt_tokens)
        self.metrics.routing.labels(route.reason).inc()
        self.metrics.routed_blocks.inc(route.overlap_blocks)
        return route

    def overlaps(self, request: ApiRequest, replicas: list[Replica]) -> tuple[int, list[int]]:
        """Blocking: the prompt's length in tokens, and the leading prompt blocks each replica holds (0 for
        all when Redis cannot say)."""
        token_ids = request.token_ids
        counts = {}
        for key in {(r.fingerprint, r.block_size) for r in replicas if r.block_size}:
            group = [r for r in replicas if (r.fingerprint, r.block_size) == key]
            hashes = prefix_hashes(key[0], token_ids, key[1], request.cache_salt)
            try:
                held = (self.follower or self.replicas.index).held_prefix(hashes, [r.member for r in group])
            except Unavailable:
                held = [0] * len(group)
            counts.update(zip((r.replica_id for r in group), held))
        return len(token_ids), [counts.get(r.replica_id, 0) for r in replicas]

    # ---- the prompt's token ids ------------------------------------------------------------

    def tokenize(self, request: ApiRequest) -> None:
        """Blocking: the prompt's ids (`request.token_ids`), computed and checked once per request. A
        chat template's refusal is the 400 a replica would answer; ids that a replica with this
        tokenizer would refuse (too long for the model) are kept in `request.ids_problem`, raised only
        if they are to be sent (a replica with another tokenizer gets the text and judges it itself)."""
        if request.prompt_ids:  # the client's ids: a replica checks them itself
            request.token_ids = list(request.prompt_ids)
            return
        try:
            request.token_ids = (self.tokenizer.encode_chat(request.messages) if request.chat
                                 else self.tokenizer.encode_prompt(request.prompt))
            check_prompt_ids(request.token_ids, request.prompt_field, self.limits.max_tokens, self.limits.vocab_size)
        except InvalidArgument as exc:
            if not request.token_ids:
                raise invalid(exc.field, exc.problem) from None
            request.ids_problem = exc

    def generate_request(self, request: ApiRequest, replica: Replica, resume_token_ids: list[int],
                         index: int) -> decode_pb2.GenerateRequest:
        """Choice `index`'s Generate request for `replica`: the prompt as this gateway's ids when its
        tokenizer is this one's (refused here, naming the field the body gave it in, when `tokenize`
        found them too long), else as the body gave it."""
        as_ids = bool(request.token_ids) and replica.tokenizer_fingerprint == self.tokenizer.fingerprint
        if as_ids and request.ids_problem is not None:
            raise invalid(request.ids_problem.field, request.ids_problem.problem)
        elif not as_ids and replica.replica_id not in self._text_replicas:
            self._text_replicas.add(replica.replica_id)
            log.warning("replica %s publishes tokenizer fingerprint %s, this gateway's is %s: it gets prompts "
                        "as text", replica.replica_id, replica.tokenizer_fingerprint, self.tokenizer.fingerprint)
        self.metrics.prompt_inputs.labels("token_ids" if as_ids or request.prompt_ids else "text").inc()
        return request.to_grpc(resume_token_ids, index, as_ids)

    # ---- generation with failover ----------------------------------------------------------

    async def generate(self, request: ApiRequest, index: int = 0, prefer: str | None = None) -> AsyncIterator[Piece]:
        """Stream choice `index`'s responses (on replica `prefer` while it is up), moving to another
        replica when one fails."""
        sent: list[int] = []
        exclude: set[str] = set()
        for attempt in range(self.config.max_failovers + 1):
            route = await self.route(request, exclude, prefer)
            replica = route.replica
            generate_request = self.generate_request(request, replica, sent, index)
            replica.open_calls += 1
            queued = route.queued_tokens  # on the replica's queue until the first response comes back
            replica.queued_prefill_tokens += queued
            call = replica.stub.Generate(generate_request, timeout=self.config.request_timeout_seconds,
                                         metadata=self.metadata)
            try:
                async for response in call:
                    replica.queued_prefill_tokens -= queued
                    queued = 0
                    sent.extend(response.token_ids)
                    yield Piece(response, replica.replica_id)
                    if response.finish_reason != decode_pb2.FINISH_REASON_UNSPECIFIED:
                        return
                error = ApiError(503, f"replica {replica.replica_id} ended the stream before it finished",
                                 None, "replica_failed", "service_unavailable_error")
                code = grpc.StatusCode.UNAVAILABLE
            except grpc.aio.AioRpcError as exc:
                code, error = exc.code(), api_error_from_grpc(exc)
            finally:
                replica.open_calls -= 1
                replica.queued_prefill_tokens -= queued
                call.cancel()  # no-op when it ended; frees the replica's work when our client went away
            last = attempt == self.config.max_failovers
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not sent and not last:
                exclude.add(replica.replica_id)  # busy, not broken: try another one, if any
                if self.replicas.up(exclude):
                    continue
            if code not in FAILOVER_CODES or last:
                raise error
            log.warning("replica %s failed (%s) after %d tokens of %s; resuming on another replica",
                        replica.replica_id, code.name, len(sent), request.request_id)
            self.replicas.suspect(replica)
            exclude.add(replica.replica_id)
            self.metrics.failovers.labels("mid_stream" if sent else "before_first_token").inc()

    # ---- HTTP ------------------------------------------------------------------------------

    def check_key(self, http: Request) -> None:
        if not self.keys:
            return
        sent = http.headers.get(API_KEY_HEADER, "")
        if not any(_same_secret(sent, f"Bearer {key}") for key in self.keys):
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")

    async def completions(self, http: Request, chat: bool) -> Response:
        arrival = time.perf_counter()
        self.check_key(http)
        request = parse_request(await http.body(), chat, self.limits)
        await asyncio.to_thread(self.tokenize, request)
        streams = [self.generate(request)]
        first = await anext(streams[0])  # errors before the first token still get their HTTP status
        self.metrics.ttft.observe(time.perf_counter() - arrival)
        # Choices 1..n-1 start once choice 0's prompt blocks sit in its replica's local prefix cache,
        # and go there: they share those blocks instead of computing or pulling the prompt again.
        streams += [self.generate(request, i, prefer=first.replica_id) for i in range(1, request.n)]
        pieces = choice_pieces(first, streams)
        headers = {"x-kvcluster-replica": first.replica_id}
        if request.stream:
            return StreamingResponse(self._sse(request, pieces, arrival), media_type="text/event-stream",
                                     headers=headers)
        choices, finals = await collect(request.n, pieces)
        self.metrics.latency.observe(time.perf_counter() - arrival)
        usage = self._usage([finals[i] for i in range(request.n)])
        return JSONResponse(completion_object(request, choices, usage, self.token_text), headers=headers)

    def _usage(self, finals: list[Piece]) -> dict:
        return usage_object([p.response.usage for p in finals], [p.replica_id for p in finals])

    def token_text(self, token_id: int) -> str:
        """One token as text (logprobs' `token`; a lone piece of a UTF-8 character shows as U+FFFD)."""
        return self.tokenizer.decode([token_id], skip_special=False)

    async def _sse(self, request: ApiRequest, pieces: AsyncIterator[tuple[int, Piece]],
                   arrival: float) -> AsyncIterator[str]:
        async for event in sse_events(request, pieces, self.token_text, self._usage):
            yield event
        self.metrics.latency.observe(time.perf_counter() - arrival)

    async def reset_prefix_cache(self, http: Request) -> Response:
        """Every registered replica drops its local prefix cache and its blocks' registry entries
        (vLLM's and SGLang's endpoint). The router asks Redis for every request and keeps no copy, so
        nothing here needs invalidating. 503 naming each replica that did not confirm."""
        self.check_key(http)
        answers = await self.replicas.reset_prefix_caches(self.metadata, self.config.reset_timeout_seconds)
        if not answers:
            raise ApiError(503, "no decode replica is registered", None, "no_replica", "service_unavailable_error")
        failed = [f"{r.replica_id} ({a.code().name}: {a.details()})"
                  for r, a in answers if isinstance(a, grpc.aio.AioRpcError)]
        if failed:
            others = len(answers) - len(failed)
            raise ApiError(503, f"prefix cache not reset on {len(failed)} of {len(answers)} replicas: "
                           f"{'; '.join(failed)}" + (f" (the other {others} were reset)" if others else ""), None,
                           "replica_failed", "service_unavailable_error")
        log.info("prefix caches reset on %d replicas", len(answers))
        return JSONResponse({"reset": True, "replicas": len(answers),
                             "blocks_dropped": sum(a.blocks_dropped for _, a in answers),
                             "index_updated": all(a.index_updated for _, a in answers),
                             "per_replica": {r.replica_id: a.blocks_dropped for r, a in answers}})

    def models(self, http: Request) -> Response:
        self.check_key(http)
        return JSONResponse({"object": "list", "data": [{"id": self.served_model, "object": "model", "created": 0,
                                                         "owned_by": "kvcluster"}]})

    def health(self, http: Request) -> Response:
        """Up replicas and how many run each numerics mode (no replica names: this port is public);
        `exactness_guaranteed` only when every up replica said it holds on it."""
        up = self.replicas.up()
        numerics = Counter(r.published.get("numerics", "unknown") for r in up)
        body = {"status": "ok" if up else "no replica up", "replicas_up": len(up), "numerics": dict(numerics),
                "exactness_guaranteed": bool(up) and all(r.exactness_guaranteed for r in up)}
        return JSONResponse(body, status_code=200 if up else 503)

    def metrics_page(self, http: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app):
            await self.refresh()
            task = asyncio.create_task(self.refresh_forever())
            try:
                yield
            finally:
                task.cancel()
                await self.replicas.close()

        tokenize = self.tokenize_endpoints
        routes = [HttpRoute("/v1/chat/completions", self._counted("/v1/chat/completions", lambda r: self.completions(r, True)), methods=["POST"]),
                  HttpRoute("/v1/completions", self._counted("/v1/completions", lambda r: self.completions(r, False)), methods=["POST"]),
                  HttpRoute("/v1/models", self._counted("/v1/models", self.models), methods=["GET"]),
                  HttpRoute("/tokenize", self._counted("/tokenize", self._keyed(tokenize.tokenize)), methods=["POST"]),
                  HttpRoute("/detokenize", self._counted("/detokenize", self._keyed(tokenize.detokenize)),
                            methods=["POST"]),
                  HttpRoute("/reset_prefix_cache", self._counted("/reset_prefix_cache", self.reset_prefix_cache),
                            methods=["POST"]),
                  HttpRoute("/health", self.health, methods=["GET"]),
                  HttpRoute("/live", lambda r: JSONResponse({"status": "ok"}), methods=["GET"]),
                  HttpRoute("/metrics", self.metrics_page, methods=["GET"])]
        return Starlette(routes=routes, lifespan=lifespan)

    def _keyed(self, handler):
        async def endpoint(http: Request) -> Response:
            self.check_key(http)
            return await handler(http)
        return endpoint

    def _counted(self, route: str, handler):
        """The handler, with ApiError turned into OpenAI's error object and every answer counted."""
        async def endpoint(http: Request) -> Response:
            try:
                response = handler(http)
                if asyncio.iscoroutine(response):
                    response = await response
            except ApiError as exc:
                response = JSONResponse(exc.body(), status_code=exc.status)
            except Exception:
                log.exception("unexpected error on %s", route)
                response = JSONResponse(ApiError(500, "internal error", kind="server_error").body(), status_code=500)
            self.metrics.requests.labels(route, str(response.status_code)).inc()
            return response
        return endpoint


def api_error_from_grpc(exc: grpc.aio.AioRpcError) -> ApiError:
    """A replica's status as the HTTP error OpenAI clients expect."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = details.split(":", 1)[0] if ":" in details else None
        for grpc_name, http_name in GRPC_FIELDS.items():  # the replica's field as the HTTP body calls it
            if field and field.startswith(grpc_name):
                field, details = http_name, http_name + details[len(grpc_name):]
                break
        field = field.removeprefix("sampling.") if field else None
        return ApiError(400, details, field, "invalid_value")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(429, f"overloaded: {details}", None, "overloaded", "rate_limit_error")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, f"deadline exceeded: {details}", None, "timeout", "timeout_error")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ApiError(502, "a decode replica refused the gateway's credentials (decode_api_key)", None,
                        "upstream_auth", "server_error")
    return ApiError(503, f"decode replica failed: {code.name} {details}", None, "replica_failed",
                    "service_unavailable_error")
