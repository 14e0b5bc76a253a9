"""A tier's servicer in process, from protobuf messages: no network needed."""

import threading
import time

import pytest

from tests.conftest import random_torch_engine
from tierline_api.v1 import inference_pb2 as pb
from tierline_shared.runtime.engine import GenerationParams
from tierline_shared.runtime.scheduler import DeadlineExceeded
from tierline_shared.serving.metrics import Metrics
from tierline_shared.serving.servicer import TierServicer

PROMPT = "Q:a=3;b=a+4;b=?\nA:"


@pytest.fixture(scope="module")
def servicer():
    s = TierServicer(random_torch_engine(seed=3, tier="edge"))
    yield s
    s.scheduler.close()


def _request(max_tokens: int) -> pb.InferRequest:
    return pb.InferRequest(prompt=PROMPT, parameters=pb.Parameters(max_tokens=max_tokens))


def test_a_client_that_stops_reading_a_stream_does_not_hold_up_the_tier(servicer):
    chunks = servicer.stream(_request(20))
    first = next(chunks)
    assert first.choices[0].text and not first.choices[0].finish_reason  # decoding is under way
    done = threading.Event()
    threading.Thread(target=lambda: (servicer.handle(_request(5), 30.0), done.set()), daemon=True).start()
    # the stream's reader is paused right here; another request must still be answered
    assert done.wait(20), "a request waited for a stream whose client was not reading"
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason
    text = first.choices[0].text + "".join(r.choices[0].text for r in rest)
    assert text == servicer.engine.generate(PROMPT, GenerationParams(max_tokens=20)).text
    assert rest[-1].usage.completion_tokens == 20 or rest[-1].choices[0].finish_reason == "stop"


def test_a_stream_stops_generating_when_the_client_goes_away(servicer):
    active = [True]
    chunks = servicer.stream(_request(40), is_active=lambda: active[0])
    next(chunks)
    active[0] = False
    assert list(chunks) == []  # nothing more is sent, not even the final message
    # and the engine is free again for the next request
    assert servicer.handle(_request(3), 30.0).choices[0].text is not None


class SlowEngine(type(random_torch_engine(seed=3, tier="edge"))):
    """The real torch engine, each forward held 5 ms longer: a 40-token answer outlasts a 50 ms deadline."""

    def _forward(self, *args):
        time.sleep(0.005)
        return super()._forward(*args)


def _outcomes(metrics: Metrics) -> dict:
    """tierline_requests_total by (outcome, code), the non-zero ones."""
    return {(s.labels["outcome"], s.labels["code"]): s.value for s in metrics.requests.collect()[0].samples
            if s.name.endswith("_total") and s.value}


