"""The router's OpenAI-compatible HTTP API, driven by the official `openai` client against a real platform."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import new_key, run_cli
from tierline import InferenceClient
from tierline_infra.supervisor import Stack

MODEL = "tierline-reasoner"
PROMPT = "Q:2+3=?\nA:"


@pytest.fixture(scope="module")
def stack(tiny_family):
    with Stack(tiny_family, tiers=("edge",), auth=True,
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 0.0},
                          "auth.plans": {"pro": {"calls_per_day": 1000, "tokens_per_day": 1000000},
                                         "two": {"calls_per_day": 2, "tokens_per_day": 100000}}}) as s:
        yield s


def api(stack, key: str | None = None) -> openai.OpenAI:
    # max_retries=0: the client would otherwise retry 429s and 5xx by itself
    return openai.OpenAI(api_key=key or stack.api_key, base_url=stack.http_base_url, max_retries=0, timeout=60)


def grpc_answer(stack, max_tokens: int) -> str:
    with InferenceClient(api_key=stack.api_key, endpoint=stack.router_address) as c:
        return c.infer(PROMPT, {"max_tokens": max_tokens}).text


def test_models_lists_the_served_family(stack):
    assert [m.id for m in api(stack).models.list().data] == [MODEL]


def test_completion_round_trip_names_the_tier(stack):
    resp = api(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert resp.choices[0].text == grpc_answer(stack, 8)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.tier == "edge" and resp.tierline["escalation_path"][-1]["tier"] == "edge"
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens > 0


def test_chat_round_trip(stack):
    resp = api(stack).chat.completions.create(
        model=MODEL, max_tokens=8,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3=?"}])
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == grpc_answer(stack, 8)  # the same Q:..\nA: prompt
    assert resp.tier == "edge"


def test_completion_streams_as_sse(stack):
    chunks = list(api(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, stream=True,
                                                stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == grpc_answer(stack, 8)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].tier == "edge"
    assert chunks[-1].usage.completion_tokens == len([c for c in chunks if c.choices]) - 1  # one chunk per token


def test_chat_streams_as_sse(stack):
    stream = api(stack).chat.completions.create(model=MODEL, max_tokens=8, stream=True,
                                                messages=[{"role": "user", "content": "2+3=?"}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == grpc_answer(stack, 8)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_errors_map_to_openai_exceptions(stack):
    with pytest.raises(openai.AuthenticationError):
        api(stack, "tl_00000000_unknown").completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    key_id, key = new_key(stack, "pro")
    assert run_cli("keys", "revoke", key_id, "--manifest", str(stack.manifest), timeout=60).returncode == 0
    with pytest.raises(openai.PermissionDeniedError):
        api(stack, key).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as err:
        api(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=100000)
    assert err.value.body["param"] == "max_tokens" and "parameters." not in str(err.value)  # OpenAI's name
    with pytest.raises(openai.BadRequestError) as err:
        api(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=100)
    assert err.value.body["param"] == "n"
    for ask in (lambda c: c.completions.create(model="gpt-9", prompt=PROMPT, max_tokens=4),  # as OpenAI: a 404
                lambda c: c.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "1+1=?"}]),
                lambda c: c.models.retrieve("gpt-9")):
        with pytest.raises(openai.NotFoundError) as err:
            ask(api(stack))
        body = err.value.body
        assert (body["code"], body["type"], body["param"]) == ("model_not_found", "invalid_request_error", "model")


def test_http_and_grpc_share_one_quota(stack):
    _, key = new_key(stack, "two")
    with InferenceClient(api_key=key, endpoint=stack.router_address, retries=0) as c:
        c.infer(PROMPT, {"max_tokens": 4})
    api(stack, key).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.RateLimitError) as err:
        api(stack, key).chat.completions.create(model=MODEL, max_tokens=4,
                                                messages=[{"role": "user", "content": "1+1=?"}])
    assert "resets at" in str(err.value) and int(err.value.response.headers["retry-after"]) > 0
    with pytest.raises(openai.RateLimitError):  # a stream is refused before it starts
        list(api(stack, key).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True))


def test_missing_or_malformed_key_is_401_with_an_openai_error_body(stack):
    import urllib.error
    import urllib.request

    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4}).encode()
    for headers in ({}, {"authorization": "Basic abc"}):
        req = urllib.request.Request(f"{stack.http_base_url}/completions", data=body, method="POST",
                                     headers={"content-type": "application/json", **headers})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 401
        error = json.loads(err.value.read())["error"]
        assert error["type"] == "authentication_error" and error["code"] == "unauthenticated"


def test_chat_turns_follow_the_models_own_chat_template(tiny_family, tmp_path):
    """The router formats a conversation with the chat_template of the cloud checkpoint (tokenizer_config.json):
    the family's gives its Q:/A: prompt; another template changes the prompt accordingly."""
    import shutil

    from tierline_router.chat import ChatTemplate
    from tierline_router.openai_http import chat_messages

    turns = chat_messages([{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3=?"},
                           {"role": "assistant", "content": "5"}, {"role": "user", "content": " Q:1+1=?\nA:"}])
    template = ChatTemplate.of_models(tiny_family)
    assert template.render(turns) == "<bos>Q:2+3=?\nA:5\nQ:1+1=?\nA:"  # as transformers renders it
    # the template writes the BOS, which the tiers' tokenizer adds itself: the router sends the rest, and the model
    # reads one BOS, as apply_chat_template(tokenize=True) gives it (the family's default template too)
    from tierline_shared.models.artifacts import load_tokenizer
    from tierline_shared.models.tokenizer import CHAT_TEMPLATE

    tok = load_tokenizer(tiny_family)
    assert template.prompt(turns) == ChatTemplate(CHAT_TEMPLATE).prompt(turns) == "Q:2+3=?\nA:5\nQ:1+1=?\nA:"
    assert tok.encode(template.prompt(turns)) == tok.encode(template.render(turns), bos=False)
    assert tok.encode(template.prompt(turns)).count(tok.bos_id) == 1
    models = tmp_path / "models"
    shutil.copytree(tiny_family, models)
    config = json.loads((models / "cloud" / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    (models / "cloud" / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.of_models(models).render(turns[:2]) == "<system>be brief<user>2+3=?<assistant>"
    config["chat_template"] = "{{ raise_exception('System role not supported') }}"
    (models / "cloud" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="System role not supported"):
        ChatTemplate.of_models(models).render(turns[:2])


def test_clients_neutral_parameters_are_accepted_and_others_refused_by_their_openai_name(stack):
    """Issue 26: LangChain's completions class always sends penalties of 0 and used to get a 400 on every call;
    errors named internal fields (`parameters.max_tokens`) with `param: null`."""
    client = api(stack)
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "n": 1, "logprobs": None}
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, **neutral)
    assert resp.choices[0].text == grpc_answer(stack, 8)
    chat = client.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "2+3=?"}],
                                          frequency_penalty=0, presence_penalty=0, logprobs=False,
                                          response_format={"type": "text"})
    assert chat.choices[0].message.content == grpc_answer(stack, 8)
    for params, param in [({"frequency_penalty": 0.5}, "frequency_penalty"), ({"top_logprobs": 2}, "top_logprobs"),
                          ({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                          ({"max_tokens": 10**6}, "max_tokens"), ({"temperature": 0.001}, "temperature")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+3=?"}],
                                           **{"max_tokens": 8, **params})
        error = err.value.body
        assert error["param"] == param and "parameters." not in error["message"], (params, error)
    with pytest.raises(openai.BadRequestError) as err:  # the router's own validation of the rendered prompt
        client.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x" * 5000}])
    assert err.value.body["param"] == "messages"


def test_a_prompt_that_fills_the_context_is_named_and_a_vanishing_temperature_refused(stack):
    """No max_tokens sent, and the prompt alone is the whole context: the prompt's fault (OpenAI names it), not
    that of the max_tokens the client never sent; a temperature float32 cannot hold would arrive as greedy."""
    client = api(stack)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Q:" + "1+" * 300 + "1=?\nA:")
    assert err.value.body["param"] == "prompt" and "no room" in err.value.body["message"], err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "1+" * 300 + "1=?"}])
    assert err.value.body["param"] == "messages", err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1e-46)
    assert err.value.body["param"] == "temperature", err.value.body
    for options, stream, param in (({"include_usage": True}, False, "stream_options"),  # only with stream (OpenAI)
                                   ({"include_usage": "yes"}, True, "stream_options.include_usage"),
                                   ({"include_usage": True, "continuous_usage_stats": True}, True, "stream_options")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=stream, stream_options=options)
        assert err.value.body["param"] == param, (options, err.value.body)


