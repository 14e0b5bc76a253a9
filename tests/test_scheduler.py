"""The iteration-level scheduler on real engines: joins and leaves at every step, priorities, bounded
queue, deadlines, cancellation, rows that fail alone, and exactness against each request decoded alone."""

import random
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from tests.conftest import COMMITTED_MODELS, random_torch_engine
from tierline_shared.config.manifest import BatchConfig
from tierline_shared.runtime.engine import GenerationParams
from tierline_shared.runtime.scheduler import END, DeadlineExceeded, QueueFull, Scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMEOUT = 60  # seconds, for any one future in these tests


@pytest.fixture(scope="module")
def engine():
    return random_torch_engine(seed=5)  # context 64 tokens


class SlowEngine(type(random_torch_engine(seed=5))):
    """The real torch engine, each forward held `delay` seconds longer: a long request that stays long on
    any machine."""

    delay = 0.01

    def _forward(self, *args):
        time.sleep(self.delay)
        return super()._forward(*args)


@pytest.fixture(scope="module")
def slow():
    base = random_torch_engine(seed=5)
    return SlowEngine(base.model, base.tokenizer, base.info)


LONG = GenerationParams(max_tokens=45, stop=("never",))  # with the prompt, within the context of 64


class Steps:
    """Records every step's statistics (the scheduler's metrics hook)."""

    def __init__(self):
        self.stats = []

    def __call__(self, stats):
        self.stats.append(stats)


def test_requests_share_steps_and_answer_as_alone(engine):
    steps = Steps()
    s = Scheduler(engine, BatchConfig(max_num_seqs=8), on_step=steps)
    prompts = [f"Q:{i}+{i}=?\nA:" for i in range(6)]
    g = GenerationParams(max_tokens=10)
    tickets = [s.submit(p, g) for p in prompts]
    outs = [t.future.result(timeout=TIMEOUT) for t in tickets]
    assert [o.result.token_ids for o in outs] == [engine.generate(p, g).token_ids for p in prompts]
    assert max(st.seqs for st in steps.stats) >= 2  # steps computed several sequences together
    s.close()


class CountingEngine(type(random_torch_engine(seed=5))):
    """The real torch engine, counting the real (unmasked) query tokens of every forward."""

    def __init__(self, *args):
        super().__init__(*args)
        self.computed = 0

    def _forward(self, input_ids, attention_mask, position_ids, past):
        self.computed += int((np.asarray(attention_mask)[:, -input_ids.shape[1]:] == 1).sum())
        return super()._forward(input_ids, attention_mask, position_ids, past)


def test_step_statistics_count_every_token_computed_and_every_gap_between_tokens():
    """A sequence whose prompt completes in a step also decodes in it: its token counts in the step's tokens and
    sequences, and the time from its first token to its second is an inter-token latency."""
    base = random_torch_engine(seed=5)
    engine = CountingEngine(base.model, base.tokenizer, base.info)
    steps = Steps()
    s = Scheduler(engine, BatchConfig(max_num_seqs=4), on_step=steps)
    g = GenerationParams(max_tokens=5, stop=("never",))
    with engine._lock:  # admitted together, in one step
        tickets = [s.submit(f"Q:{i}+{i}=?\nA:", g) for i in range(3)]
    results = [t.future.result(timeout=TIMEOUT).result for t in tickets]
    s.close()
    assert sum(st.tokens for st in steps.stats) == engine.computed
    assert steps.stats[0].seqs == 3 and steps.stats[0].tokens == sum(r.prompt_tokens + 1 for r in results)
    assert sum(len(st.inter_token_s) for st in steps.stats) == sum(r.completion_tokens - 1 for r in results)


def test_a_request_joins_the_running_batch_at_the_next_step(slow):
    """The old batcher ran a batch to completion: a short request arriving during a long one waited for it."""
    s = Scheduler(slow, BatchConfig(max_num_seqs=4))
    long = s.submit("Q:1+1=?\nA:", LONG, stream=True)
    assert isinstance(long.chunks.get(timeout=TIMEOUT), str)  # the long one is decoding
    short = s.submit("Q:2+2=?\nA:", GenerationParams(max_tokens=2)).future
    short.result(timeout=TIMEOUT)
    assert not long.future.done(), "the short request waited for the long one to finish"
    assert long.future.result(timeout=TIMEOUT).result.completion_tokens >= 1
    s.close()