def test_every_request_is_counted_once_with_the_status_its_caller_got():
    """A deadline the tier's wait ran out on is DEADLINE_EXCEEDED (what the caller got), not a cancel; a client
    that goes away is a cancel, a stream's too when it left after the answer was ready but before it was sent."""
    base = random_torch_engine(seed=3, tier="edge")
    metrics = Metrics("edge", "tierline-test")
    servicer = TierServicer(SlowEngine(base.model, base.tokenizer, base.info), metrics=metrics)
    try:
        long = pb.InferRequest(prompt=PROMPT, parameters=pb.Parameters(max_tokens=40, stop=["never"]))
        with pytest.raises(DeadlineExceeded):
            servicer.handle(long, timeout_s=0.05)
        with pytest.raises(DeadlineExceeded, match="cancelled"):  # its client goes away while it runs
            servicer.handle(long, timeout_s=30, on_abandon=lambda cancel: threading.Timer(0.05, cancel).start())
        chunks = servicer.stream(_request(4))
        next(chunks)
        while not servicer.scheduler.depth == servicer.scheduler.running == 0:  # the answer is ready...
            time.sleep(0.01)
        time.sleep(0.1)
        chunks.close()  # ...and its client leaves before the rest is read
        deadline = time.monotonic() + 30
        while sum(_outcomes(metrics).values()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a second count of any would come now
        assert _outcomes(metrics) == {("error", "DEADLINE_EXCEEDED"): 1, ("cancelled", "CANCELLED"): 2}
    finally:
        servicer.scheduler.close()


def test_a_model_update_keeps_the_old_models_answers_out_of_the_new_ones_cache():
    """A device's model update (`swap_engine`) while requests are queued on the old model: they are answered by
    the old model and say so (its version), and the new model's result cache never holds their answers: the next
    identical request gets the new model's own answer (found by a fault hunt: it got the old one, cached=True,
    labelled as the new model)."""
    import dataclasses

    from tierline_device_agent.agent import DeviceAgentServicer
    from tierline_shared.config.manifest import BatchConfig

    old = random_torch_engine(seed=3, tier="device")
    new = random_torch_engine(seed=4, tier="device")
    new.info = dataclasses.replace(new.info, version="1")
    greedy = GenerationParams(max_tokens=12)
    assert old.generate(PROMPT, greedy).text != new.generate(PROMPT, greedy).text  # the test can tell them apart
    s = DeviceAgentServicer(old, BatchConfig(max_num_seqs=1), policy=None, upstream_timeout_s=5.0)
    try:
        # one running row at a time: these keep the old model busy, so the request below is still queued on it
        busy = [s.begin(pb.InferRequest(prompt=PROMPT, parameters=pb.Parameters(max_tokens=40, temperature=1.0,
                                                                                seed=i)), 30.0) for i in range(3)]
        queued = s.begin(_request(12), 30.0)
        assert not queued.done()
        s.swap_engine(new)
        before = queued.result(30)
        assert (before.choices[0].text, before.model_version) == (old.generate(PROMPT, greedy).text, "0")
        after = s.begin(_request(12), 30.0).result(30)
        assert not after.cached
        assert (after.choices[0].text, after.model_version) == (new.generate(PROMPT, greedy).text, "1")
        assert all(b.result(30).model_version == "0" for b in busy)
    finally:
        s.scheduler.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_queued_after_a_model_update_retired_the_old_model_is_served_by_the_new_one(stream):
    """Found by a review: a request that had read the model (validated, checked still current) and was queued
    just after an update replaced it went to the old model's scheduler, which retired once idle plus a 1 s grace:
    queued after that, it failed ("scheduler is closed", INTERNAL), and queued within the grace but running past
    it, it failed when the old scheduler closed. An old model's scheduler now takes no new request once replaced
    (`Scheduler.retire`), and the request is queued on the new model. The update is made to land inside the old
    scheduler's submit, with a stall there longer than the old grace."""
    import dataclasses

    from tierline_device_agent.agent import DeviceAgentServicer

    old = random_torch_engine(seed=3, tier="device")
    new = random_torch_engine(seed=4, tier="device")
    new.info = dataclasses.replace(new.info, version="1")
    s = DeviceAgentServicer(old, policy=None, upstream_timeout_s=5.0)
    old_scheduler = s.scheduler
    submit = old_scheduler.submit

    def submit_as_the_update_lands(*args, **kwargs):
        s.swap_engine(new)
        time.sleep(1.5)  # the old scheduler, idle, retires meanwhile
        return submit(*args, **kwargs)

    old_scheduler.submit = submit_as_the_update_lands
    try:
        if stream:
            *chunks, last = list(s.stream(_request(6), timeout_s=30.0))
            text = "".join(c.choices[0].text for c in chunks)
        else:
            last = s.begin(_request(6), 30.0).result(30)
            text = last.choices[0].text
        assert last.model_version == "1"
        assert text == new.generate(PROMPT, GenerationParams(max_tokens=6)).text
    finally:
        s.scheduler.close()


def test_a_request_validated_while_a_model_update_lands_is_queued_on_the_new_model(monkeypatch):
    """Found by a review: a request read the model, was validated, and was queued on that model's scheduler even
    when an update had replaced it meanwhile; the old scheduler retires once idle, so a stall there could meet a
    closed scheduler (INTERNAL). Now it is validated again against the new model and queued on it. The update is
    made to land exactly there (inside validation)."""
    import dataclasses

    from tierline_device_agent.agent import DeviceAgentServicer
    from tierline_shared.serving import servicer as serving

    old = random_torch_engine(seed=3, tier="device")
    new = random_torch_engine(seed=4, tier="device")
    new.info = dataclasses.replace(new.info, version="1")
    s = DeviceAgentServicer(old, policy=None, upstream_timeout_s=5.0)
    real = serving.validate

    def validate_while_updating(req, engine, *args):
        out = real(req, engine, *args)
        if engine is old:
            s.swap_engine(new)  # the update lands after this request read the model, before it is queued
        return out

    monkeypatch.setattr(serving, "validate", validate_while_updating)
    try:
        answer = s.begin(_request(6), 30.0).result(30)
        assert answer.model_version == "1"
        assert answer.choices[0].text == new.generate(PROMPT, GenerationParams(max_tokens=6)).text
    finally:
        s.scheduler.close()