@pytest.mark.parametrize("chat, body, param", [
    (True, {"prompt": "x"}, "prompt"),  # a completions field sent to chat: named as sent, not as `messages`
    (False, {"top_logprobs": 2}, "top_logprobs"),  # a chat field sent to completions: not its `logprobs`
    (True, {"max_completion_tokens": 0}, "max_completion_tokens"),  # the name the client used, not max_tokens
    (True, {"max_tokens": 8, "max_completion_tokens": 10**6}, "max_completion_tokens"),  # the one in effect
    (True, {"max_tokens": 10**6}, "max_tokens"),
    # found by a fault hunt: each of these was served
    (False, {"temperature": 2.5}, "temperature"),  # OpenAI's range is [0, 2]
    (False, {"temperature": 2.0000001}, "temperature"),  # float32 would round it to 2
    (False, {"top_p": 1.00000001}, "top_p"),  # float32 would round it to 1
    (True, {"messages": [{"role": "user", "content": []}]}, "messages.0.content"),  # OpenAI: at least one part
])
def test_errors_name_the_field_as_the_client_sent_it(stack, chat, body, param):
    client = api(stack)
    with pytest.raises(openai.BadRequestError) as err:
        if chat:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+3=?"}],
                                           extra_body=body)
        else:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, extra_body=body)
    error = err.value.body
    assert error["param"] == param and error["message"].startswith(param + ":"), error


