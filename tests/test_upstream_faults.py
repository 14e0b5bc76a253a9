"""The cloud tier forwarding to an upstream that misbehaves (cloud_node/upstream.py). No serving engine breaks on
cue, so a small aiohttp server plays one, its behaviour chosen by the prompt's first word: it cuts its stream,
answers what is not a completion or leaves out what a client reads (logprobs, some of them, finish_reason,
usage), trickles, or holds the request open. In front of it runs the tier as it
serves: `UpstreamScheduler` under the shared `TierServicer`, behind a real gRPC server. Then the manifest's
upstream fields, checked by the real cloud process at start."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections import defaultdict
from contextlib import contextmanager

import grpc
import pytest
import yaml
from aiohttp import web

from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_cloud_node.upstream import MAX_ANSWER_BYTES, UpstreamEngine, UpstreamScheduler
from tierline_shared.config.manifest import BatchConfig, UpstreamConfig
from tierline_shared.runtime.engine import EngineInfo
from tierline_shared.runtime.scheduler import END
from tierline_shared.serving.servicer import TierServicer
from tierline_shared.transport.grpc_server import create_server

TIMEOUT = 60  # seconds: a call that should answer, or an event that should come, long before
HOLD_S = 600  # how long the upstream holds a request it never answers (the test ends first)
MODEL = "upstream-model"
_keys = itertools.count()


def _completion(text: str, reason: str | None = "stop") -> dict:
    return {"id": "c", "object": "text_completion", "model": MODEL,
            "choices": [{"index": 0, "text": text, "finish_reason": reason}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _chunk(text: str, reason: str | None = None, logprobs: dict | None = None) -> bytes:
    return _event({"object": "text_completion", "model": MODEL,
                   "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": logprobs}]})


# "ab" as vLLM answers `logprobs: k`: each token's alternatives, the chosen token among them even when it is not
# one of the k likeliest ("b": k + 1 of them)
TOKENS = [("a", -0.1, {"a": -0.1, "x": -2.5, "y": -3.0}), ("b", -0.7, {"c": -0.6, "b": -0.7, "z": -4.0})]


def _legacy(tokens) -> dict:
    """OpenAI's completions `logprobs` object (vLLM's)."""
    return {"tokens": [t for t, _, _ in tokens], "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": [top for _, _, top in tokens], "text_offset": list(range(len(tokens)))}


def _content(tokens) -> dict:
    """The chat `logprobs` object llama.cpp server answered /v1/completions with."""
    return {"content": [{"id": 0, "token": t, "logprob": lp, "bytes": list(t.encode()),
                         "top_logprobs": [{"id": 0, "token": a, "logprob": alp, "bytes": list(a.encode())}
                                          for a, alp in top.items()]} for t, lp, top in tokens]}


class Upstream:
    """An OpenAI-compatible server on a free port. The prompt is "<behaviour> <key>"; per key the test can see
    that a request came (`asked`), let a held one go on (`go`), and see that the tier closed it (`hung_up`: the
    handler was cancelled, or a write failed)."""

    def __init__(self):
        self.asked, self.go, self.hung_up = (defaultdict(threading.Event) for _ in range(3))
        self.requests: dict[str, list[dict]] = defaultdict(list)
        self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/completions", self._handle)
        # handler_cancellation: a handler is cancelled when its client closes the connection, as vLLM aborts
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        behaviour, key = (body["prompt"].split() + [""])[:2]
        self.requests[key].append(body)
        self.asked[key].set()
        try:
            return await getattr(self, f"_{behaviour}")(request, body, key)
        except (asyncio.CancelledError, ConnectionError):
            self.hung_up[key].set()
            raise

    @staticmethod
    async def _sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        return resp

    async def _whole(self, request, body, key):
        if not body.get("stream"):
            return web.json_response(_completion("ab"))
        resp = await self._sse(request)
        for event in (_chunk("a"), _chunk("b"), _chunk("", "stop"), b"data: [DONE]\n\n"):
            await resp.write(event)
        return resp

    async def _reset_once(self, request, body, key):
        """The first request: one chunk, then (when the test says) the connection reset; the next ones whole."""
        if len(self.requests[key]) > 1:
            return await self._whole(request, body, key)
        resp = await self._sse(request)
        await resp.write(_chunk("a"))
        await asyncio.to_thread(self.go[key].wait, TIMEOUT)
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        request.transport.abort()
        return resp

    async def _cut(self, request, body, key):
        """One chunk, then the stream ends cleanly: no finish_reason, no [DONE] (a proxy's idle timeout)."""
        resp = await self._sse(request)
        await resp.write(_chunk("a"))
        return resp

    async def _json_for_stream(self, request, body, key):
        """A whole JSON answer to a stream request (an engine that does not stream)."""
        return web.json_response(_completion("ab"))

    async def _error_event(self, request, body, key):
        """vLLM's way when its engine fails mid-stream: an error object as an event, then [DONE]."""
        resp = await self._sse(request)
        for event in (_chunk("a"), _event({"error": {"message": "engine died", "code": 500}}), b"data: [DONE]\n\n"):
            await resp.write(event)
        return resp

    async def _no_done(self, request, body, key):
        """`transformers serve`'s stream: no [DONE], usage only when stream_options asks; here an unknown
        finish_reason too (TGI's native "eos_token")."""
        resp = await self._sse(request)
        for event in (_chunk("a"), _chunk("b"), _chunk("", "eos_token")):
            await resp.write(event)
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(_event({"choices": [], "usage": _completion("")["usage"]}))
        return resp

    async def _no_usage(self, request, body, key):
        """A stream that never says its usage (an engine that ignores stream_options); a whole answer without it."""
        if not body.get("stream"):
            return web.json_response({k: v for k, v in _completion("ab").items() if k != "usage"})
        resp = await self._sse(request)
        for event in (_chunk("a"), _chunk("b"), _chunk("", "stop"), b"data: [DONE]\n\n"):
            await resp.write(event)
        return resp

    async def _answer(self, request, body, events: list[bytes], whole: dict) -> web.StreamResponse:
        if not body.get("stream"):
            return web.json_response(whole)
        resp = await self._sse(request)
        for event in events:
            await resp.write(event)
        return resp

    def _with_logprobs(self, request, body, shape):
        whole = _completion("ab")
        whole["choices"][0]["logprobs"] = shape(TOKENS)
        return self._answer(request, body, [_chunk("a", logprobs=shape(TOKENS[:1])),
                                            _chunk("b", logprobs=shape(TOKENS[1:])),
                                            _chunk("", "stop"), b"data: [DONE]\n\n"], whole)

    async def _logprobs(self, request, body, key):
        """vLLM's logprobs: OpenAI's completions object, one per chunk when streaming."""
        return await self._with_logprobs(request, body, _legacy)

    async def _content_logprobs(self, request, body, key):
        """llama.cpp server's: the chat object (`content`), before it answered with the completions one."""
        return await self._with_logprobs(request, body, _content)

    async def _null_content_logprobs(self, request, body, key):
        """OpenAI's completions object with a `content: null` beside it (a server that fills both shapes' keys)."""
        return await self._with_logprobs(request, body, lambda tokens: {**_legacy(tokens), "content": None})

    async def _part_logprobs(self, request, body, key):
        """Logprobs for "a" and not "b": a token without its value, or a chunk without any."""
        whole = _completion("ab")
        whole["choices"][0]["logprobs"] = {**_legacy(TOKENS), "token_logprobs": [-0.1, None]}
        return await self._answer(request, body, [_chunk("a", logprobs=_legacy(TOKENS[:1])), _chunk("b"),
                                                  _chunk("", "stop"), b"data: [DONE]\n\n"], whole)

    async def _short_logprobs(self, request, body, key):
        """Two tokens and one log-probability: lists that do not line up."""
        whole = _completion("ab")
        whole["choices"][0]["logprobs"] = {**_legacy(TOKENS), "token_logprobs": [-0.1]}
        return await self._answer(request, body, [_chunk("ab", logprobs=whole["choices"][0]["logprobs"]),
                                                  _chunk("", "stop"), b"data: [DONE]\n\n"], whole)

    async def _no_reason(self, request, body, key):
        """No finish_reason: a whole answer's null, a stream's [DONE] after none."""
        return await self._answer(request, body, [_chunk("a"), _chunk("b"), b"data: [DONE]\n\n"],
                                  _completion("ab", None))

    async def _bad_usage(self, request, body, key):
        usage = {"prompt_tokens": "five", "completion_tokens": 2, "total_tokens": 7}
        return await self._answer(request, body, [_chunk("a"), _chunk("b", "stop"),
                                                  _event({"choices": [], "usage": usage}), b"data: [DONE]\n\n"],
                                  {**_completion("ab"), "usage": usage})

    async def _no_text(self, request, body, key):
        whole = _completion("ab")
        del whole["choices"][0]["text"]
        return web.json_response(whole)

    async def _truncated(self, request, body, key):
        return web.Response(text='{"choices": [{"text": "ab', content_type="application/json")

    async def _html(self, request, body, key):  # a proxy's login page
        return web.Response(text="<html>sign in</html>", content_type="text/html")

    async def _no_choices(self, request, body, key):
        return web.json_response({**_completion("ab"), "choices": []})

    async def _a_list(self, request, body, key):
        return web.json_response([_completion("ab")])

    async def _error_200(self, request, body, key):
        return web.json_response({"object": "error", "message": "model not loaded"})

    async def _abort(self, request, body, key):  # vLLM: a request it gave up on
        return web.json_response(_completion("a", "abort"))

    async def _huge(self, request, body, key):
        return web.json_response(_completion("x" * (MAX_ANSWER_BYTES + 1)))

    async def _trickle(self, request, body, key):
        """A body one byte at a time, each well within any socket timeout, for as long as the tier reads."""
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for _ in range(HOLD_S * 20):
            await resp.write(b" ")
            await asyncio.sleep(0.05)
        return resp

    async def _silent(self, request, body, key):
        """Holds the request: after one chunk when streaming, before any byte otherwise."""
        if body.get("stream"):
            resp = await self._sse(request)
            await resp.write(_chunk("a"))
        await asyncio.sleep(HOLD_S)
        return web.json_response(_completion("ab"))


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    server.stop()


@contextmanager
def tier(upstream: Upstream, retries: int = 0, max_num_seqs: int = 4, max_context: int = 0):
    """The cloud tier forwarding to `upstream`, served over a real gRPC server: a stub."""
    scheduler = UpstreamScheduler(UpstreamConfig(url=f"http://127.0.0.1:{upstream.port}/v1", retries=retries),
                                  MODEL, BatchConfig(max_num_seqs=max_num_seqs))
    engine = UpstreamEngine(EngineInfo("cloud", MODEL, f"upstream:{MODEL}", params=0, bytes=0,
                                       max_context=max_context, window_limit=0))
    server, port = create_server(TierServicer(engine, cache_size=0, scheduler=scheduler))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.InferenceServiceStub(channel)
    finally:
        channel.close()
        server.stop(0)
        scheduler.close()


def _req(behaviour: str) -> tuple[pb.InferRequest, str]:
    key = f"k{next(_keys)}"
    return pb.InferRequest(prompt=f"{behaviour} {key}", parameters=pb.Parameters(max_tokens=8)), key


def test_a_stream_broken_after_its_first_chunk_is_not_sent_again(upstream):
    """A retry would send the client the text it already has a second time ("a", then "ab"): once a chunk is
    relayed, a broken stream fails the tier instead (the docstring's "a stream only before its first chunk")."""
    req, key = _req("reset_once")
    with tier(upstream, retries=2) as cloud:
        stream = cloud.InferStream(req, timeout=TIMEOUT)
        got = [next(stream).choices[0].text]
        upstream.go[key].set()  # the tier has relayed "a": now the upstream resets the connection
        with pytest.raises(grpc.RpcError) as err:
            got += [c.choices[0].text for c in stream]
        assert got == ["a"]
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "broke after 1 chunk" in err.value.details()


@pytest.mark.parametrize("behaviour", ["cut", "json_for_stream", "error_event"])
def test_a_stream_that_stops_before_its_end_is_no_answer(upstream, behaviour):
    """Cut without a finish_reason or [DONE], a JSON answer to a stream request, or an error event: the client
    gets UNAVAILABLE (the router's cascade moves on), not a short or empty answer with finish_reason "length"."""
    req, _ = _req(behaviour)
    with tier(upstream) as cloud, pytest.raises(grpc.RpcError) as err:
        list(cloud.InferStream(req, timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()


@pytest.mark.parametrize("behaviour", ["truncated", "html", "no_choices", "a_list", "error_200", "abort", "huge"])
def test_an_answer_that_is_not_a_completion_fails_the_tier(upstream, behaviour):
    """Not JSON, no choices, an error object with 200, finish_reason "abort" (the text cut short), or more bytes
    than any answer has: UNAVAILABLE naming the upstream's fault, not INTERNAL (a Python error of the tier's
    own) nor an answer."""
    req, _ = _req(behaviour)
    with tier(upstream) as cloud, pytest.raises(grpc.RpcError) as err:
        cloud.Infer(req, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "upstream" in err.value.details()


@pytest.mark.parametrize("behaviour, prompt_tokens", [("no_done", 5), ("no_usage", 0)])
def test_a_stream_without_done_or_usage_is_a_whole_answer(upstream, behaviour, prompt_tokens):
    """`transformers serve` ends its stream with a finish_reason and no [DONE], and says its usage only when
    asked (stream_options.include_usage); an engine that never says it has its completion tokens counted from
    the chunks, not reported as 0 (quotas count them). An unknown finish_reason reaches the wire as "stop"."""
    req, key = _req(behaviour)
    with tier(upstream) as cloud:
        chunks = list(cloud.InferStream(req, timeout=TIMEOUT))
    assert "".join(c.choices[0].text for c in chunks) == "ab"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, 2)
    assert upstream.requests[key][0]["stream_options"] == {"include_usage": True}


def _ask(cloud, req: pb.InferRequest, stream: bool) -> tuple[pb.InferResponse, list[str]]:
    """The answer (a stream's last message) and the texts that came before it; RpcError as it came."""
    if not stream:
        return cloud.Infer(req, timeout=TIMEOUT), []
    chunks = []
    for chunk in cloud.InferStream(req, timeout=TIMEOUT):
        chunks.append(chunk)
    return chunks[-1], [c.choices[0].text for c in chunks[:-1]]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("top", [0, 2])
def test_logprobs_from_an_upstream_that_sends_none_are_refused_naming_the_field(upstream, stream, top):
    """`transformers serve` and TGI send no logprobs: a client that asks for them gets INVALID_ARGUMENT naming
    `parameters.logprobs` (the router's HTTP API: 400, param `logprobs`), not an answer whose empty logprobs it
    cannot tell from no tokens; a stream says it before any text. A request that does not ask is answered, with
    confidence 0.0 (the tier's own `logprobs: 1` came back empty)."""
    req, key = _req("whole")
    req.parameters.logprobs, req.parameters.top_logprobs = True, top
    got: list[str] = []
    with tier(upstream) as cloud:
        with pytest.raises(grpc.RpcError) as err:
            if stream:
                got += [c.choices[0].text for c in cloud.InferStream(req, timeout=TIMEOUT)]
            else:
                cloud.Infer(req, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith("parameters.logprobs: "), err.value.details()
        assert got == []
        assert upstream.requests[key][0]["logprobs"] == max(1, top)
        req.parameters.logprobs, req.parameters.top_logprobs = False, 0
        answer, texts = _ask(cloud, req, stream)
    assert "".join(texts) + answer.choices[0].text == "ab"
    assert answer.confidence == 0.0 and not answer.choices[0].logprobs


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("behaviour", ["logprobs", "content_logprobs", "null_content_logprobs"])
def test_logprobs_the_upstream_sends_reach_the_client_as_asked(upstream, behaviour, stream):
    """vLLM's logprobs object, and the chat one llama.cpp server answered completions with: one entry per token,
    with as many alternatives as asked (none without top_logprobs, though the tier asks the upstream for one; k,
    though vLLM adds the chosen token to its k); the confidence is the least likely token's probability."""
    req, _ = _req(behaviour)
    with tier(upstream) as cloud:
        plain, _ = _ask(cloud, req, stream)
        req.parameters.logprobs = True
        without_top, _ = _ask(cloud, req, stream)
        req.parameters.top_logprobs = 1
        with_top, _ = _ask(cloud, req, stream)
    assert plain.confidence == pytest.approx(math.exp(-0.7)) and not plain.choices[0].logprobs
    for answer in (without_top, with_top):
        assert [(t.token, t.logprob) for t in answer.choices[0].logprobs] == [("a", pytest.approx(-0.1)),
                                                                             ("b", pytest.approx(-0.7))]
        assert answer.confidence == pytest.approx(math.exp(-0.7))
    assert [list(t.top_logprobs) for t in without_top.choices[0].logprobs] == [[], []]
    assert [[(a.token, round(a.logprob, 3)) for a in t.top_logprobs] for t in with_top.choices[0].logprobs] == \
        [[("a", -0.1)], [("c", -0.6)]]


@pytest.mark.parametrize("behaviour, stream", [("part_logprobs", False), ("part_logprobs", True),
                                               ("short_logprobs", False), ("short_logprobs", True)])
def test_logprobs_for_part_of_the_answer_are_no_logprobs(upstream, behaviour, stream):
    """An upstream whose logprobs miss some of its tokens (a value null, a chunk without any, lists that do not
    line up): a client that asked gets UNAVAILABLE saying so (the router's cascade moves on), not the tokens
    that had one; one that did not ask is answered, with confidence 0.0, not the least of a part."""
    req, _ = _req(behaviour)
    with tier(upstream) as cloud:
        answer, texts = _ask(cloud, req, stream)
        assert "".join(texts) + answer.choices[0].text == "ab"
        assert answer.confidence == 0.0
        req.parameters.logprobs = True
        with pytest.raises(grpc.RpcError) as err:
            _ask(cloud, req, stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "logprobs" in err.value.details()


@pytest.mark.parametrize("behaviour, stream, field", [
    ("no_reason", False, "finish_reason"), ("no_reason", True, "finish_reason"), ("no_usage", False, "usage"),
    ("bad_usage", False, "usage.prompt_tokens"), ("bad_usage", True, "usage.prompt_tokens"),
    ("no_text", False, "text"),
])
def test_an_answer_without_what_its_client_reads_fails_the_tier(upstream, behaviour, stream, field):
    """No finish_reason ("length" would say it was cut at max_tokens), a whole answer without usage (0 tokens:
    quotas would charge none), a usage that is no count, a choice without text (an empty answer): UNAVAILABLE
    naming the field, not a zero the client reads as the upstream's word, nor INTERNAL."""
    req, _ = _req(behaviour)
    with tier(upstream) as cloud, pytest.raises(grpc.RpcError) as err:
        _ask(cloud, req, stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert f"{field}:" in err.value.details(), err.value.details()


@pytest.mark.parametrize("stream", [False, True])
def test_a_caller_gone_closes_the_upstream_request(upstream, stream):
    """The client cancels long before its deadline: the tier closes the HTTP request at once (the upstream
    stops generating), whether it waits for a whole answer or for a stream's next chunk."""
    req, key = _req("silent")
    with tier(upstream) as cloud:
        if stream:
            call = cloud.InferStream(req, timeout=HOLD_S)
            assert next(call).choices[0].text == "a"
        else:
            call = cloud.Infer.future(req, timeout=HOLD_S)
            assert upstream.asked[key].wait(TIMEOUT)
        call.cancel()
        assert upstream.hung_up[key].wait(TIMEOUT), "the upstream still holds the request of a client gone"


def test_an_upstream_that_trickles_frees_its_worker_at_the_deadline(upstream):
    """Bytes that keep coming, each within the socket's timeout, never end a read on their own: the deadline
    is checked between reads, so the one worker is free for the next request, which is answered."""
    req, key = _req("trickle")
    with tier(upstream, max_num_seqs=1) as cloud:
        with pytest.raises(grpc.RpcError) as err:
            cloud.Infer(req, timeout=2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert upstream.hung_up[key].wait(TIMEOUT), "the worker still reads the trickling answer"
        assert cloud.Infer(_req("whole")[0], timeout=TIMEOUT).choices[0].text == "ab"


def test_a_max_tokens_past_the_upstreams_context_is_refused_before_it_is_asked(upstream):
    """With `upstream.max_context` set, a max_tokens that leaves the prompt no room is INVALID_ARGUMENT naming the
    field, and the upstream never sees it (`transformers serve` would run it until the deadline); one within it
    is forwarded, and so is one that sets none: the manifest's default, the prompt not counted here (its tokenizer
    is the upstream's). GetServerInfo reports the context."""
    with tier(upstream, max_context=200) as cloud:
        req, key = _req("whole")
        req.parameters.max_tokens = 200
        with pytest.raises(grpc.RpcError) as err:
            cloud.Infer(req, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith("parameters.max_tokens: this model's maximum context length is 200 "
                                              "tokens"), err.value.details()
        assert key not in upstream.requests
        req, key = _req("whole")
        req.parameters.max_tokens = 199
        assert cloud.Infer(req, timeout=TIMEOUT).choices[0].text == "ab"
        assert upstream.requests[key][0]["max_tokens"] == 199
        req, key = _req("whole")
        req.parameters.ClearField("max_tokens")
        assert cloud.Infer(req, timeout=TIMEOUT).choices[0].text == "ab"
        assert upstream.requests[key][0]["max_tokens"] == 96  # limits.default_max_tokens
        info = cloud.GetServerInfo(pb.ServerInfoRequest(), timeout=TIMEOUT)
        assert (info.max_context, info.max_tokens_limit) == (200, 199)


@pytest.mark.parametrize("upstream_fields, field", [
    ({"url": "http://127.0.0.1:8000/v1", "max_context": -1}, "tiers.cloud.upstream.max_context: -1 out of range"),
    ({"url": "http://127.0.0.1:8000/v1", "max_context": "4k"}, "tiers.cloud.upstream.max_context: expected int"),
    ({"url": "http://127.0.0.1:8000/v1", "max_context": 96}, "tiers.cloud.upstream.max_context: 96 leaves no room"),
    ({"max_context": 4096}, "tiers.cloud.upstream.max_context: no upstream.url"),
    ({"url": "http://127.0.0.1:99999/v1"}, "tiers.cloud.upstream.url"),
    ({"url": "http://127.0.0.1:port/v1"}, "tiers.cloud.upstream.url"),
    ({"url": "http://user:secret@127.0.0.1:8000/v1"}, "tiers.cloud.upstream.url"),
    ({"url": "http://127.0.0.1:8000/v1", "api_key_env": "TIERLINE_TEST_UNSET_KEY"}, "tiers.cloud.upstream.api_key_env"),
])
def test_the_upstream_fields_are_checked_at_start(tmp_path, upstream_fields, field):
    """A port that is no port, credentials in the URL (never sent), a key variable that is not set, or a context
    that is no size or leaves the default max_tokens no prompt: the cloud process exits 2 naming the field,
    instead of starting and failing every request."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({
        "model_name": MODEL, "models_dir": str(tmp_path), "nats": {"url": "nats://127.0.0.1:4222"},
        "tiers": {"cloud": {"upstream": upstream_fields, "grpc_port": 0, "metrics_port": -1}}}))
    env = {k: v for k, v in os.environ.items() if k != "TIERLINE_TEST_UNSET_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "tierline_cloud_node", "--manifest", str(manifest), "--no-nats"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the cloud tier started with upstream {upstream_fields} instead of exiting 2")
    assert proc.returncode == 2 and field in stderr, stderr


def test_closing_the_tier_answers_what_it_held_at_once(upstream):
    """A tier stopping (its scheduler closed) fails the request running against a silent upstream and the one
    queued behind it with "server shutting down" at once, the running one's HTTP request closed: no caller waits
    out its deadline (the queued one was never answered at all)."""
    from tierline_shared.runtime.engine import GenerationParams

    scheduler = UpstreamScheduler(UpstreamConfig(url=f"http://127.0.0.1:{upstream.port}/v1"), MODEL,
                                  BatchConfig(max_num_seqs=1))
    running_key, queued_key = f"k{next(_keys)}", f"k{next(_keys)}"
    params = GenerationParams(max_tokens=8)
    running = scheduler.submit(f"silent {running_key}", params, timeout_s=HOLD_S)
    queued = scheduler.submit(f"silent {queued_key}", params, timeout_s=HOLD_S, stream=True)
    assert upstream.asked[running_key].wait(TIMEOUT)
    scheduler.close()
    for ticket in (running, queued):
        with pytest.raises(RuntimeError, match="server shutting down"):
            ticket.future.result(timeout=TIMEOUT)
    assert queued.chunks.get(timeout=TIMEOUT) is END
    assert upstream.hung_up[running_key].wait(TIMEOUT) and not upstream.asked[queued_key].is_set()
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(f"silent {queued_key}", params)
    assert scheduler.depth == 0  # the queued one counted out of the waiting (its worker never ran it)


def test_a_prompt_that_carries_its_special_tokens_is_refused_naming_the_field(upstream):
    """`add_special_tokens: false` cannot be honoured by a forwarder: the upstream's own tokenizer adds the BOS (and
    `transformers serve` refuses the field). INVALID_ARGUMENT naming it, before the upstream is asked, not a prompt
    read with two BOS (the router sends such prompts only to tiers that run their model: router/chat.py)."""
    req, key = _req("whole")
    req.add_special_tokens = False
    with tier(upstream) as cloud:
        with pytest.raises(grpc.RpcError) as err:
            cloud.Infer(req, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "add_special_tokens" in err.value.details()
        assert key not in upstream.requests
        req.ClearField("add_special_tokens")
        assert cloud.Infer(req, timeout=TIMEOUT).choices[0].text == "ab"
