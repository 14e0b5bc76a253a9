"""Prefix KV-cache reuse: greedy outputs identical with and without it, bounded, counted, exported."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import scrape
from tests.test_platform import TIMEOUT, req, stub
from tierline.build.engines import load_engine
from tierline_infra.supervisor import Stack
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.runtime.engine import GenerationParams, PrefixCache
from tierline_shared.tasks.problems import generate

MAX_TOKENS = 24  # completion tokens per request
MIN_MATCH = 4  # shortest reused prefix in these tests (the manifest's default is 16)


def dialogue_prompts(engine, n_dialogues: int = 6) -> list[str]:
    """Three-turn dialogues on the test problems, as `make bench` builds them: turn k repeats turns 1..k-1."""
    problems = generate("test", 3 * n_dialogues, seed=11)
    g = GenerationParams(max_tokens=MAX_TOKENS)
    prompts = []
    for d in range(0, len(problems), 3):
        history = ""
        for p in problems[d:d + 3]:
            prompt = (history + "\n" if history else "") + p.prompt
            if len(engine.tokenizer.encode(prompt)) + MAX_TOKENS > engine.info.max_context:
                break
            prompts.append(prompt)
            history = prompt + engine.generate(prompt, g).text
    return prompts


@pytest.fixture(scope="module", params=["cloud", "edge"])
def engines(request, tiny_family, one_torch_thread):
    """(plain engine, the same model with a prefix cache) for the torch and the int8 ONNX tier."""
    plain = load_engine(tiny_family, request.param, threads=1)
    reuse = load_engine(tiny_family, request.param, threads=1)
    assert reuse.enable_prefix_cache(100_000, MIN_MATCH)
    return plain, reuse


def ids(engine, prompts, params=None):
    params = params or [GenerationParams(max_tokens=MAX_TOKENS)] * len(prompts)
    return [r.token_ids for r in engine.generate_batch(prompts, params)]


def test_dialogues_reuse_the_prefix_and_decode_identically(engines):
    plain, reuse = engines
    reuse.prefix_cache.clear()
    prompts = dialogue_prompts(plain)
    assert len(prompts) >= 12
    before = reuse.prefix_cache.hits
    for p in prompts:
        assert reuse.generate(p, GenerationParams(max_tokens=MAX_TOKENS)).token_ids == ids(plain, [p])[0], p
    # every later turn starts with the turn before it: at least that turn's prompt tokens were reused
    tokens = reuse.tokenizer.encode
    assert reuse.prefix_cache.hits - before >= sum(
        len(tokens(a)) for a, b in zip(prompts, prompts[1:]) if b.startswith(a))


def _host(a) -> np.ndarray:
    """A numpy copy of a KV array (numpy, or a torch tensor on the CPU)."""
    return (a.numpy() if hasattr(a, "numpy") else a).copy()


def test_a_stored_answer_is_not_overwritten_by_the_row_that_takes_its_slot(engines):
    """A finished answer's KV goes to the prefix cache; a new sequence then takes its slot in the running batch,
    written in place. The cache must hold a copy: a view of the widest row (the whole row is contiguous) was
    overwritten by the newcomer, and the next prompt that hit it decoded from another prompt's KV."""
    plain, reuse = engines
    reuse.prefix_cache.clear()
    problems = [p.prompt for p in generate("test", 12, seed=23)]
    widest = "\n".join(problems[:4])  # the widest row: its KV spans the whole batch width
    others = problems[4:7]
    with reuse._lock:
        runner = reuse.runner()
        first = [runner.sequence(widest, GenerationParams(max_tokens=2))]  # finishes at the first decode
        first += [runner.sequence(p, GenerationParams(max_tokens=MAX_TOKENS)) for p in others]
        runner.step([(s, runner.chunk_limit(s)) for s in first], keep_slots=True)
        assert first[0].reason == "length" and not any(s.done for s in first[1:])  # it decoded, then finished
        assert runner._rows[0] is first[0]  # its slot stays (3 of 4 rows still run)
        stored = [(_host(k), _host(v)) for k, v in reuse.prefix_cache.lookup(first[0].ids + first[0].gen)[1]]
        newcomer = runner.sequence(problems[8], GenerationParams(max_tokens=MAX_TOKENS))
        runner.step([(newcomer, runner.chunk_limit(newcomer))], keep_slots=True)
        assert runner._rows[0] is newcomer  # written into the finished row's slot
        after = reuse.prefix_cache.lookup(first[0].ids + first[0].gen)[1]
        assert all(np.array_equal(a, _host(b)) for (a, b) in zip(
            [x for kv in stored for x in kv], [x for kv in after for x in kv]))  # the stored answer is intact
        again = runner.sequence(widest, GenerationParams(max_tokens=MAX_TOKENS))
        assert again.cached == len(again.ids) - 1  # it hits the stored answer: all but its last token
        for _ in runner.run([again]):
            pass
    assert again.result().token_ids == ids(plain, [widest])[0]


