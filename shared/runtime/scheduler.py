"""Iteration-level scheduling (Orca, vLLM, TGI): which sequences run is decided again at every step.

One thread owns the engine's model runner (shared/runtime/runner.py) and loops
schedule -> execute -> update:
- schedule: cancelled requests and passed deadlines leave; requests waiting in a bounded
  priority queue (highest priority first, oldest first within one) are admitted while the
  running batch has room (`max_num_seqs`) and the step's token budget lasts
  (`max_num_batched_tokens`: one per running sequence, then prompt chunks, running
  sequences' chunks before new ones); a prompt larger than what is left is prefilled in
  chunks over several steps.
- execute: one runner step: the chunks, then a decode token for every running sequence,
  those whose prompt the step completed included (one token beyond the budget each).
- update: streams get their new text and finished requests their result at once; the next
  step runs without them.
A request arriving while others decode joins at the next step; it never waits for a batch
to finish. A full queue is refused at submit (`QueueFull`: RESOURCE_EXHAUSTED); a row the
backend fails on fails alone.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from tierline_shared.config.manifest import BatchConfig
from tierline_shared.runtime.engine import Engine, GenerationParams, GenerationResult
from tierline_shared.runtime.runner import Sequence

END = object()  # put on a stream's queue after its last chunk; the ticket's future then holds the result


class Piece(str):
    """A stream's new text, with its sequence's tokens so far: what the stream has cost when its reader goes away
    before its end (the router charges a stream cut short by them). Text wherever a chunk is read as text."""

    prompt_tokens: int
    completion_tokens: int

    def __new__(cls, text: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> "Piece":
        piece = super().__new__(cls, text)
        piece.prompt_tokens, piece.completion_tokens = prompt_tokens, completion_tokens
        return piece

    def __reduce__(self):  # across the engine core's pipe
        return Piece, (str(self), self.prompt_tokens, self.completion_tokens)


class QueueFull(RuntimeError):
    """The bounded queue is full: the caller should back off (RESOURCE_EXHAUSTED)."""


class Retired(RuntimeError):
    """Refused by a scheduler whose model an update replaced (`Scheduler.retire`): queue the request on the model
    that replaced it (the servicer reads the served model again: `TierServicer._queued`)."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed before it could run."""


@dataclass(order=True)
class _Request:
    sort_key: tuple  # (-priority, sequence): heapq pops the highest priority, oldest first
    prompt: str = field(compare=False)
    params: GenerationParams = field(compare=False)
    deadline: float | None = field(compare=False)  # time.monotonic() value, None = no deadline
    enqueued: float = field(compare=False)
    future: Future = field(compare=False)
    chunks: queue.Queue | None = field(compare=False)  # a stream's text chunks, then END
    abandoned: threading.Event = field(compare=False, default_factory=threading.Event)
    seq: Sequence | None = field(compare=False, default=None)
    admitted: float = field(compare=False, default=0.0)
    batch_size: int = field(compare=False, default=0)  # running sequences when it joined
    token_at: float = field(compare=False, default=0.0)  # its sequence's last_token_at after the previous step
    ids: tuple | list | None = field(compare=False, default=None)  # the prompt's tokens, when its submitter had them

    def should_stop(self) -> bool:
        """The caller gave up, or the deadline passed: stop spending compute on it."""
        return self.abandoned.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)


@dataclass
class Ticket:
    """A queued request: its future, a stream's chunk queue, and a way to abandon it (even mid-generation)."""

    future: Future
    _request: _Request

    @property
    def chunks(self) -> queue.Queue | None:
        return self._request.chunks

    def cancel(self) -> None:
        self._request.abandoned.set()
        self.future.cancel()


@dataclass
class BatchedResult:
    result: GenerationResult
    queue_s: float  # time spent waiting to be admitted
    batch_size: int  # sequences in the running batch when it joined


@dataclass
class StepStats:
    """What one step did, for metrics (vLLM: num_requests_running/waiting, iteration tokens, inter-token latency)."""

    running: int  # sequences in the running batch after the step
    waiting: int  # requests in the queue after the step
    seqs: int  # sequences the step computed (decoding and prefilling)
    tokens: int  # tokens the step computed (decode tokens + prompt chunk tokens)
    inter_token_s: list[float]  # for every sequence that decoded a token, the time since its previous one
    first_tokens: int  # sequences that got their first token
    draft_tokens: int = 0  # draft tokens verified (in `tokens` too; vLLM: spec_decode_num_draft_tokens)
    accepted_tokens: int = 0  # of those, the ones the model's own choice agreed with


