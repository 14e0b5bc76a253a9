"""A tier's servicer in process, from protobuf messages: no network needed."""

import threading

import pytest

from tests.conftest import random_torch_engine
from tierline_api.v1 import inference_pb2 as pb
from tierline_shared.runtime.engine import GenerationParams
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