def test_priorities_decide_admission_and_the_queue_is_bounded(slow):
    s = Scheduler(slow, BatchConfig(max_num_seqs=1, max_queue=3))
    busy = s.submit("Q:1+1=?\nA:", LONG, stream=True)
    assert isinstance(busy.chunks.get(timeout=TIMEOUT), str)  # admitted: the next ones wait in the queue
    order = []
    tickets = {name: s.submit("Q:2+2=?\nA:", GenerationParams(max_tokens=2), priority=prio)
               for name, prio in (("low", 1), ("high", 3), ("normal", 2))}
    for name, t in tickets.items():
        t.future.add_done_callback(lambda _, n=name: order.append(n))
    with pytest.raises(QueueFull):
        s.submit("one too many", GenerationParams())
    for t in tickets.values():
        t.future.result(timeout=TIMEOUT)
    assert order == ["high", "normal", "low"]
    s.close()


def test_expired_request_is_not_run_and_a_deadline_stops_a_running_one(slow):
    s = Scheduler(slow, BatchConfig(max_num_seqs=1))
    busy = s.submit("Q:1+1=?\nA:", LONG, timeout_s=0.2, stream=True)
    # queued at once behind it, so its deadline passes long before busy's: sent after busy's first chunk, a test
    # thread that woke late (a loaded machine) gave it a deadline after busy's, and it ran once busy was cut
    late = s.submit("Q:3+3=?\nA:", GenerationParams(max_tokens=5), timeout_s=0.05)
    assert isinstance(busy.chunks.get(timeout=TIMEOUT), str)
    with pytest.raises(DeadlineExceeded, match="while queued"):
        late.future.result(timeout=TIMEOUT)
    with pytest.raises(DeadlineExceeded, match="during generation"):
        busy.future.result(timeout=TIMEOUT)
    s.close()


def test_queued_requests_given_up_on_leave_the_queue_while_the_batch_stays_full(slow):
    """Cancelled or past their deadline, waiting requests leave at the next step, not when a slot frees: they
    hold no place in a full queue, a deadline fails on time, a cancelled stream gets its END."""
    s = Scheduler(slow, BatchConfig(max_num_seqs=1, max_queue=3))
    busy = s.submit("Q:1+1=?\nA:", LONG, stream=True)
    assert isinstance(busy.chunks.get(timeout=TIMEOUT), str)  # the only slot is taken for the whole test
    queued = [s.submit("Q:2+2=?\nA:", GenerationParams(max_tokens=2), stream=i == 0) for i in range(3)]
    for t in queued:
        t.cancel()
    assert s.submit("Q:3+3=?\nA:", GenerationParams(max_tokens=2)).future  # a place: no QueueFull
    assert queued[0].chunks.get(timeout=TIMEOUT) is END
    late = s.submit("Q:4+4=?\nA:", GenerationParams(max_tokens=2), timeout_s=0.05)
    with pytest.raises(DeadlineExceeded, match="while queued"):
        late.future.result(timeout=2)  # failed at the next step; the busy request runs on past it
    assert not busy.future.done()
    busy.cancel()
    s.close()


def test_a_cancelled_stream_leaves_the_batch_at_once(slow):
    steps = Steps()
    s = Scheduler(slow, BatchConfig(max_num_seqs=4), on_step=steps)
    t = s.submit("Q:1+1=?\nA:", LONG, stream=True)
    assert isinstance(t.chunks.get(timeout=TIMEOUT), str)
    t.cancel()
    deadline = time.monotonic() + TIMEOUT
    # the sequence leaves at the start of a step and that step is recorded at its end: wait for both
    while (s.running or steps.stats[-1].running) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.running == 0 and not s.busy
    assert steps.stats[-1].running == 0
    decoded = sum(len(st.inter_token_s) for st in steps.stats)
    assert decoded < LONG.max_tokens // 2, "the cancelled sequence kept decoding"
    s.close()


class PoisonEngine(type(random_torch_engine(seed=5))):
    """The real torch engine, except that its backend raises on one token: a row that breaks the model."""

    poison = None

    def _forward(self, input_ids, attention_mask, position_ids, past):
        if self.poison is not None and (np.asarray(input_ids) == self.poison).any():
            raise RuntimeError("the backend failed on this row")
        return super()._forward(input_ids, attention_mask, position_ids, past)