class Scheduler:
    """A bounded priority queue and one thread stepping the engine's running batch."""

    def __init__(self, engine: Engine, config: BatchConfig | None = None,
                 on_step: Callable[[StepStats], None] | None = None):
        self.engine = engine
        self.config = config or BatchConfig()
        self._on_step = on_step
        self._runner = engine.runner()
        self._heap: list[_Request] = []
        self._active: list[_Request] = []  # admitted: prefilling or decoding (the scheduler thread's own)
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._retiring = False  # replaced by an update: what it holds finishes, nothing new is taken (`retire`)
        self._worker = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Requests waiting to be admitted."""
        with self._cv:
            return len(self._heap)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def busy(self) -> bool:
        with self._cv:
            return bool(self._heap or self._active)

    def submit(self, prompt: str, params: GenerationParams, priority: int = 0, timeout_s: float | None = None,
               stream: bool = False, chunks=None, ids=None) -> Ticket:
        """Queue one request; the ticket's future resolves to a `BatchedResult` or raises. With `stream`,
        the ticket's `chunks` queue receives the text as it is generated, then END (`chunks`: another object
        with a `put` to receive them instead of a new queue.Queue). `ids`: the prompt's tokens as this engine's
        tokenizer encodes it, when the submitter has them (the engine core's tier process, which tokenized it to
        validate it): the scheduler's thread then does not encode it again."""
        fut: Future = Future()
        now = time.monotonic()
        if stream and chunks is None:
            chunks = queue.Queue()
        req = _Request((-priority, next(self._seq)), prompt, params, None if timeout_s is None else now + timeout_s,
                       now, fut, chunks if stream else None, ids=ids)
        with self._cv:
            if self._retiring:  # closed by now or not: the request belongs on the new model
                raise Retired("this model was replaced by an update")
            if self._closed:
                raise RuntimeError("scheduler is closed")
            gone = self._purge() if len(self._heap) >= self.config.max_queue else []
            full = len(self._heap) >= self.config.max_queue
            if not full:
                heapq.heappush(self._heap, req)
                self._cv.notify()
        self._leave(gone)
        if full:
            raise QueueFull(f"queue full ({self.config.max_queue} requests waiting)")
        return Ticket(fut, req)

    def retire(self) -> None:
        """Take no new request (`submit` raises `Retired`), let what is queued or running finish, then close; blocks
        until then (the caller's own thread). What a submitter had read of the old model before the update goes to
        the new one instead: no request is failed by the old one closing under it."""
        with self._cv:
            self._retiring = True
            self._cv.notify_all()
        # the scheduler's thread ends once it holds nothing (`_run`): it owns `_active`, and only it can tell a
        # request it has taken off the queue and is admitting (in neither `_heap` nor `_active` meanwhile)
        self._worker.join()
        self.close()

    def close(self) -> None:
        """Stop: requests waiting or running fail ("server shutting down")."""
        with self._cv:
            self._closed = True
            pending, self._heap = self._heap, []
            self._cv.notify_all()
        self._worker.join(timeout=10)
        for req in pending + self._active:
            self._fail(req, RuntimeError("server shutting down"))
        self._active = []

    # -- the loop ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._active and not self._closed and not self._retiring:
                    self._cv.wait()
                if self._closed or (self._retiring and not self._heap and not self._active):
                    return  # closed, or retired with nothing left (`retire`)
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - a bug in a step fails what ran, never the thread
                for req in self._active:
                    self._fail(req, exc)
                self._active = []
                self._runner = self.engine.runner()

    def _purge(self) -> list[_Request]:
        """Take out of the queue the requests whose caller gave up or whose deadline passed (the caller holds
        `_cv`): they neither hold a place in a full queue nor wait for a free slot to be failed."""
        keep, gone = [], []
        for r in self._heap:  # one pass: a request's should_stop() changes with the clock and other threads
            (gone if r.should_stop() else keep).append(r)
        if gone:
            heapq.heapify(keep)
            self._heap = keep
        return gone

    def _leave(self, gone: list[_Request]) -> None:
        """Answer what `_purge` took out, as `_finish` answers a sequence that left the batch."""
        for req in gone:
            self._fail(req, RuntimeError("cancelled by the caller") if req.abandoned.is_set()
                       else DeadlineExceeded("deadline passed while queued"))

    def _step(self) -> None:
        cfg = self.config
        with self._cv:
            gone = self._purge() if self._heap else []
        self._leave(gone)
        for req in self._active:  # leave before the step: the caller gave up, or the deadline passed
            if not req.seq.done and req.should_stop():
                req.seq.finish("cancelled")
        self._update()
        decoding = sum(1 for r in self._active if r.seq.prefilled)
        budget = cfg.max_num_batched_tokens - decoding
        chunks: list[tuple[Sequence, int]] = []
        for req in self._active:  # running sequences' prompt chunks first
            if not req.seq.prefilled and budget > 0:
                n = min(self._runner.chunk_limit(req.seq), budget)
                chunks.append((req.seq, n))
                budget -= n + _fit_draft(req.seq, n, budget - n)
        with self.engine._lock:  # the engine may be used outside the scheduler (health checks, evaluation)
            for req in self._admit(budget):
                if budget <= 0:
                    break
                n = min(self._runner.chunk_limit(req.seq), budget)
                chunks.append((req.seq, n))
                budget -= n + _fit_draft(req.seq, n, budget - n)
            self._runner.step(chunks, keep_slots=True, prefilled=self._emit)
        self._update(chunks)

    def _admit(self, budget: int) -> list[_Request]:
        """Requests from the queue, best first, while the batch has room and the step has tokens left."""
        admitted = []
        while len(self._active) < self.config.max_num_seqs and budget > len(admitted):
            with self._cv:
                if not self._heap:
                    break
                req = heapq.heappop(self._heap)
            if req.abandoned.is_set() or not req.future.set_running_or_notify_cancel():
                continue  # the caller gave up while it waited
            if req.deadline is not None and time.monotonic() >= req.deadline:
                self._fail(req, DeadlineExceeded("deadline passed while queued"))
                continue
            try:
                self.engine.check(req.prompt, req.params, req.ids)
                seq = self._runner.sequence(req.prompt, req.params, req.ids)  # a prefix-cache hit: only the suffix
            except Exception as exc:  # noqa: BLE001 - over the model's limits, or a bug in encoding it: it fails alone
                self._fail(req, exc)  # (raised from here, it would be out of the queue and not yet running: lost)
                continue
            req.seq, req.ids = seq, None
            req.admitted, req.batch_size = time.monotonic(), len(self._active) + 1
            self._active.append(req)
            admitted.append(req)
        return admitted

    def _emit(self) -> None:
        """Streams get the text their sequences have so far (first tokens, before the step's decode)."""
        for req in self._active:
            if req.chunks is not None:
                text = req.seq.take_text()
                if text:
                    req.chunks.put(Piece(text, len(req.seq.ids), len(req.seq.gen)))

    def _update(self, chunks: list | None = None) -> None:
        """Hand out new text and finished results; record the step (`chunks`: the step's prompt chunks; None
        before the step)."""
        itl, first = [], 0
        decoded = {id(s) for s in self._runner.decoded} if chunks is not None else set()
        if chunks is not None:
            for req in self._active:
                s, t = req.seq, req.seq.last_token_at
                if t != req.token_at:  # it got a token in this step
                    if req.token_at:
                        itl.append(t - req.token_at)
                    else:
                        first += 1
                        if id(s) in decoded:  # its prompt completed and it decoded too: its second token
                            itl.append(t - (s.t0 + s.first_token_s))
                    req.token_at = t
        self._emit()
        done = [r for r in self._active if r.seq.done]
        if done:
            self._active = [r for r in self._active if not r.seq.done]
            for req in done:
                self._finish(req)
        if chunks is not None and self._on_step is not None:
            self._on_step(StepStats(running=len(self._active), waiting=self.depth,
                                    seqs=len(decoded | {id(s) for s, _ in chunks}),
                                    tokens=len(decoded) + sum(n for _, n in chunks) + self._runner.drafted,
                                    inter_token_s=itl, first_tokens=first, draft_tokens=self._runner.drafted,
                                    accepted_tokens=self._runner.accepted))

    def _finish(self, req: _Request) -> None:
        s = req.seq
        if s.error is not None:
            self._fail(req, s.error)
        elif s.reason == "cancelled":
            self._fail(req, DeadlineExceeded("deadline passed during generation") if not req.abandoned.is_set()
                       else RuntimeError("cancelled by the caller"))
        else:
            if not req.future.done():
                req.future.set_result(BatchedResult(s.result(), req.admitted - req.enqueued, req.batch_size))
            if req.chunks is not None:
                req.chunks.put(END)

    @staticmethod
    def _fail(req: _Request, exc: Exception) -> None:
        if not req.future.done():
            if req.future.running() or req.future.set_running_or_notify_cancel():
                req.future.set_exception(exc)
        if req.chunks is not None:
            req.chunks.put(END)


def _fit_draft(seq: Sequence, n: int, left: int) -> int:
    """A sequence whose chunk of `n` tokens completes its prompt verifies its draft in the same forward: the draft
    is cut to the step's tokens `left` after the chunk, and counts in the step's budget. Returns its tokens."""
    if not seq.verifies(n):
        return 0
    seq.draft = seq.draft[:max(left, 0)]
    return len(seq.draft)