def test_a_temperature_above_2_is_refused_over_grpc_as_over_http(stack):
    """The platform's own validation (shared/serving/servicer.py:validate_request) bounds it, for both doors."""
    from tierline.client import InvalidArgument

    with InferenceClient(api_key=stack.api_key, endpoint=stack.router_address) as c:
        with pytest.raises(InvalidArgument) as err:
            c.infer(PROMPT, {"temperature": 2.5, "max_tokens": 4})
        assert err.value.message.startswith("parameters.temperature: "), err.value.message
        assert c.infer(PROMPT, {"temperature": 2, "max_tokens": 4, "seed": 1}).choices[0].finish_reason


def test_the_lowest_temperature_documented_is_served_through_both_doors(stack):
    """0.01, the documented least temperature, was refused (400 naming temperature): the wire's float32 carries it as
    0.0099999998, below the bound as a double. Noticed by the helper that bounded temperature above."""
    assert api(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.01,
                                         seed=1).choices[0].finish_reason
    with InferenceClient(api_key=stack.api_key, endpoint=stack.router_address) as c:
        assert c.infer(PROMPT, {"temperature": 0.01, "max_tokens": 4, "seed": 1}).choices[0].finish_reason


@pytest.mark.parametrize("chat, stream, max_tokens", [(False, False, 4), (True, False, 4), (False, True, 4),
                                                      (True, False, None)])
def test_a_prompt_longer_than_the_context_is_the_prompts_fault_whatever_max_tokens(stack, chat, stream, max_tokens):
    """Found by a fault hunt: a prompt longer than the context with a small max_tokens was a 400 naming max_tokens,
    "reduce the prompt or max_tokens to at most 0". It is the prompt's (chat: `messages`), with OpenAI's code
    `context_length_exceeded`; a max_tokens too large for a prompt that fits is still max_tokens' (the test above)."""
    client = api(stack)
    long = "1+" * 300 + "1=?"
    extra = {} if max_tokens is None else {"max_tokens": max_tokens}
    with pytest.raises(openai.BadRequestError) as err:
        if chat:
            client.chat.completions.create(model=MODEL, stream=stream, messages=[{"role": "user", "content": long}],
                                           **extra)
        else:
            client.completions.create(model=MODEL, prompt=f"Q:{long}\nA:", stream=stream, **extra)
    error = err.value.body
    assert (error["param"], error["code"]) == ("messages" if chat else "prompt", "context_length_exceeded"), error
    assert error["message"].startswith(error["param"] + ": ") and "maximum context length is 256 tokens" in \
        error["message"] and "max_tokens to at most" not in error["message"], error


def test_an_unknown_model_is_quoted_short_in_its_404(stack):
    """Found by a fault hunt: the 404 quoted the name whole (a 900 KB name, a 900 KB answer)."""
    client = api(stack)
    for ask in (lambda: client.completions.create(model="m" * 100_000, prompt=PROMPT, max_tokens=4),
                lambda: client.models.retrieve("m" * 7000)):
        with pytest.raises(openai.NotFoundError) as err:
            ask()
        assert err.value.body["code"] == "model_not_found" and len(err.value.response.content) < 1000, \
            len(err.value.response.content)
        assert '"mmm' in err.value.body["message"] and "..." in err.value.body["message"]


def test_an_unknown_parameter_is_named_short(stack):
    """Found with the 404 above: an unsupported parameter's 400 named it whole (a 100 KB key, a 200 KB answer)."""
    client = api(stack)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"k" * 100_000: 1})
    assert len(err.value.response.content) < 1000, len(err.value.response.content)
    assert err.value.body["param"].startswith("kkk") and err.value.body["message"].endswith("unsupported parameter")


def test_a_model_can_be_retrieved_by_id_and_health_answers(stack):
    import urllib.request

    client = api(stack)
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["param"] == "model"
    with urllib.request.urlopen(stack.http_base_url.removesuffix("/v1") + "/health", timeout=30) as r:
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}