def test_a_row_that_breaks_the_engine_fails_alone():
    base = random_torch_engine(seed=5)
    eng = PoisonEngine(base.model, base.tokenizer, base.info)
    eng.poison = eng.tokenizer.encode("%", bos=False)[0]
    s = Scheduler(eng, BatchConfig(max_num_seqs=8))
    g = GenerationParams(max_tokens=6)
    good = [f"Q:{i}+1=?\nA:" for i in range(5)]
    tickets = [s.submit(p, g) for p in good[:3]]
    bad_prefill = s.submit("Q:5%2=?\nA:", g)  # fails in its prefill, among others' prefills
    tickets += [s.submit(p, g) for p in good[3:]]
    too_long = s.submit("Q:1+1=?\nA:", GenerationParams(max_tokens=200))  # past the context: refused alone
    outs = [t.future.result(timeout=TIMEOUT).result.token_ids for t in tickets]
    eng.poison = None
    assert outs == [eng.generate(p, g).token_ids for p in good]
    with pytest.raises(RuntimeError, match="failed on this row"):
        bad_prefill.future.result(timeout=TIMEOUT)
    with pytest.raises(Exception, match="maximum context length is"):
        too_long.future.result(timeout=TIMEOUT)
    # a failure in a decode step: the step is run again row by row, only the row at fault fails
    eng.poison = eng.tokenizer.encode("7", bos=False)[0]
    rows = [s.submit(f"Q:{i}*3=?\nA:", GenerationParams(max_tokens=4)) for i in range(4)]
    results = []
    for t in rows:
        try:
            results.append(t.future.result(timeout=TIMEOUT).result)
        except RuntimeError as exc:
            results.append(exc)
    eng.poison = None
    for i, r in enumerate(results):
        alone = eng.generate(f"Q:{i}*3=?\nA:", GenerationParams(max_tokens=4))
        if isinstance(r, Exception):  # a row fails only because a poisoned token went through it
            assert "7" in f"Q:{i}*3=?\nA:" + alone.text
        else:
            assert r.token_ids == alone.token_ids
    s.close()


def test_a_request_that_cannot_be_admitted_fails_alone():
    """A request whose admission raises what no limit check expects (here its prompt's encoding: a tokenizer bug)
    fails with that error, and the requests around it are answered as alone. It was out of the queue and not yet
    running: the step's failure failed every running row and lost it (no answer, ever)."""
    base = random_torch_engine(seed=5)
    tok, plain = base.tokenizer, type(base.tokenizer)
    bad = "Q:2%2=?\nA:"

    class Breaks(plain):
        def encode(self, text: str, bos: bool = True) -> list[int]:
            if text == bad:
                raise UnicodeError("the tokenizer broke on this prompt")
            return super().encode(text, bos)

    s = Scheduler(base, BatchConfig(max_num_seqs=8))
    g = GenerationParams(max_tokens=24)
    good = [f"Q:{i}+1=?\nA:" for i in range(4)]
    tok.__class__ = Breaks
    try:
        tickets = [s.submit(p, g) for p in good[:2]]
        broken = s.submit(bad, g)
        tickets += [s.submit(p, g) for p in good[2:]]
        with pytest.raises(UnicodeError, match="broke on this prompt"):
            broken.future.result(timeout=TIMEOUT)
        outs = [t.future.result(timeout=TIMEOUT).result.token_ids for t in tickets]
    finally:
        tok.__class__ = plain
        s.close()
    assert outs == [base.generate(p, g).token_ids for p in good]


class NanEngine(type(random_torch_engine(seed=5))):
    """The real torch engine, whose logits are NaN for a prompt that holds one token: a model broken on an input
    (prefills only: a decoded row never meets it, whatever it samples)."""

    poison = None

    def _forward(self, input_ids, attention_mask, position_ids, past):
        logits, present = super()._forward(input_ids, attention_mask, position_ids, past)
        if self.poison is not None and input_ids.shape[1] > 1:
            logits[(np.asarray(input_ids) == self.poison).any(axis=1)] = np.nan
        return logits, present


