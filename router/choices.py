"""n > 1 choices (OpenAI's `n`): each choice is asked for as its own request, and the answers are merged.

A tier answers one choice per request; the router asks for each of the n as a request of its own (the
same prompt and parameters; with a seed, seed + i, so the choices differ yet stay reproducible), each
through the policy and the cascade as any request, concurrently. Their answers become one response:
choices in index order, the prompt's tokens counted once and the completions' summed (OpenAI's usage),
the lowest confidence, degraded if any choice was. Streams are merged the same way: each choice's
chunks as they come (`Choice.index` says whose), then one last message holding every choice's
finish_reason (and logprobs), as a single choice's stream ends.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from tierline_api.v1 import inference_pb2 as pb
from tierline_shared.runtime.engine import MAX_SEED
from tierline_shared.transport.messaging import TierError


def choices_of(req: pb.InferRequest) -> int:
    """How many choices a request asks for (0, the proto default, is 1)."""
    return max(1, req.parameters.n)


def fan_out(req: pb.InferRequest) -> list[pb.InferRequest]:
    """One single-choice request per choice."""
    out = []
    for i in range(choices_of(req)):
        one = pb.InferRequest()
        one.CopyFrom(req)
        one.parameters.n = 0  # the same request_id: one client request, traced as one
        if req.parameters.HasField("seed"):
            one.parameters.seed = (req.parameters.seed + i) % (MAX_SEED + 1)
        out.append(one)
    return out


def merge(request_id: str, answers: list[pb.InferResponse]) -> pb.InferResponse:
    """The choices' answers (or a stream's last messages) as one response."""
    out = pb.InferResponse()
    out.CopyFrom(answers[0])
    out.request_id = request_id
    del out.choices[:]
    del out.escalation_path[:]
    for i, a in enumerate(answers):
        choice = out.choices.add()
        choice.CopyFrom(a.choices[0] if a.choices else pb.Choice())
        choice.index = i
        out.escalation_path.extend(a.escalation_path)
    out.usage.completion_tokens = sum(a.usage.completion_tokens for a in answers)
    out.confidence = min(a.confidence for a in answers)
    out.degraded = any(a.degraded for a in answers)
    out.cached = all(a.cached for a in answers)
    out.timings.queue_ms = max(a.timings.queue_ms for a in answers)
    out.timings.first_token_ms = min(a.timings.first_token_ms for a in answers)
    out.timings.total_ms = max(a.timings.total_ms for a in answers)
    return out


def _final(chunk: pb.InferResponse) -> bool:
    return bool(chunk.choices and chunk.choices[0].finish_reason)


async def merge_streams(request_id: str, streams: list[AsyncIterator[pb.InferResponse]]
                        ) -> AsyncIterator[pb.InferResponse]:
    """The choices' streams as one: text chunks as they come (each its choice's index), then one last message.

    The first error of any stream ends the merged one (and the others); closing it closes them all."""
    events: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for chunk in stream:
                await events.put((i, chunk, None))
            await events.put((i, None, None))  # ended: after its last message, or cut short
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            await events.put((i, None, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    finals: dict[int, pb.InferResponse] = {}
    try:
        while len(finals) < len(streams):
            i, chunk, exc = await events.get()
            if exc is not None:
                raise exc
            if chunk is None:
                if i not in finals:
                    raise TierError("router", "UNAVAILABLE", f"choice {i}: the stream ended before its answer")
                continue
            if _final(chunk):
                finals[i] = chunk
                if not chunk.choices[0].text:
                    continue
                text = pb.InferResponse()  # a last message with text: the text goes out as a chunk of its own
                text.CopyFrom(chunk)
                text.choices[0].finish_reason = ""
                del text.choices[0].logprobs[:]
                chunk.choices[0].text, chunk = "", text
            chunk.choices[0].index = i
            yield chunk
        yield merge(request_id, [finals[i] for i in range(len(streams))])
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