def test_max_tokens_is_bounded_by_the_context_less_the_prompt_not_a_fixed_cap(stack):
    """Issue 26: max_tokens was capped at a fixed 128 although the model's context is 256."""
    client = api(stack)
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0.3, seed=1)
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.usage.completion_tokens <= 200
    prompt_tokens = resp.usage.prompt_tokens
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+3=?"}],
                                        max_tokens=256 - prompt_tokens, temperature=0.3)  # exactly fills it
    assert ok.usage.prompt_tokens + ok.usage.completion_tokens <= 256
    for max_tokens in (256 - prompt_tokens + 1, 256, 10**6):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens)
        assert err.value.body["param"] == "max_tokens"
        assert "maximum context length is 256 tokens" in err.value.body["message"], err.value.body
    long = "Q:" + "1+" * 100 + "1=?\nA:"  # no max_tokens: the default, less where the prompt leaves less room
    resp = client.completions.create(model=MODEL, prompt=long, temperature=0)
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens <= 256


def test_n_samples_n_choices_unary_and_streamed(stack):
    client = api(stack)
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, n=3, temperature=1.5, seed=4)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.text for c in resp.choices}) > 1  # sampled apart (seeds 4, 5, 6)
    singles = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.5, seed=4 + i)
               for i in range(3)]
    assert [c.text for c in resp.choices] == [s.choices[0].text for s in singles]
    assert resp.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert resp.usage.prompt_tokens == singles[0].usage.prompt_tokens
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+3=?"}], n=2,
                                          max_tokens=8)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == grpc_answer(stack, 8)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+3=?"}],
                                                 n=2, max_tokens=12, temperature=1.5, seed=4, stream=True,
                                                 stream_options={"include_usage": True}))
    texts, roles, reasons = {0: "", 1: ""}, {0: 0, 1: 0}, {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            roles[ch.index] += ch.delta.role == "assistant"
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+3=?"}], n=2,
                                           max_tokens=12, temperature=1.5, seed=4)
    assert texts == {c.index: c.message.content for c in again.choices}
    assert roles == {0: 1, 1: 1} and set(reasons) == {0, 1}
    assert chunks[-1].usage.completion_tokens == again.usage.completion_tokens
    for n in (0, 9):  # the manifest's limits.max_n is 8
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=n)
        assert err.value.body["param"] == "n", err.value.body


def engine_logprobs(tiny_family, prompt: str, max_tokens: int, top: int):
    from tierline.build.engines import load_engine
    from tierline_shared.runtime.engine import GenerationParams

    engine = load_engine(tiny_family, "edge", threads=1)
    return engine.generate(prompt, GenerationParams(max_tokens=max_tokens, logprobs=True, top_logprobs=top))


def test_logprobs_come_back_in_openais_shapes(stack, tiny_family):
    client = api(stack)
    ref = engine_logprobs(tiny_family, PROMPT, 10, 2)  # the edge tier's model, here in the test
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, logprobs=2)
    lp = resp.choices[0].logprobs
    assert "".join(lp.tokens) == resp.choices[0].text == ref.text
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert [max(top.values()) for top in lp.top_logprobs] == pytest.approx([t.top[0][1] for t in ref.logprobs],
                                                                          abs=1e-5)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10).choices[0].logprobs is None
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+3=?"}],
                                          max_tokens=10, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content == ref.text
    assert [t.logprob for t in content] == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-5)
    assert all(bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 2 for t in content)
    stream = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, logprobs=0, stream=True))
    last = [c for c in stream if c.choices and c.choices[0].finish_reason]
    assert len(last) == 1 and "".join(last[0].choices[0].logprobs.tokens) == ref.text
    assert last[0].choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-5)
    for body, param in (({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, **body)
        assert err.value.body["param"] == param, err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+3=?"}], max_tokens=4,
                                       logprobs=True, top_logprobs=21)
    assert err.value.body["param"] == "top_logprobs"


class ScriptedRouter:
    """What OpenAIServer asks of a router (no keys: a gate without a store), its streams scripted by the test:
    the HTTP layer alone, on a real aiohttp server, with failures no live platform produces on cue."""

    model_name = MODEL

    def __init__(self, script):
        from tierline_router.auth import Gate

        self.gate, self.script, self.closed = Gate(None, {}), script, 0

    async def refuse(self, key, exc):
        raise exc

    async def stream(self, req, key):
        try:
            async for chunk in self.script():
                yield chunk
        finally:
            self.closed += 1  # closed (by the HTTP layer or at GC)


def with_http_api(router, client):
    """`client(base_url)`, run in a thread, against an OpenAIServer around `router`; returns what it returns."""
    import asyncio

    from tierline_router.openai_http import OpenAIServer

    async def run():
        server = OpenAIServer(router)
        port = await server.start("127.0.0.1", 0)
        try:
            return await asyncio.to_thread(client, f"http://127.0.0.1:{port}/v1")
        finally:
            await server.stop()

    return asyncio.run(run())


def _text(text: str, finish_reason: str = ""):
    from tierline_api.v1 import inference_pb2 as pb

    return pb.InferResponse(tier="edge", choices=[pb.Choice(text=text, finish_reason=finish_reason)])


@pytest.mark.parametrize("failure", ["tier", "bug", "cut short"])
def test_a_stream_that_fails_midway_ends_with_an_openai_error_event(failure):
    """A stream whose answer has started can only report a failure in-band: OpenAI's error body (all four keys) as
    an event, then [DONE]. A bug mid-stream used to write a whole HTTP 500 answer into the chunked body (the client
    saw a protocol error), a stream that stopped without its last chunk ended as if complete, and the event lacked
    `param`."""
    import httpx

    from tierline_shared.transport.messaging import TierError

    async def script():
        yield _text("8")
        yield _text(";")
        if failure == "tier":
            raise TierError("edge", "UNAVAILABLE", "edge stopped mid-stream")
        if failure == "bug":
            raise RuntimeError("a bug")

    def client(base_url):
        got, texts = None, []
        try:
            for chunk in openai.OpenAI(api_key="k", base_url=base_url, max_retries=0, timeout=30).completions.create(
                    model=MODEL, prompt=PROMPT, stream=True):
                texts.append(chunk.choices[0].text)
        except openai.APIError as exc:
            got = exc
        raw = httpx.post(f"{base_url}/completions", json={"model": MODEL, "prompt": PROMPT, "stream": True},
                         timeout=30).text
        return got, texts, raw

    router = ScriptedRouter(script)
    err, texts, raw = with_http_api(router, client)
    assert texts == ["8", ";"] and err is not None, (texts, err)  # the client raises, not a quiet end
    assert set(err.body) == {"message", "type", "param", "code"}, err.body
    assert err.body["code"] == {"tier": "unavailable", "bug": "internal", "cut short": "unavailable"}[failure]
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2].removeprefix("data: "))["error"] == err.body
    assert router.closed == 2