def test_a_row_whose_logits_cannot_be_sampled_fails_alone():
    base = random_torch_engine(seed=5)
    eng = NanEngine(base.model, base.tokenizer, base.info)
    eng.poison = eng.tokenizer.encode("%", bos=False)[0]
    s = Scheduler(eng, BatchConfig(max_num_seqs=8))
    good = [f"Q:{i}+1=?\nA:" for i in range(4)]
    for params in (GenerationParams(max_tokens=6, temperature=0.7, seed=1), GenerationParams(max_tokens=6)):
        eng.poison = eng.tokenizer.encode("%", bos=False)[0]
        with eng._lock:  # all in one step
            tickets = [s.submit(p, params) for p in good]
            bad = s.submit("Q:5%2=?\nA:", params)  # sampled: no distribution; greedy: a NaN argmax
        outs = [t.future.result(timeout=TIMEOUT).result.token_ids for t in tickets]
        with pytest.raises(ValueError, match="not finite"):
            bad.future.result(timeout=TIMEOUT)
        eng.poison = None
        assert outs == [eng.generate(p, params).token_ids for p in good]
    s.close()


def _random_workload(rng: random.Random, n: int, context: int, window_limit: int, max_new: int = 16,
                     prompts: list[str] | None = None) -> list[dict]:
    """Requests with random prompts (many sharing prefixes of different lengths, for the prefix cache; or drawn
    from `prompts`), lengths, windows, priorities, arrival gaps (bursts and trickles) and cancellations."""
    parts = ["Q:a=3;b=a+4;b=?", "\nA:", "Q:12+34=?", "Q:max(3,9,4)=?", "Q:7*8=?", " 5", "x"]
    out = []
    for i in range(n):
        max_tokens = rng.randint(1, max_new)
        prompt = rng.choice(prompts) if prompts else "".join(rng.choice(parts) for _ in range(rng.randint(1, 4)))
        prompt = prompt[-(context - max_tokens - 4):]
        window = min(rng.choice([0, 0, 0, 0, 0, 3, 8, 20]), window_limit)
        out.append({"prompt": prompt, "params": GenerationParams(max_tokens=max_tokens, attention_window=window),
                    "priority": rng.randint(1, 3), "gap": rng.choice([0, 0, 0, 0.001, 0.005]),
                    "cancel": rng.random() < 0.15, "stream": rng.random() < 0.3})
    return out


def _draft(rng: random.Random, engine, answer: list[int]) -> str:
    """A draft of an answer (its token ids), as a lower tier might write it: the whole answer, a prefix, the
    answer and more, one token changed, garbage, or none. Drafts are text: the longest prefix of the answer that
    tokenizes back to itself stands for it (a random model's tokens need not)."""
    tok = engine.tokenizer
    k = len(answer)
    while k and tok.encode(tok.decode(answer[:k]), bos=False) != answer[:k]:
        k -= 1
    true = tok.decode(answer[:k])
    cut = rng.randint(0, len(true))
    return rng.choice([true, true, true[:cut], true + "Q:7*8", true[:cut] + "#" + true[cut + 1:], "x5x5x5", ""])


