"""The dynamic batcher: requests decoded together, priorities, bounded queue, deadlines."""

import threading
import time

import pytest

from tierline_shared.runtime.batching import BatchConfig, Batcher, DeadlineExceeded, QueueFull
from tierline_shared.runtime.engine import GenerationParams, GenerationResult


class RecordingEngine:
    """Stands in for a model: records each batch, can be held to build a queue."""

    supports_batch_prefill = True

    def __init__(self):
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def generate_batch(self, prompts, params, cancelled=None):
        self.gate.wait(10)
        self.batches.append(list(prompts))
        self.cancelled = cancelled
        return [GenerationResult(p.upper(), "stop", 1, 1, 1.0, 0.0, 0.0, 0.0) for p in prompts]


def test_concurrent_requests_share_a_batch():
    eng = RecordingEngine()
    b = Batcher(eng, BatchConfig(max_batch_size=8, max_queue_delay_ms=200))
    futs = [b.submit(f"p{i}", GenerationParams()).future for i in range(5)]
    outs = [f.result(timeout=5) for f in futs]
    assert [o.result.text for o in outs] == [f"P{i}" for i in range(5)]
    assert eng.batches == [[f"p{i}" for i in range(5)]]
    assert all(o.batch_size == 5 for o in outs)
    b.close()


def test_high_priority_goes_first_and_the_queue_is_bounded():
    eng = RecordingEngine()
    eng.gate.clear()
    b = Batcher(eng, BatchConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue=3))
    first = b.submit("busy", GenerationParams()).future
    time.sleep(0.2)  # the worker holds "busy"; the next ones queue
    low = b.submit("low", GenerationParams(), priority=1).future
    high = b.submit("high", GenerationParams(), priority=3).future
    normal = b.submit("normal", GenerationParams(), priority=2).future
    with pytest.raises(QueueFull):
        b.submit("one too many", GenerationParams())
    eng.gate.set()
    for f in (first, low, high, normal):
        f.result(timeout=5)
    assert [batch[0] for batch in eng.batches] == ["busy", "high", "normal", "low"]
    b.close()


def test_expired_request_is_not_run():
    eng = RecordingEngine()
    eng.gate.clear()
    b = Batcher(eng, BatchConfig(max_batch_size=1, max_queue_delay_ms=0))
    b.submit("busy", GenerationParams())
    time.sleep(0.1)
    late = b.submit("late", GenerationParams(), timeout_s=0.05).future
    time.sleep(0.2)
    eng.gate.set()
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=5)
    assert ["late"] not in eng.batches
    b.close()


def test_config_validates():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchConfig(max_batch_size=0)


def test_abandoned_request_is_stopped_mid_batch():
    eng = RecordingEngine()
    eng.gate.clear()
    b = Batcher(eng, BatchConfig(max_batch_size=2, max_queue_delay_ms=100))
    keep, drop = b.submit("keep", GenerationParams()), b.submit("drop", GenerationParams())
    time.sleep(0.3)  # both are in the running batch now
    drop.cancel()
    eng.gate.set()
    keep.future.result(timeout=5)
    # the engine is told, row by row, which requests to stop decoding
    assert [c() for c in eng.cancelled] == [False, True]
    b.close()


def test_a_row_that_breaks_the_engine_fails_alone():
    """Issue 21: one request that raises inside the engine must not fail the batch it shares (a real engine)."""
    from tests.conftest import random_torch_engine

    engine = random_torch_engine(seed=5)  # context 64 tokens
    b = Batcher(engine, BatchConfig(max_batch_size=8, max_queue_delay_ms=200))
    good = [b.submit(f"Q:{i}+1=?\nA:", GenerationParams(max_tokens=4)) for i in range(6)]
    bad = b.submit("Q:1+1=?\nA:", GenerationParams(max_tokens=200))  # past the model's context: the engine refuses
    outs = [t.future.result(timeout=30) for t in good]
    assert all(o.result.completion_tokens > 0 for o in outs)
    with pytest.raises(Exception, match="exceeds the model's context"):
        bad.future.result(timeout=30)
    b.close()