def test_a_client_gone_before_the_first_chunk_is_not_an_error(caplog):
    """A client that hangs up while its stream waits for its first chunk: the stream is closed (the tier told to
    stop) and nothing is logged as a bug; the response's headers used to be written outside the stream's own
    handling of a client gone, so this was logged as an unexpected error and the tier's stream left to the GC."""
    import logging
    import socket
    import time

    async def script():
        import asyncio

        await asyncio.sleep(0.5)  # the tier's first chunk, after the client has gone
        yield _text("8")
        yield _text(";", "length")

    def client(base_url):
        host, port = base_url.removeprefix("http://").removesuffix("/v1").split(":")
        body = json.dumps({"model": MODEL, "prompt": PROMPT, "stream": True}).encode()
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n" % len(body) + body)
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while not router.closed and time.monotonic() < deadline:
            time.sleep(0.05)

    router = ScriptedRouter(script)
    with caplog.at_level(logging.ERROR, logger="tierline.router.http"):
        with_http_api(router, client)
    assert router.closed == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_odd_but_valid_openai_requests_and_refusals_that_name_the_field(stack):
    """What OpenAI's API does with a `developer` message (its newer models' system message), an empty model name,
    a conversation holding tool calls, a method a route does not take, and `include_usage` chunks."""
    import urllib.error
    import urllib.request

    client = api(stack)
    user = {"role": "user", "content": "2+3=?"}
    dev = client.chat.completions.create(model=MODEL, max_tokens=8,
                                         messages=[{"role": "developer", "content": "be brief"}, user])
    assert dev.choices[0].message.content == grpc_answer(stack, 8)  # a system turn: the family's template drops it
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="", prompt=PROMPT, max_tokens=4)
    assert err.value.body["param"] == "model", err.value.body
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(openai.BadRequestError) as err:  # tools are refused; so is a conversation that used them
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2", "tool_calls": [call]}, user])
    assert err.value.body["param"] == "messages.1.tool_calls", err.value.body
    assert client.chat.completions.create(model=MODEL, max_tokens=4, messages=[  # empty or null: as absent
        {"role": "assistant", "content": "2", "tool_calls": [], "function_call": None}, user]).choices
    req = urllib.request.Request(f"{stack.http_base_url}/chat/completions", method="GET")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 405 and err.value.headers["allow"] == "POST", dict(err.value.headers)
    assert json.loads(err.value.read())["error"]["code"] == "method_not_allowed"
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True,
                                                      stream_options={"include_usage": True})
    events = [json.loads(e.removeprefix("data: ")) for e in raw.http_response.read().decode().split("\n\n")
              if e.startswith("data: {")]
    assert [e["usage"] is None for e in events] == [True] * (len(events) - 1) + [False], events


