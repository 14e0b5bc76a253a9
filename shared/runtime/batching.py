"""Dynamic batching in front of an engine: concurrent requests are decoded together.

One worker thread owns the engine. Requests wait in a bounded priority queue;
the worker takes the highest-priority ones (oldest first within a priority), up to
`max_batch_size`, waiting at most `max_queue_delay_ms` after the first for others
to join. A full queue is refused at once (`QueueFull`), a request whose deadline
has passed before its batch starts is failed (`DeadlineExceeded`) without running.
A batch that raises is decoded again row by row, so one request that breaks the
engine fails alone and the others are answered.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from tierline_shared.config.manifest import BatchConfig
from tierline_shared.runtime.engine import Engine, GenerationParams, GenerationResult


class QueueFull(RuntimeError):
    """The bounded queue is full: the caller should back off (RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed before it could run."""


@dataclass(order=True)
class _Item:
    sort_key: tuple  # (-priority, sequence): heapq pops the highest priority, oldest first
    prompt: str = field(compare=False)
    params: GenerationParams = field(compare=False)
    deadline: float | None = field(compare=False)  # time.monotonic() value, None = no deadline
    enqueued: float = field(compare=False)
    future: Future = field(compare=False)
    abandoned: threading.Event = field(compare=False, default_factory=threading.Event)

    def should_stop(self) -> bool:
        """The caller gave up, or the deadline passed: stop spending compute on it."""
        return self.abandoned.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)


@dataclass
class Ticket:
    """A queued request: its future, and a way to abandon it (even mid-generation)."""

    future: Future
    _item: _Item

    def cancel(self) -> None:
        self._item.abandoned.set()
        self.future.cancel()


@dataclass
class BatchedResult:
    result: GenerationResult
    queue_s: float  # time spent waiting for a batch
    batch_size: int  # how many requests shared the batch


class Batcher:
    """A priority queue and one worker thread feeding `engine.generate_batch`."""

    def __init__(self, engine: Engine, config: BatchConfig | None = None, on_batch=None):
        self.engine = engine
        self.config = config or BatchConfig()
        self._on_batch = on_batch  # called with (batch_size, queue_depth) for metrics
        self._heap: list[_Item] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        with self._cv:
            return len(self._heap)

    def submit(self, prompt: str, params: GenerationParams, priority: int = 0,
               timeout_s: float | None = None) -> Ticket:
        """Queue one request; the ticket's future resolves to a `BatchedResult` or raises."""
        fut: Future = Future()
        now = time.monotonic()
        item = _Item((-priority, next(self._seq)), prompt, params,
                     None if timeout_s is None else now + timeout_s, now, fut)
        with self._cv:
            if self._closed:
                raise RuntimeError("batcher is closed")
            if len(self._heap) >= self.config.max_queue:
                raise QueueFull(f"queue full ({self.config.max_queue} requests waiting)")
            heapq.heappush(self._heap, item)
            self._cv.notify()
        return Ticket(fut, item)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending, self._heap = self._heap, []
            self._cv.notify_all()
        for item in pending:
            item.future.set_exception(RuntimeError("server shutting down"))
        self._worker.join(timeout=5)

    def _take_batch(self) -> list[_Item]:
        cfg = self.config
        with self._cv:
            while not self._heap and not self._closed:
                self._cv.wait()
            if self._closed:
                return []
            # the first request waits a little for others to join it
            first_seen = time.monotonic()
            while len(self._heap) < cfg.max_batch_size:
                left = cfg.max_queue_delay_ms / 1000 - (time.monotonic() - first_seen)
                if left <= 0 or self._closed:
                    break
                self._cv.wait(timeout=left)
            batch = [heapq.heappop(self._heap) for _ in range(min(cfg.max_batch_size, len(self._heap)))]
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                if self._closed:
                    return
                continue
            now = time.monotonic()
            live = []
            for item in batch:
                if item.abandoned.is_set() or not item.future.set_running_or_notify_cancel():
                    continue  # the caller gave up while it waited
                if item.deadline is not None and now >= item.deadline:
                    item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                    continue
                live.append(item)
            if not live:
                continue
            if self._on_batch:
                self._on_batch(len(live), self.depth)
            self._decode(live, now)

    def _decode(self, live: list[_Item], now: float) -> None:
        """One batch through the engine; if it raises, each row again alone, so only the row at fault fails."""
        try:
            results = self.engine.generate_batch([i.prompt for i in live], [i.params for i in live],
                                                 cancelled=[i.should_stop for i in live])
        except Exception as exc:  # noqa: BLE001 - one bad row must not fail its batch, nor kill the worker
            if len(live) == 1:
                if not live[0].future.done():
                    live[0].future.set_exception(exc)
                return
            for item in live:
                self._decode([item], now)
            return
        for item, r in zip(live, results):
            if r.finish_reason == "cancelled" and not item.abandoned.is_set():
                item.future.set_exception(DeadlineExceeded("deadline passed during generation"))
            elif not item.future.done():
                item.future.set_result(BatchedResult(r, now - item.enqueued, len(live)))