def _exactness(engine, seed: int, n: int, config: BatchConfig, drafts: bool = False, max_new: int = 16,
               prompts: list[str] | None = None) -> None:
    """Requests in bursts and trickles, each answered as it is decoded alone; with `drafts`, each greedy one
    brings a draft of its answer, and its tokens are still its own."""
    rng = random.Random(seed)
    work = _random_workload(rng, n, engine.info.max_context, engine.info.window_limit, max_new, prompts)
    alone = [engine.generate(w["prompt"], w["params"]).token_ids for w in work]
    if drafts:
        for w, want in zip(work, alone):
            w["params"] = replace(w["params"], draft=_draft(rng, engine, want))
    steps = Steps()
    s = Scheduler(engine, config, on_step=steps)
    tickets = []
    i = 0
    while i < len(work):  # bursts (queued while a step runs, admitted together) and trickles
        burst = work[i:i + rng.choice([1, 1, 2, 5])]
        with engine._lock:  # the scheduler's next step waits: the burst is admitted in one step
            for w in burst:
                tickets.append(s.submit(w["prompt"], w["params"], priority=w["priority"], stream=w["stream"]))
                if w["cancel"]:
                    threading.Timer(rng.choice([0, 0.002, 0.01]), tickets[-1].cancel).start()
        time.sleep(burst[-1]["gap"])
        i += len(burst)
    for w, t, want in zip(work, tickets, alone):
        try:
            got = t.future.result(timeout=TIMEOUT).result
        except Exception:  # noqa: BLE001 - only a cancelled request may end without its answer
            assert w["cancel"]
            continue
        assert got.token_ids == want, (w["prompt"], w["params"])
        if w["stream"]:
            chunks = []
            while (c := t.chunks.get(timeout=TIMEOUT)) is not END:
                chunks.append(c)
            assert "".join(chunks) == got.text
    assert max(st.seqs for st in steps.stats) >= 2
    if drafts:  # drafts were verified, some taken in part or whole, some not
        drafted, taken = sum(st.draft_tokens for st in steps.stats), sum(st.accepted_tokens for st in steps.stats)
        assert 0 < taken < drafted, (taken, drafted)
    s.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_arrival_pattern_decodes_as_alone_torch(engine, seed):
    engine.enable_prefix_cache(4096, min_match=4)  # prompts sharing prefixes: hits of different lengths
    try:
        config = BatchConfig(max_num_seqs=[3, 8, 16][seed], max_num_batched_tokens=[24, 64, 2048][seed])
        _exactness(engine, seed, 40, config)
    finally:
        engine.enable_prefix_cache(0)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_any_arrival_pattern_with_drafts_decodes_as_alone_torch(engine, seed):
    """A request escalated with the lower tier's answer verifies it as a draft: whatever the draft (the whole
    answer, a prefix, more than the answer, a changed token, garbage), its tokens are those it decodes alone
    (with at most 2 running, the draft's rest is proposed again after a disagreement: runner._speculate)."""
    engine.enable_prefix_cache(4096, min_match=4)
    try:
        _exactness(engine, seed, 40, BatchConfig(max_num_seqs=[4, 16, 2][seed - 3],
                                                 max_num_batched_tokens=[24, 2048, 64][seed - 3]), drafts=True)
    finally:
        engine.enable_prefix_cache(0)


def test_any_arrival_pattern_with_drafts_decodes_as_alone_on_the_committed_cloud():
    """The trained cloud's answers to benchmark problems tokenize back to themselves, so drafts are taken far, and
    with at most 2 running their rest is proposed again after a disagreement: any arrival pattern still decodes
    as alone."""
    from tierline.build.engines import load_engine
    from tierline_shared.tasks.problems import generate

    _exactness(load_engine(COMMITTED_MODELS, "cloud", threads=1), 9, 40,
               BatchConfig(max_num_seqs=2, max_num_batched_tokens=64), drafts=True, max_new=48,
               prompts=[p.prompt for p in generate("test", 12, seed=9)])


@pytest.mark.parametrize("window", [0, 18])
def test_token_drafts_with_changes_decode_as_alone_two_rows_at_a_time(window):
    """Drafts as token ids (a random model's tokens need not tokenize back from text): each answer with three
    tokens changed, rows two at a time, so that after each disagreement the draft's rest is proposed again (rows
    of different proposal lengths verified together; with a sliding window, whose mask counts columns, one at a
    time: together, the holes between a shorter row's past and its tokens would move keys out of its window).
    Every row's tokens are those it decodes alone."""
    from tests.conftest import tiny_decoder
    from tierline_cloud_node.engine import TorchEngine
    from tierline_shared.models.tokenizer import TextTokenizer
    from tierline_shared.runtime.engine import EngineInfo

    prompts = ["Q:1", "x 5", "Q:7", "ab", "Q:a=3", "12", "Q:9*9", "zz"]
    params = GenerationParams(max_tokens=24)
    taken = proposed = 0
    for seed in range(3):
        model = tiny_decoder(11 + seed, sliding_window=window,
                             architecture="MistralForCausalLM" if window else "LlamaForCausalLM")
        eng = TorchEngine(model, TextTokenizer.default(), EngineInfo("cloud", "t", "0", 0, 0, 64, window or 64))
        rng = random.Random(seed)
        alone = [eng.generate(p, params).token_ids for p in prompts]
        for i in range(0, len(prompts), 2):
            runner = eng.runner()
            seqs = []
            for p, want in zip(prompts[i:i + 2], alone[i:i + 2]):
                s = runner.sequence(p, params)
                draft = list(want)
                for k in rng.sample(range(len(draft)), min(3, len(draft))):
                    draft[k] = (draft[k] + 1) % eng.tokenizer.vocab_size
                s.draft = draft[:min(params.max_tokens - 1, s.window - len(s.ids))]
                seqs.append(s)
            for _ in runner.run(seqs):
                taken += runner.accepted
                proposed += runner.drafted
            assert [s.result().token_ids for s in seqs] == alone[i:i + 2], (window, seed, i)
    assert 0 < taken < proposed


