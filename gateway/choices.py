"""A request's choices as one stream: their Generate streams merged (n > 1), gathered into whole
answers, or turned into OpenAI's server-sent events."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from gateway.openai_api import (FINISH, ApiError, ApiRequest, Choice, TokenText, chunk_object, logprobs_object)
from kvcluster.proto import decode_pb2


@dataclass
class Piece:
    """One GenerateResponse and the replica that produced it."""

    response: decode_pb2.GenerateResponse
    replica_id: str


async def choice_pieces(first: Piece, streams: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) as the choices' streams produce them; choice 0's first piece (already
    read) comes first. The first error of any choice ends them all and is raised."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                await queue.put((index, piece, None))
        except ApiError as exc:
            await queue.put((index, None, exc))
        finally:
            await queue.put((index, None, None))

    tasks = []
    try:
        yield 0, first
        if len(streams) == 1:  # the common case needs no task
            async for piece in streams[0]:
                yield 0, piece
            return
        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        running = len(tasks)
        while running:
            index, piece, error = await queue.get()
            if error is not None:
                raise error
            if piece is None:
                running -= 1
            else:
                yield index, piece
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # frees each replica's work when the client went away


async def collect(n: int, pieces: AsyncIterator[tuple[int, Piece]]) -> tuple[list[Choice], dict[int, Piece]]:
    """Every choice's whole answer, and each one's last piece (its finish and usage)."""
    choices, finals = [Choice() for _ in range(n)], {}
    try:
        async for index, piece in pieces:
            choice, response = choices[index], piece.response
            choice.text += response.text
            choice.token_ids.extend(response.token_ids)
            choice.logprobs.extend(response.logprobs)
            if response.finish_reason:
                choice.finish, finals[index] = FINISH[response.finish_reason], piece
    finally:
        await pieces.aclose()
    return choices, finals


async def sse_events(request: ApiRequest, pieces: AsyncIterator[tuple[int, Piece]], token_text: TokenText,
                     usage_of: Callable[[list[Piece]], dict]) -> AsyncIterator[str]:
    """Chunks per choice as its tokens arrive: text deltas (a choice's first carries the role), its
    tokens' logprobs with the next chunk it sends, its finish; then the usage, if asked for; then [DONE]."""
    started, finals = set(), {}
    held: dict[int, tuple[list[int], list]] = {}   # tokens (and logprobs) not yet in a chunk
    offsets: dict[int, int] = {}                   # characters sent per choice (completions' text_offset)
    try:
        async for index, piece in pieces:
            response = piece.response
            finish = FINISH.get(response.finish_reason)
            tokens, logprobs = held.setdefault(index, ([], []))
            tokens.extend(response.token_ids)
            logprobs.extend(response.logprobs)
            if response.text or index not in started or finish:
                chunk_logprobs = (logprobs_object(request.chat, tokens, logprobs, token_text, offsets.get(index, 0))
                                  if request.logprobs and tokens else None)
                yield sse(chunk_object(request, response.text, finish, first=index not in started, index=index,
                                       logprobs=chunk_logprobs))
                started.add(index)
                offsets[index] = offsets.get(index, 0) + len(response.text)
                held[index] = ([], [])
            if finish:
                finals[index] = piece
        if request.include_usage:
            yield sse(chunk_object(request, None, None, usage=usage_of([finals[i] for i in sorted(finals)])))
    except ApiError as exc:  # mid-stream and no replica could take over: the stream says so
        yield sse(exc.body())
    finally:
        await pieces.aclose()
    yield "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
