"""The engine core in its own process (shared/runtime/engine_core.py), on the committed edge model: the same
answers as the scheduler in-process, streams, cancellation, a full queue, its metrics, a model that cannot
load, and a core that dies under load."""

import functools
import os
import signal
import time
from concurrent.futures import CancelledError

import grpc
import pytest

from tests.conftest import COMMITTED_MODELS
from tierline_edge_node.engine import load_engine
from tierline_shared.config.manifest import BatchConfig
from tierline_shared.models.artifacts import ArtifactError
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.runtime.engine import GenerationParams
from tierline_shared.runtime.engine_core import EngineCore, EngineCoreDied
from tierline_shared.runtime.scheduler import END, QueueFull
from tierline_shared.serving.servicer import status_of
from tierline_shared.tasks.problems import generate

TIMEOUT = 60  # seconds, for any one future here
LOAD = functools.partial(load_engine, COMMITTED_MODELS, "edge", threads=1)
LONG = 150  # completion tokens of a long request


@pytest.fixture(scope="module")
def engine():
    return LOAD()


@pytest.fixture(scope="module")
def long_params(engine) -> GenerationParams:
    """A sampled request that runs its whole max_tokens on this model (its seed found here, not assumed)."""
    for seed in range(50):
        p = GenerationParams(max_tokens=LONG, temperature=10.0, seed=seed)  # near uniform: eos is rare
        if engine.generate("Q:1+1=?\nA:", p).completion_tokens == LONG:
            return p
    pytest.fail("no seed in 50 made a request of the whole max_tokens")


class _EncodesOutsideTheCore(TextTokenizer):
    """The edge model's tokenizer, except that it will not encode in the process it was made in (the core)."""

    def encode(self, text: str, bos: bool = True) -> list[int]:
        assert os.getpid() != self.home, f"the engine core encoded {text!r}"
        return super().encode(text, bos)


def _load_encoding_nothing():
    engine = LOAD()
    engine.tokenizer.__class__, engine.tokenizer.home = _EncodesOutsideTheCore, os.getpid()
    return engine


def _core(**batch) -> EngineCore:
    return EngineCore(LOAD, BatchConfig(**batch), prefix_cache=(4096, 16))