def test_a_draft_stays_within_the_steps_token_budget_and_one_the_backend_cannot_take_is_dropped():
    """A draft is verified in the forward that completes its prompt, within the step's max_num_batched_tokens (cut
    to what the chunk leaves); a backend that raises on prompt + draft (a shape it cannot take) answers the row
    without it instead of failing it. The tokens are the model's own either way."""
    from tierline.build.engines import load_engine

    cloud = load_engine(COMMITTED_MODELS, "cloud", threads=1)
    prompt, params, budget = "Q:a=3;b=a+4;c=b*2;d=c-1;d=?\nA:", GenerationParams(max_tokens=48), 40
    alone = cloud.generate(prompt, params)
    steps = Steps()
    s = Scheduler(cloud, BatchConfig(max_num_seqs=2, max_num_batched_tokens=budget), on_step=steps)
    got = s.submit(prompt, replace(params, draft=alone.text)).future.result(timeout=TIMEOUT).result
    s.close()
    assert got.token_ids == alone.token_ids
    first = next(st for st in steps.stats if st.draft_tokens)
    assert 0 < first.draft_tokens and first.tokens <= budget + 1  # + the first token's decode, as any prompt's

    class Narrow(type(cloud)):
        """Takes at most 40 positions in one forward."""

        def _forward(self, input_ids, *args):
            if input_ids.shape[1] > 40:
                raise RuntimeError("this backend takes at most 40 positions at once")
            return super()._forward(input_ids, *args)

    narrow = Narrow(cloud.model, cloud.tokenizer, cloud.info)
    s = Scheduler(narrow, BatchConfig(max_num_seqs=2, max_num_batched_tokens=2048))
    got = s.submit(prompt, replace(params, draft=alone.text)).future.result(timeout=TIMEOUT).result
    s.close()
    assert got.token_ids == alone.token_ids


def test_after_a_draft_parts_from_the_answer_its_rest_is_proposed_again_and_the_answer_stays_its_own(monkeypatch):
    """A draft with one token changed: the model parts from it there, and (while the batch is small) the rest of
    the draft is proposed again once the sequence's last tokens appear in it, verified in one forward: more of the
    draft is taken than without, and the tokens are the model's own."""
    from tierline.build.engines import load_engine
    from tierline_shared.runtime import runner

    cloud = load_engine(COMMITTED_MODELS, "cloud", threads=1)
    prompts = ["Q:a=3;b=a+4;c=b*2;d=c-1;d=?\nA:", "Q:12+34-5+7=?\nA:", "Q:max(3,9,4)+min(8,2)=?\nA:"]
    params = GenerationParams(max_tokens=48)
    answers = [cloud.generate(p, params) for p in prompts]

    def taken(speculate: int) -> tuple[list, int]:
        monkeypatch.setattr(runner, "SPECULATE_MAX_BATCH", speculate)
        steps, out = Steps(), []
        s = Scheduler(cloud, BatchConfig(max_num_seqs=1), on_step=steps)
        for p, a in zip(prompts, answers):  # one token of the answer changed, a third of the way in
            cut = len(a.text) // 3
            draft = a.text[:cut] + ("#" if a.text[cut] != "#" else "=") + a.text[cut + 1:]
            out.append(s.submit(p, replace(params, draft=draft)).future.result(timeout=TIMEOUT).result.token_ids)
        s.close()
        return out, sum(st.accepted_tokens for st in steps.stats)

    default = runner.SPECULATE_MAX_BATCH
    once, proposed = taken(0), taken(default)
    assert once[0] == proposed[0] == [a.token_ids for a in answers]
    assert proposed[1] > once[1], (proposed[1], once[1])