def test_usage_reports_the_prompt_tokens_the_prefix_cache_held(stack):
    """The tiers count the prompt tokens their prefix cache served (Usage.cached_tokens); the HTTP answer, whose
    docs promised OpenAI's usage.prompt_tokens_details.cached_tokens, dropped them."""
    client = api(stack)
    shared = "Q:1+1=?\nA:2\nQ:2+2=?\nA:4\nQ:3+3=?\nA:6\nQ:4+4=?\nA:8\n"  # well over prefix_cache_min_match tokens
    first = client.completions.create(model=MODEL, prompt=shared + "Q:1+5=?\nA:", max_tokens=2)
    again = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[  # the same prefix, as turns
        {"role": "user", "content": f"{a}+{a}=?"} if i % 2 == 0 else {"role": "assistant", "content": str(2 * a)}
        for a in (1, 2, 3, 4) for i in (0, 1)] + [{"role": "user", "content": "2+5=?"}])
    assert first.usage.prompt_tokens == again.usage.prompt_tokens
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < again.usage.prompt_tokens, again.usage
    chunks = list(client.completions.create(model=MODEL, prompt=shared + "Q:3+5=?\nA:", max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16, chunks[-1].usage


def _post_raw(base_url: str, data: bytes, **headers) -> tuple[int, str, dict | str]:
    """POST `data` to /v1/completions with http.client, headers as given: (status, content type, the JSON body, or
    the text when it is not JSON)."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=data, headers={"content-type": "application/json", **headers})
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
    finally:
        conn.close()
    try:
        return resp.status, resp.headers["content-type"], json.loads(text)
    except ValueError:
        return resp.status, resp.headers["content-type"], text


def _completion_body(**fields) -> bytes:
    return json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **fields}).encode()


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "foo", "gzip, br"])
def test_a_body_in_a_content_encoding_not_served_is_openais_415_naming_it(stack, coding):
    """Content-Encoding br or zstd (which aiohttp decodes only with optional packages) was answered by aiohttp's
    parser as a plain-text 400 the openai client could not read; a coding it does not know (`foo`) was ignored and
    the body read as if plain."""
    status, ctype, out = _post_raw(stack.http_base_url, _completion_body(), **{
        "content-encoding": coding, "authorization": f"Bearer {stack.api_key}"})
    assert (status, ctype.split(";")[0]) == (415, "application/json"), (status, out)
    error = out["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_content_encoding", error
    assert error["message"].startswith("content-encoding: ") and coding.split(", ")[-1] in error["message"], error


def test_openai_client_sees_415_and_413_as_status_errors_with_the_message_and_a_bad_key_first(stack):
    """The official client raises its APIStatusError with OpenAI's error body for both (no retry: neither is
    transient), and a bad key is still a 401 before the body is judged."""
    client = api(stack)
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_headers={"content-encoding": "br"})
    assert err.value.status_code == 415 and err.value.body["code"] == "unsupported_content_encoding", err.value.body
    assert "content-encoding: \"br\"" in err.value.message, err.value.message
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=MODEL, prompt="x" * (1 << 20), max_tokens=4)
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large", err.value.body
    assert "1048576 bytes" in err.value.message, err.value.message
    with pytest.raises(openai.AuthenticationError):
        api(stack, "tl_00000000_unknown").completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                                             extra_headers={"content-encoding": "br"})


def test_compressed_bodies_are_decoded_within_the_size_limit_and_their_faults_named(stack):
    """gzip (and x-gzip, its old name), deflate with or without zlib's header and a list of codings are decoded; a
    body that decompresses past the limit is a 413 naming it (it was aiohttp's bare "Request Entity Too Large"), a
    truncated one a 400 naming content-encoding."""
    import gzip
    import zlib

    body, auth = _completion_body(), {"authorization": f"Bearer {stack.api_key}"}
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = raw_deflate.compress(body) + raw_deflate.flush()
    expected = grpc_answer(stack, 4)
    for coding, data in [("gzip", gzip.compress(body)), ("x-gzip", gzip.compress(body)),
                         ("deflate", zlib.compress(body)), ("deflate", raw_deflate),
                         ("deflate, gzip", gzip.compress(zlib.compress(body))), ("identity", body)]:
        status, _, out = _post_raw(stack.http_base_url, data, **{"content-encoding": coding, **auth})
        assert status == 200 and out["choices"][0]["text"] == expected, (coding, status, out)
    bomb = gzip.compress(b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    status, _, out = _post_raw(stack.http_base_url, bomb, **{"content-encoding": "gzip", **auth})
    assert status == 413 and "decompressed" in out["error"]["message"], (status, out)
    assert "1048576 bytes" in out["error"]["message"], out
    status, _, out = _post_raw(stack.http_base_url, gzip.compress(body)[:-12], **{"content-encoding": "gzip", **auth})
    assert status == 400 and out["error"]["message"].startswith("content-encoding: "), (status, out)


def test_a_client_gone_midway_through_its_body_is_not_an_error(caplog):
    """A client that sends part of its body (chunked, or short of its content-length) and hangs up: nobody to
    answer, nothing to log; it used to be logged as an unexpected error (a bug) and answered with a 500."""
    import logging
    import socket
    import time

    async def script():
        yield _text("8", "stop")

    def client(base_url):
        host, port = base_url.removeprefix("http://").removesuffix("/v1").split(":")
        head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        for framing, part in ((b"transfer-encoding: chunked\r\n\r\n", b"5\r\n{\"mod"),
                              (b"content-length: 100\r\n\r\n", b"{\"mod")):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(head + framing + part)
                time.sleep(0.2)  # the handler is reading the body
        time.sleep(0.3)

    with caplog.at_level(logging.ERROR):
        with_http_api(ScriptedRouter(script), client)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_stacked_codings_are_bounded_and_every_content_encoding_line_counts(stack):
    """Each coding is decoded in turn on the router's event loop: a body stacked in many (1,300 layers fit under
    1 MiB and held the loop about half a second, before any key check) is a 415 past MAX_CODINGS. A coding given on
    a second Content-Encoding line is decoded too (only the first line was read: the body was refused as not JSON)."""
    import gzip
    import http.client
    from urllib.parse import urlsplit

    from tierline_router.openai_http import MAX_CODINGS

    body, auth = _completion_body(), {"authorization": f"Bearer {stack.api_key}"}
    layered = body
    for _ in range(MAX_CODINGS + 1):
        layered = gzip.compress(layered)
    status, _, out = _post_raw(stack.http_base_url, layered,
                               **{"content-encoding": ", ".join(["gzip"] * (MAX_CODINGS + 1)), **auth})
    assert status == 415 and out["error"]["code"] == "unsupported_content_encoding", (status, out)
    url = urlsplit(stack.http_base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        twice = gzip.compress(gzip.compress(body))
        conn.putrequest("POST", "/v1/completions")
        for name, value in [("content-type", "application/json"), ("authorization", auth["authorization"]),
                            ("content-encoding", "gzip"), ("content-encoding", "gzip"),
                            ("content-length", str(len(twice)))]:
            conn.putheader(name, value)
        conn.endheaders(twice)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200 and answer["choices"][0]["text"] == grpc_answer(stack, 4), answer


def test_a_prompt_that_carries_its_bos_is_read_with_one(stack):
    """`add_special_tokens: false` (what the router sends for a chat prompt whose template's special tokens the
    tiers' tokenizer would not reproduce; docs/ARCHITECTURE.md) travels from the router through NATS to the tier
    and its engine core: a prompt that starts with the BOS's text is read with that one BOS, as the same prompt
    without it is read by default (the same answer, the same prompt tokens), not with two."""
    import grpc

    from tierline_api.v1 import inference_pb2 as pb
    from tierline_api.v1 import inference_pb2_grpc as pb_grpc

    router = pb_grpc.InferenceServiceStub(grpc.insecure_channel(stack.router_address))
    auth = (("authorization", f"Bearer {stack.api_key}"),)

    def ask(prompt: str, **specials) -> pb.InferResponse:
        return router.Infer(pb.InferRequest(prompt=prompt, parameters=pb.Parameters(max_tokens=8), **specials),
                            timeout=60, metadata=auth)

    plain, carried, doubled = ask(PROMPT), ask("<bos>" + PROMPT, add_special_tokens=False), ask("<bos>" + PROMPT)
    assert carried.choices[0].text == plain.choices[0].text
    assert carried.usage.prompt_tokens == plain.usage.prompt_tokens == doubled.usage.prompt_tokens - 1


def test_a_client_that_hangs_up_cancels_its_request_as_over_grpc(stack):
    """Found by a fault hunt: an OpenAI request whose client closed the connection ran to its end in the tier,
    counted as answered and was charged to its key (1 call, 43 tokens), where a gRPC call its client cancelled
    leaves the batch, counts as cancelled and costs nothing. Now both doors treat a client gone alike: aiohttp
    cancels the handler (handler_cancellation), as grpc.aio does. The edge's engine core is held (SIGSTOP) so that
    both requests are still in the tier when their clients leave.

    What each costs its key: its call, no tokens (a second fault hunt: a key that hung up just before each answer
    cost nothing at all, neither a call nor a token, while its tiers did the work, so a quota bounded none of it);
    a stream whose client leaves before its first chunk, the same."""
    import os
    import signal
    import socket
    import time

    import grpc
    import psutil

    from tests.conftest import scrape
    from tests.test_auth import usage
    from tierline_api.v1 import inference_pb2 as pb
    from tierline_api.v1 import inference_pb2_grpc as pb_grpc

    edge = next(p for p in stack.procs if p.name == "edge-0")
    core = max(psutil.Process(edge.popen.pid).children(recursive=True), key=lambda c: c.memory_info().rss)
    host, port = stack.http_base_url.split("//")[1].split("/")[0].split(":")
    router = pb_grpc.InferenceServiceStub(grpc.insecure_channel(stack.router_address))
    cancelled = {"outcome": "cancelled"}
    before = (scrape(stack, "router").value("tierline_router_requests_total", **cancelled),
              scrape(stack, "edge-0").value("tierline_requests_total", **cancelled))
    asked_edge = scrape(stack, "router").value("tierline_router_tier_requests_total", tier="edge")
    (http_id, http_key), (grpc_id, grpc_key) = new_key(stack, "pro"), new_key(stack, "pro")
    stream_id, stream_key = new_key(stack, "pro")
    body = json.dumps({"model": MODEL, "prompt": "Q:4+3=?\nA:", "max_tokens": 32}).encode()
    core.suspend()
    try:
        conn = socket.create_connection((host, int(port)), timeout=10)
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {http_key}\r\nContent-Length: {len(body)}\r\n\r\n")
        conn.sendall(head.encode() + body)
        call = router.Infer.future(pb.InferRequest(prompt="Q:4+3=?\nA:", parameters=pb.Parameters(max_tokens=32)),
                                   metadata=(("authorization", f"Bearer {grpc_key}"),), timeout=60)
        stream = router.InferStream(pb.InferRequest(prompt="Q:4+3=?\nA:", parameters=pb.Parameters(max_tokens=32)),
                                    metadata=(("authorization", f"Bearer {stream_key}"),), timeout=60)
        time.sleep(1.0)  # all three are in the tier, waiting on its engine core
        conn.close()
        call.cancel()
        stream.cancel()
        time.sleep(1.0)
    finally:
        os.kill(core.pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the router and the edge count them once they are settled
        after = (scrape(stack, "router").value("tierline_router_requests_total", **cancelled),
                 scrape(stack, "edge-0").value("tierline_requests_total", **cancelled))
        if after[0] - before[0] >= 3 and after[1] - before[1] >= 3:
            break
        time.sleep(0.2)
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3), (before, after)
    # all asked the edge, though none waited for its answer (a fault hunt: such asks were not counted)
    assert scrape(stack, "router").value("tierline_router_tier_requests_total", tier="edge") - asked_edge == 3
    spent = [(u["calls_today"], u["tokens_today"]) for u in (usage(stack, k) for k in (http_id, grpc_id, stream_id))]
    assert spent == [(1, 0)] * 3, spent  # the HTTP client's key is charged what the gRPC clients' are


def test_a_request_the_stopping_router_cuts_short_costs_its_key_nothing(tiny_family):
    """A request whose client leaves before its answer costs its key the call (above); one the router itself cuts
    short as it stops (past its grace) is the platform's doing, and costs nothing. The edge's engine core is held
    (SIGSTOP) so that the request is still in the tier when the router stops."""
    import os
    import signal
    import time

    import grpc
    import psutil

    from tests.test_auth import usage
    from tierline_api.v1 import inference_pb2 as pb
    from tierline_api.v1 import inference_pb2_grpc as pb_grpc

    with Stack(tiny_family, tiers=("edge",), auth=True,
               overrides={"router.confidence_threshold": {"edge": 0.0}}) as s:
        key_id, key = new_key(s, "pro")
        edge = next(p for p in s.procs if p.name == "edge-0")
        core = max(psutil.Process(edge.popen.pid).children(recursive=True), key=lambda c: c.memory_info().rss)
        channel = grpc.insecure_channel(s.router_address)
        core.suspend()
        try:
            call = pb_grpc.InferenceServiceStub(channel).Infer.future(
                pb.InferRequest(prompt="Q:4+3=?\nA:", parameters=pb.Parameters(max_tokens=32)),
                metadata=(("authorization", f"Bearer {key}"),), timeout=60)
            time.sleep(1.0)  # in the tier, waiting on its engine core
            s.kill("router", signal.SIGTERM)  # its grace passes with the request still there
            with pytest.raises(grpc.RpcError):
                call.result(timeout=30)
        finally:
            os.kill(core.pid, signal.SIGCONT)
            channel.close()
        spent = usage(s, key_id)
        assert (spent["calls_today"], spent["tokens_today"]) == (0, 0), spent