def test_exact_repeat_and_shorter_prompt_hit_all_but_the_last_token(engines):
    plain, reuse = engines
    reuse.prefix_cache.clear()
    long = dialogue_prompts(plain, 1)[-1]
    g = GenerationParams(max_tokens=MAX_TOKENS)
    # a miss, an exact repeat, a prompt shorter than the cached one (a prefix of it)
    for i, prompt in enumerate((long, long, long[: len(long) // 2])):
        q, h = reuse.prefix_cache.queries, reuse.prefix_cache.hits
        assert reuse.generate(prompt, g).token_ids == ids(plain, [prompt])[0]
        n = len(reuse.tokenizer.encode(prompt))
        assert reuse.prefix_cache.queries - q == n
        assert reuse.prefix_cache.hits - h == (0 if i == 0 else n - 1)


def test_batch_with_different_hit_lengths_decodes_identically(engines):
    plain, reuse = engines
    reuse.prefix_cache.clear()
    turns = dialogue_prompts(plain, 2)
    reuse.generate(turns[0], GenerationParams(max_tokens=MAX_TOKENS))  # cache one first turn
    fresh = generate("test", 1, seed=99)[0].prompt
    batch = [turns[1], turns[0], turns[0][:MIN_MATCH + 3], fresh, turns[1] + " again", turns[-1]]
    params = [GenerationParams(max_tokens=MAX_TOKENS - 8 * (i % 2)) for i in range(len(batch))]
    h = reuse.prefix_cache.hits
    assert ids(reuse, batch, params) == ids(plain, batch, params)
    assert reuse.prefix_cache.hits - h > len(turns[0])  # several rows hit, with different lengths
    # the batch's own prompts are now cached: the same batch again hits nearly everything
    h, q = reuse.prefix_cache.hits, reuse.prefix_cache.queries
    assert ids(reuse, batch, params) == ids(plain, batch, params)
    assert reuse.prefix_cache.hits - h == reuse.prefix_cache.queries - q - len(batch)


def test_sliding_window_stays_exact(engines):
    plain, reuse = engines
    reuse.prefix_cache.clear()
    prompt = dialogue_prompts(plain, 1)[-1]
    n = len(reuse.tokenizer.encode(prompt))
    reuse.generate(prompt, GenerationParams(max_tokens=4))
    # a window narrower than the prompt: no reuse at all (its KV differs from a full-attention prefill)
    narrow = GenerationParams(max_tokens=MAX_TOKENS, attention_window=n // 2)
    q = reuse.prefix_cache.queries
    assert ids(reuse, [prompt], [narrow]) == ids(plain, [prompt], [narrow])
    assert reuse.prefix_cache.queries == q
    # a window the prompt fits in: reused, and the decode steps past the window trim exactly as without it
    fits = GenerationParams(max_tokens=MAX_TOKENS, attention_window=n + 2)
    h = reuse.prefix_cache.hits
    assert ids(reuse, [prompt], [fits]) == ids(plain, [prompt], [fits])
    assert reuse.prefix_cache.hits - h == n - 1


def test_cache_is_bounded_in_tokens_lru_first():
    cache = PrefixCache(max_tokens=20, min_match=3)
    kv = lambda n: [(np.zeros((1, 1, n, 2)), np.zeros((1, 1, n, 2)))]  # noqa: E731
    a, b, c = [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 9, 9, 9, 9], [5, 5, 5, 5, 5, 5, 5, 5]
    cache.store(a, kv(8))
    cache.store(b, kv(8))
    assert cache.lookup(a + [0])[0] == 8  # touches a: b is now the least recently used
    cache.store(c, kv(8))  # 24 tokens > 20: b goes
    assert (len(cache), cache.tokens) == (2, 16)
    assert cache.lookup(b + [0]) == (0, None)
    assert cache.lookup([1, 2, 3, 0])[0] == 3  # a shared prefix of a stored prompt
    assert cache.lookup([1, 2, 0])[0] == 0  # shorter than min_match
    cache.store(a + [6, 6], kv(10))  # replaces a, which it covers
    cache.store(a[:5], kv(5))  # covered by a stored prompt: not stored again
    assert (len(cache), cache.tokens) == (2, 18)
    cache.store(list(range(30)), kv(30))  # larger than the whole cache: never stored
    assert cache.tokens == 18
    assert (cache.queries, cache.hits) == (9 + 9 + 4 + 3, 8 + 3)


def test_litert_engine_opts_out(tiny_family):
    device = load_engine(tiny_family, "device", threads=1)
    assert not device.enable_prefix_cache(4096)
    assert device.prefix_cache is None


def test_tiers_export_the_prefix_cache_counters(tiny_family):
    """vLLM's names, in tokens; the device (LiteRT) exports them at 0; size 0 in the manifest turns it off."""
    with Stack(tiny_family, tiers=("device", "edge", "cloud"), router=False,
               overrides={"tiers.cloud.prefix_cache_tokens": 0, "tiers.edge.cache_size": 0}) as stack:
        turn1 = "Q:What is 12+30 and then 4*5?\nA:"
        cached = {}
        for name in ("edge-0", "cloud-0"):
            for prompt in (turn1, turn1 + "42\nQ:and 3+4?\nA:"):
                cached[name] = stub(stack.port(name)).Infer(req(prompt), timeout=TIMEOUT).usage.cached_tokens
        # the next turn of a dialogue reuses the prompt and the answer, as the answer's usage says
        first = stub(stack.port("edge-0")).Infer(req("Q:7*8=?\nA:", max_tokens=6), timeout=TIMEOUT)
        follow = "Q:7*8=?\nA:" + first.choices[0].text + "\nQ:and 1+1?\nA:"
        second = stub(stack.port("edge-0")).Infer(req(follow), timeout=TIMEOUT)
        counters, scrapes = {}, {}
        for name in ("device-0", "edge-0", "cloud-0"):
            tier = name.split("-")[0]
            scrapes[tier] = scrape(stack, name)
            counters[tier] = [scrapes[tier].value(f"tierline_prefix_cache_{what}_total", tier=tier)
                              for what in ("queries", "hits")]
    tok = TextTokenizer.load(tiny_family / "tokenizer.json")
    n1, n2 = len(tok.encode(turn1)), len(tok.encode(turn1 + "42\nQ:and 3+4?\nA:"))
    assert cached["edge-0"] >= n1  # turn 2 reused all of turn 1 (and whatever of its answer the prompt repeats)
    n3, n4 = len(tok.encode("Q:7*8=?\nA:")), len(tok.encode(follow))
    # every answer's cached_tokens, and the tier's own counters, agree
    assert counters["edge"] == [n1 + n2 + n3 + n4, cached["edge-0"] + second.usage.cached_tokens]
    assert cached["cloud-0"] == 0
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens >= n3 + first.usage.completion_tokens - 1  # the prompt and the answer
    assert counters["cloud"] == [0.0, 0.0]  # prefix_cache_tokens: 0
    assert counters["device"] == [0.0, 0.0]
    # the scheduler's series, as vLLM names them: running and waiting gauges, inter-token latency, occupancy per step
    edge = scrapes["edge"]
    assert {"tierline_num_requests_running", "tierline_num_requests_waiting"} <= edge.names()
    assert edge.value("tierline_num_requests_running", tier="edge") == 0
    assert edge.value("tierline_num_requests_waiting", tier="edge") == 0
    assert edge.value("tierline_inter_token_latency_seconds_count", tier="edge") > 0
    assert edge.value("tierline_batch_size_count", tier="edge") > 0  # one observation per step
    assert edge.value("tierline_iteration_tokens_sum", tier="edge") >= n2  # turn 1's prompt, turn 2's suffix, decodes