def _wait(cond, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_the_core_answers_what_the_engine_answers_in_process(engine):
    prompts = [p.prompt for p in generate("test", 24, seed=3)]
    params = GenerationParams(max_tokens=40)
    core = _core()
    try:
        assert core.engine.info == engine.info and core.pid != os.getpid()
        assert core.engine.check(prompts[0], params) == engine.check(prompts[0], params)
        tickets = [core.submit(p, params) for p in prompts]  # one running batch in the core
        stream = core.submit(prompts[0], params, stream=True)
        chunks = []
        while (c := stream.chunks.get(timeout=TIMEOUT)) is not END:
            chunks.append(c)
        got = [t.future.result(TIMEOUT).result for t in tickets]
        alone = [engine.generate(p, params) for p in prompts]
        assert [r.token_ids for r in got] == [r.token_ids for r in alone]
        assert [r.text for r in got] == [r.text for r in alone]
        assert "".join(chunks) == alone[0].text == stream.future.result(TIMEOUT).result.text
    finally:
        core.close()


def test_the_core_takes_each_prompts_tokens_from_the_tier_process(engine):
    """The tier process encoded the prompt to validate it: the core's scheduler thread, which the model's steps
    wait on, gets its tokens with it and encodes nothing (here its tokenizer refuses to), answering the same."""
    prompts = [p.prompt for p in generate("test", 8, seed=4)]
    params = GenerationParams(max_tokens=24)
    core = EngineCore(_load_encoding_nothing, BatchConfig(), prefix_cache=(4096, 16))
    try:
        tickets = [core.submit(p, params) for p in prompts]
        got = [t.future.result(timeout=TIMEOUT).result.text for t in tickets]
    finally:
        core.close()
    assert got == [engine.generate(p, params).text for p in prompts]


def test_a_prompt_the_tier_process_cannot_encode_leaves_nothing_pending():
    """The tokens the core gets come from the tier process's tokenizer; a prompt it fails to encode is refused
    before anything is held for it (a ticket left pending would keep the core `busy` until it restarts)."""
    core = _core()
    try:
        tokenizer = core.engine.tokenizer
        core.engine.tokenizer = type("Broken", (), {"encode": staticmethod(lambda text, bos=True: 1 / 0)})()
        with pytest.raises(ZeroDivisionError):
            core.submit("Q:1+1=?\nA:", GenerationParams(max_tokens=4))
        core.engine.tokenizer = tokenizer
        assert not core.busy
        assert core.submit("Q:1+1=?\nA:", GenerationParams(max_tokens=4)).future.result(timeout=TIMEOUT)
    finally:
        core.close()


def test_the_core_reports_its_steps_and_prefix_lookups():
    core = _core()
    steps, lookups = [], []
    core.on_step, core.on_prefix_lookup = steps.append, lambda q, h: lookups.append((q, h))
    try:
        prompt = "Q:12+30=?\nA:" * 3  # over the 16-token minimum match: stored, then found
        for _ in range(2):
            core.submit(prompt, GenerationParams(max_tokens=8)).future.result(TIMEOUT)
        _wait(lambda: len(lookups) == 2 and steps and steps[-1].running == 0)
        assert lookups[1][1] > 0  # the second one hit the first one's KV
        assert sum(s.first_tokens for s in steps) == 2 and core.depth == 0 and not core.busy
    finally:
        core.close()


def test_a_cancelled_request_stops_in_the_core(long_params):
    core = _core(max_num_seqs=1)  # what comes next waits for the long one to leave
    steps = []
    core.on_step = steps.append
    try:
        long = core.submit("Q:1+1=?\nA:", long_params, stream=True)
        long.chunks.get(timeout=TIMEOUT)  # it runs
        long.cancel()
        with pytest.raises(CancelledError):
            long.future.result(TIMEOUT)
        assert long.chunks.get(timeout=TIMEOUT) is END or END in list(long.chunks.queue)
        after = core.submit("Q:2+2=?\nA:", GenerationParams(max_tokens=8)).future.result(TIMEOUT)
        _wait(lambda: steps and steps[-1].running == 0)
        # the long request decoded far fewer than its LONG tokens before the next one ran
        assert sum(s.tokens for s in steps) < LONG
        assert after.result.completion_tokens > 0 and not core.busy
    finally:
        core.close()


def test_a_full_queue_is_refused_as_in_process(long_params):
    core = _core(max_num_seqs=1, max_queue=2)
    try:
        tickets = [core.submit("Q:1+1=?\nA:", long_params) for _ in range(8)]
        outcomes = []
        for t in tickets:
            try:
                t.future.result(TIMEOUT)
                outcomes.append("ok")
            except QueueFull as exc:
                outcomes.append("full")
                assert status_of(exc)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in outcomes and outcomes.count("ok") >= 1
    finally:
        core.close()


def test_errors_cross_the_pipe_whole():
    from tierline_shared.runtime.engine import EngineError
    from tierline_shared.runtime.engine_core import _portable

    exc = _portable(EngineError("too long", "parameters.max_tokens"))
    assert type(exc) is EngineError and exc.field == "parameters.max_tokens" and str(exc) == "too long"
    assert type(_portable(QueueFull("full"))) is QueueFull


def test_a_model_that_cannot_load_raises_in_the_tier_process(tmp_path):
    with pytest.raises(ArtifactError, match="manifest not found"):
        EngineCore(functools.partial(load_engine, tmp_path, "edge", threads=1))


def test_a_core_that_dies_fails_what_it_held_unavailable_and_starts_again(long_params):
    core = _core(max_num_seqs=1)
    try:
        tickets = [core.submit("Q:1+1=?\nA:", long_params) for _ in range(16)]  # seconds of work, one at a time
        old = core.pid
        os.kill(old, signal.SIGKILL)
        died = 0
        for t in tickets:  # every one is answered or fails: none hangs
            try:
                t.future.result(TIMEOUT)
            except EngineCoreDied as exc:
                died += 1
                assert status_of(exc)[0] == grpc.StatusCode.UNAVAILABLE
        assert died >= 8
        _wait(lambda: core.pid != old and core._conn is not None)
        out = core.submit("Q:2+2=?\nA:", GenerationParams(max_tokens=8)).future.result(TIMEOUT)
        assert out.result.completion_tokens > 0
    finally:
        core.close()
    assert not core.busy


def test_a_hung_core_is_killed_after_its_iteration_timeout_and_starts_again():
    """Found by a fault hunt (suspected, then reproduced here): a core alive but finishing no step (SIGSTOP: a
    deadlock, a device that stopped answering) held its requests for good, while its tier process went on saying
    they were being worked on. Past iteration_timeout_s without a step while it holds requests, it is killed: what
    it held fails UNAVAILABLE, and it starts again."""
    core = EngineCore(LOAD, BatchConfig(iteration_timeout_s=2.0), prefix_cache=(4096, 16))
    try:
        core.submit("Q:1+1=?\nA:", GenerationParams(max_tokens=4)).future.result(TIMEOUT)  # idle since: no kill
        time.sleep(3.0)
        assert core.submit("Q:1+2=?\nA:", GenerationParams(max_tokens=4)).future.result(TIMEOUT)
        old = core.pid
        os.kill(old, signal.SIGSTOP)
        t0 = time.monotonic()
        ticket = core.submit("Q:2+2=?\nA:", GenerationParams(max_tokens=8))
        with pytest.raises(EngineCoreDied, match="no step in 2 s") as err:
            ticket.future.result(TIMEOUT)
        assert 2.0 <= time.monotonic() - t0 < 2.0 + 3.0, time.monotonic() - t0
        assert status_of(err.value)[0] == grpc.StatusCode.UNAVAILABLE
        _wait(lambda: core.pid != old and core._conn is not None)
        out = core.submit("Q:2+2=?\nA:", GenerationParams(max_tokens=8)).future.result(TIMEOUT)
        assert out.result.completion_tokens > 0
    finally:
        core.close()