@pytest.fixture(scope="module")
def committed_engines():
    from tierline_device_agent.engine import load_engine as load_device
    from tierline_edge_node.engine import load_engine as load_edge

    edge = load_edge(COMMITTED_MODELS, threads=1)
    edge.enable_prefix_cache(4096, min_match=4)
    return {"edge": edge, "device": load_device(COMMITTED_MODELS, threads=1)}


@pytest.mark.parametrize("tier", ["edge", "device"])
def test_any_arrival_pattern_decodes_as_alone_on_the_committed_onnx_and_litert_models(committed_engines, tier):
    """onnxruntime (int8) and LiteRT run under the same scheduler, with the same guarantee."""
    _exactness(committed_engines[tier], 7, 30, BatchConfig(max_num_seqs=8, max_num_batched_tokens=48))


def test_the_edge_verifies_drafts_under_any_arrival_pattern(committed_engines):
    """The int8 onnxruntime edge takes drafts too (the device's answers it escalates), with the same guarantee."""
    _exactness(committed_engines["edge"], 8, 30, BatchConfig(max_num_seqs=8, max_num_batched_tokens=48), drafts=True)


def test_config_validates():
    with pytest.raises(ValueError, match="max_num_seqs"):
        BatchConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        BatchConfig(max_num_seqs=16, max_num_batched_tokens=8)


def test_prefix_hits_of_different_lengths_prefill_together_and_decode_as_alone(engine):
    """The prefix cache inside the step: hit rows prefill only their suffixes, in one forward with each other."""
    steps = Steps()
    engine.enable_prefix_cache(4096, min_match=4)
    try:
        s = Scheduler(engine, BatchConfig(max_num_seqs=8), on_step=steps)
        stem = "Q:a=3;b=a+4;c=b*2;c=?\nA:"
        s.submit(stem, GenerationParams(max_tokens=2)).future.result(timeout=TIMEOUT)  # stored
        prompts = [stem[:10] + "9+9=?", stem[:16] + "1", stem + " 14\nQ:2*7=?\nA:", stem[:20] + "x=?\nA:"]
        g = GenerationParams(max_tokens=8)
        hits = engine.prefix_cache.hits
        with engine._lock:  # queued together: admitted, and prefilled, in one step
            tickets = [s.submit(p, g) for p in prompts]
        outs = [t.future.result(timeout=TIMEOUT).result.token_ids for t in tickets]
        assert engine.prefix_cache.hits - hits >= 4 * len(prompts)
        prefill = [st for st in steps.stats if st.first_tokens == len(prompts)]
        assert prefill and prefill[0].tokens < sum(len(engine.tokenizer.encode(p)) for p in prompts)
        engine.enable_prefix_cache(0)
        assert outs == [engine.generate(p, g).token_ids for p in prompts]
        s.close()
    finally:
        engine.enable_prefix_cache(0)


def test_a_retiring_scheduler_finishes_the_request_it_is_admitting():
    """Found by a review of `Scheduler.retire` (a device's model replaced by an update): a request the scheduler's
    thread had taken off the queue and was still checking (tokenizing a long prompt on a slow board) was in neither
    the queue nor the running batch, so `retire` took the scheduler for idle, closed it, and the request failed
    ("server shutting down"). The thread itself now decides when nothing is left. Its check is slowed to hold it
    there while the retire comes."""
    engine = random_torch_engine(seed=3, tier="device")
    scheduler = Scheduler(engine)
    check, checking = engine.check, threading.Event()

    def slow_check(*args, **kwargs):
        checking.set()
        time.sleep(0.3)
        return check(*args, **kwargs)

    engine.check = slow_check
    ticket = scheduler.submit("Q:2+3=?\nA:", GenerationParams(max_tokens=6), timeout_s=30)
    assert checking.wait(10) and not scheduler.busy  # taken off the queue, not yet running
    retired = threading.Thread(target=scheduler.retire)
    retired.start()
    assert ticket.future.result(30).result.text == engine.generate("Q:2+3=?\nA:", GenerationParams(max_tokens=6)).text
    retired.join(10)
    assert not retired.is_alive()
    with pytest.raises(RuntimeError):  # retired: takes nothing more
        scheduler.submit("Q:1+1=?\nA:", GenerationParams(max_tokens=2))
