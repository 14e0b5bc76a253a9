"""A tier's NATS face: its nats.micro service, on an event loop thread of its own.

The service `tierline-<tier>` has the endpoints `tierline.<tier>.infer` and `.stream` in
nats.micro's default queue group, so replicas of a tier share the load and
`$SRV.PING|INFO|STATS` discover them, and a plain subscription to `.cancel` (every replica
hears it). Each replica also takes requests on `tierline.<tier>.infer.<its service id>` and
`.stream.<its service id>` (a retry sent to it alone: messaging.ask_tier's and stream_tier's
`after_silence`), served and counted as `infer` and `stream`.
Each request is served in its own task, which queues it with the servicer and
awaits its future: no thread waits on a request, so every request in flight is in the
scheduler's bounded queue or its running batch (streams, whose chunks come from an iterator,
are read in worker threads). nats.micro runs an
endpoint's handler one message at a time and would time only the hand-off to that task,
so the request statistics it reports on `$SRV.STATS` (requests, errors, processing time)
are counted here, around each whole request (`_Counts`, `_Service.stats`). A request its asker
cancelled got no reply: it is neither an answer nor an error, so it stays out of `num_requests`,
`num_errors` and the processing time (a mean that would otherwise fall with every client that
gives up early) and is counted apart, as `num_cancelled` in the endpoint's `data` (the tier's
Prometheus series call it `outcome="cancelled"`). A tier that stops (`stop`: SIGTERM, a drain)
takes no new request and lets those in flight finish for its grace (`stop(grace_s)`: the manifest's
`tiers.<tier>.stop_grace_s`), then ends each one still running with UNAVAILABLE "the tier is shutting down"
(`TierStopping`), a stream after the chunks already sent, so its asker hears it at once and can ask
elsewhere instead of waiting out its timeout; its decoding stops, and it counts as an error. Errors
become nats.micro error headers in one place (`_respond_error`), with the status from the
servicer's `status_of`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import grpc
from nats.micro.request import Request
from nats.micro.service import DEFAULT_QUEUE_GROUP, Service, ServiceConfig, ServiceStats

from tierline_shared.transport.messaging import (
    HEARTBEAT_HEADER,
    OTHER_REPLICA_HEADER,
    PROGRESS_HEADER,
    START_TIMEOUT_S,
    STATUS_HEADER,
    STREAM_ID_HEADER,
    TIMEOUT_HEADER,
    NatsAuthError,
    NatsOptions,
    Offline,
    ask_tier,
    connect,
    reconnect_delay,
    service_name,
    stop_loop_thread,
    stream_tier,
    subject,
)

STREAM_THREADS = 64  # streams read at once per tier process (each waits on the scheduler for its chunks)
MIN_HEARTBEAT_S = 0.05  # seconds: the most often a tier says it is alive, whatever a requester asks
EARLY_CANCEL_S = 60.0  # seconds a cancel naming no request here is kept: its request may still be on its way
EARLY_CANCEL_MAX = 10_000  # such cancels kept at most (every replica hears every cancel of its tier)
STOP_REPLY_S = 1.0  # seconds a stopping tier waits for its requests in flight to send their UNAVAILABLE
READER_POLL_S = 0.5  # how often a thread waiting for a stream's next chunk (`stream`) checks that its reader is there
_END = object()  # `stream`: the tier's last chunk came
STOP_LOOP_S = 5.0  # seconds a stop may take beyond its grace (the UNAVAILABLEs, the link's drain) before it is cut


class TierStopping(Exception):
    """The tier stopped while the request was in flight: UNAVAILABLE, so its asker asks elsewhere."""

    def __init__(self):
        super().__init__("the tier is shutting down")


@dataclass
class _Counts:
    """One endpoint's request statistics, as nats.micro reports them (times in nanoseconds).

    `requests` are those that got a reply (an answer or an error); `cancelled` those whose asker gave up
    first, kept out of the others and their time (`TierService._serve`).
    """

    requests: int = 0
    errors: int = 0
    processing_ns: int = 0
    last_error: str | None = None
    cancelled: int = 0

    def record(self, started_ns: int, error: Exception | None, cancelled: bool = False) -> None:
        """One request ended: a reply (an answer, or `error`), or, `cancelled`, none (counted apart)."""
        if cancelled:
            self.cancelled += 1
            return
        self.requests += 1
        self.processing_ns += time.perf_counter_ns() - started_ns
        if error is not None:
            self.errors += 1
            self.last_error = f"{type(error).__name__}: {error}"


class _Service(Service):
    """nats.micro's service, reporting the statistics counted around each whole request (`_Counts`)."""

    def __init__(self, client, config: ServiceConfig, counts: dict[str, _Counts]):
        super().__init__(client, config)
        self._counts = counts

    def stats(self) -> ServiceStats:
        stats = super().stats()
        for e in stats.endpoints:
            c = self._counts.get(e.name)
            if c is not None:
                e.num_requests, e.num_errors, e.last_error = c.requests, c.errors, c.last_error
                e.processing_time = c.processing_ns
                e.average_processing_time = c.processing_ns // c.requests if c.requests else 0
                e.data = {**(e.data or {}), "num_cancelled": c.cancelled}
        return stats

    async def stop(self) -> None:
        """nats.micro's stop, but each endpoint's subscription drained, not unsubscribed: a request already taken
        from the server and not yet handed to its callback reaches it (and is answered: the tier is stopping)
        instead of being dropped unanswered, its asker left to its silence limit or timeout. (nats-py 2.16's
        Endpoint._stop unsubscribes; this is its Service.stop otherwise.)"""
        if self._stopped.is_set():
            return
        await self.stop_discovery()
        subscriptions = [e._subscription for e in self._endpoints if e._subscription is not None]
        for endpoint in self._endpoints:
            endpoint._subscription = None
        self._endpoints = []
        await asyncio.gather(*(sub.drain() for sub in subscriptions))  # every unsubscribe goes out at once
        self._stopped.set()

    async def stop_discovery(self) -> None:
        """Answer no $SRV request from now on: a stopping replica is not named to a retry after a silence (ask_tier
        sends it to the first replica answering $SRV.PING)."""
        subscriptions, self._subscriptions = list(self._subscriptions.values()), {}
        for subscription in subscriptions:
            await subscription.unsubscribe()


def _seconds(header: str | None) -> float | None:
    """The requester's `Tierline-Timeout` (seconds), or None when it sent none or nothing readable."""
    try:
        value = float(header) if header else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


class TierService:
    """Runs a tier's nats.micro service on its own event loop thread.

    `handle(request_bytes, timeout_s)` is called on the event loop for each message and
    returns at once with a `concurrent.futures.Future` of the response message (bad input
    raises instead); many requests are in flight at once and the scheduler can batch them.
    """

    def __init__(self, tier: str, opts: NatsOptions, handle, status_of, version: str = "1.0.0", stream=None,
                 stats=None):
        self.tier, self.opts, self._handle, self._status_of, self.version = tier, opts, handle, status_of, version
        self._counts = {"infer": _Counts(), "stream": _Counts()}
        self._stream = stream  # stream(request_bytes, is_active) -> iterator of response bytes
        self._stats = stats  # stats() -> dict added to each endpoint's $SRV.STATS data (e.g. queue_depth)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats-{tier}", daemon=True)
        self._asking: set[concurrent.futures.Future] = set()  # `request`s waiting on the loop (ended by `stop`)
        self._asking_lock = threading.Lock()
        self._link_stopped = False
        self._nc = None
        self._service = None
        self._direct: list = []  # the subscriptions to this replica's own subjects
        self._tasks: set[asyncio.Task] = set()
        self._live: dict = {}  # request id (its reply subject) -> what stops it, called once the requester cancels
        self._early: dict[str, float] = {}  # request id -> until when a cancel that came before it counts
        self._halt = self._loop.create_future()  # done once the tier stops: every request in flight ends
        self._cut = self._loop.create_future()  # done by `hurry`: the grace ends now
        self._answers: set[concurrent.futures.Future] = set()  # the unary requests' answers in flight
        self._pool = ThreadPoolExecutor(STREAM_THREADS, thread_name_prefix=f"nats-{tier}")

    def start(self, retry_forever: bool = False) -> None:
        """Connect and register; `retry_forever`: when NATS is unreachable, keep trying in the background.

        A board that boots offline must still serve its apps (the device agent); a refused
        login is never retried.
        """
        self._thread.start()
        if not retry_forever:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=START_TIMEOUT_S + 1)
            return
        starting = asyncio.run_coroutine_threadsafe(self._start_forever(), self._loop)
        try:  # a refused login within the first attempt is raised; otherwise it connects in the background
            starting.result(timeout=self.opts.connect_timeout_s + 1)
        except concurrent.futures.TimeoutError:
            pass

    async def _start_forever(self) -> None:
        attempt = 0
        while True:
            try:
                await self._start()
                return
            except NatsAuthError:
                raise  # nothing to retry: the credentials are wrong
            except (ConnectionError, TimeoutError, OSError):
                await asyncio.sleep(reconnect_delay(attempt))
                attempt += 1

    @property
    def connected(self) -> bool:
        """Whether requests to other tiers can go out now (False while NATS is away)."""
        return self._nc is not None and self._nc.is_connected and self._service is not None

    async def _start(self) -> None:
        self._nc = await connect(self.opts, name=f"tierline-{self.tier}")
        config = ServiceConfig(name=service_name(self.tier), version=self.version,
                               description=f"Tierline {self.tier} tier",
                               stats_handler=(lambda _: self._stats()) if self._stats else None)
        self._service = _Service(self._nc, config, self._counts)
        await self._service.start()
        await self._service.add_endpoint(name="infer", subject=subject(self.tier), handler=self._on_request)
        # a retry sent to this replica alone (in the queue group too: a leaked tier identity subscribing to it only
        # gets its share, as on the tier's subject)
        self._direct = [await self._nc.subscribe(subject(self.tier, replica=self._service.id),
                                                 queue=DEFAULT_QUEUE_GROUP, cb=self._on_direct)]
        if self._stream:
            await self._service.add_endpoint(name="stream", subject=subject(self.tier, "stream"),
                                             handler=self._on_stream)
            self._direct.append(await self._nc.subscribe(subject(self.tier, "stream", self._service.id),
                                                         queue=DEFAULT_QUEUE_GROUP, cb=self._on_direct_stream))
        # no queue group: every replica hears a cancel, the one serving that request acts on it
        await self._nc.subscribe(subject(self.tier, "cancel"), cb=self._on_cancel)
        # the server has the subscriptions once it answered a ping sent after them: a request sent as soon as
        # start() returns finds its responder (without it, one could still be in the client's write buffer: 503)
        await self._nc.flush(timeout=START_TIMEOUT_S)

    async def _on_cancel(self, msg) -> None:
        """Stop the request the cancel names, or remember the cancel a while: nats-py runs each subscription's
        messages in a task of its own, so a cancel sent just after its request can be handled before it."""
        request_id = msg.data.decode(errors="replace")
        stop = self._live.get(request_id)
        if stop is not None:
            stop()
            return
        now = time.monotonic()
        if len(self._early) >= EARLY_CANCEL_MAX:
            self._early = {r: until for r, until in self._early.items() if until > now}
            while len(self._early) >= EARLY_CANCEL_MAX:  # the oldest go first (kept in arrival order)
                del self._early[next(iter(self._early))]
        self._early[request_id] = now + EARLY_CANCEL_S

    def _track(self, request_id, stop) -> None:
        """A request that can be cancelled from now on (`_on_cancel`); one whose cancel came first stops at once."""
        self._live[request_id] = stop
        if self._early.pop(request_id, 0) > time.monotonic():
            stop()

    async def _on_stream(self, req) -> None:
        task = asyncio.get_running_loop().create_task(self._serve_stream(req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_stream(self, req) -> None:
        """Each chunk is published to the request's reply inbox as it is generated.

        A cancel naming that inbox (`stream_tier` closed early) stops the decoding at its next token;
        the tier stopping (`stop`) ends the stream with UNAVAILABLE after the chunks already generated.
        Asked to (HEARTBEAT_HEADER), it says it is alive every so often until the stream ends, chunks or not.
        """
        started, error = time.perf_counter_ns(), None
        if self._halt.done():  # it came in as the tier stopped
            error = TierStopping()
            self._counts["stream"].record(started, error)
            await self._respond_error(req, error)
            return
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        done = object()
        stream_id = (req.headers or {}).get(STREAM_ID_HEADER) or object()  # none given: nobody can cancel it
        cancelled = threading.Event()
        self._track(stream_id, cancelled.set)
        halted = lambda _: chunks.put_nowait(TierStopping())  # noqa: E731 - after the chunks queued before it
        self._halt.add_done_callback(halted)

        finished = threading.Event()  # the producer has queued its last chunk: a stop after it ends nothing

        def produce() -> None:
            try:
                for data in self._stream(req.data, lambda: not cancelled.is_set()):
                    loop.call_soon_threadsafe(chunks.put_nowait, data)
            except Exception as exc:  # noqa: BLE001 - reported to the requester below
                loop.call_soon_threadsafe(chunks.put_nowait, exc)
            finished.set()
            loop.call_soon_threadsafe(chunks.put_nowait, done)

        loop.run_in_executor(self._pool, produce)
        alive = _Heartbeat.asked(req)
        try:
            while (item := await chunks.get()) is not done:
                if cancelled.is_set():
                    continue  # nobody reads the inbox any more; wait for the decoder to stop
                if isinstance(item, TierStopping) and finished.is_set():
                    continue  # the whole stream is queued already: it ends as it is
                if isinstance(item, Exception):
                    error = item
                    await self._respond_error(req, item)
                    return
                await req.respond(item)
        except Exception as exc:  # a chunk could not be published (the link dropped): counted as the error
            error = exc
            raise
        finally:
            if alive is not None:
                alive.cancel()
            self._halt.remove_done_callback(halted)
            # its reader went away first: no reply, no error
            self._counts["stream"].record(started, error, cancelled=cancelled.is_set() and error is None)
            cancelled.set()  # whatever ended this task, the decoder stops at its next token (a no-op once done)
            self._live.pop(stream_id, None)

    async def _on_request(self, req) -> None:
        # callbacks run one at a time: hand each request to its own task
        task = asyncio.get_running_loop().create_task(self._serve(req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_direct(self, msg) -> None:
        await self._on_request(Request(msg))

    async def _on_direct_stream(self, msg) -> None:
        await self._on_stream(Request(msg))

    async def _serve(self, req) -> None:
        """One request: its answer, or its error, to the reply subject. A cancel naming the request (its
        requester gave up: a deadline, its client gone) takes it out of the batch at the next step; so does
        the tier stopping (`stop`), which answers UNAVAILABLE."""
        started, error, cancelled = time.perf_counter_ns(), None, False
        headers = req.headers or {}
        timeout = _seconds(headers.get(TIMEOUT_HEADER))
        request_id = headers.get(STREAM_ID_HEADER) or object()  # none given: nobody can cancel it
        try:
            if self._halt.done():  # it came in as the tier stopped
                raise TierStopping
            answer = self._handle(req.data, timeout)
            self._track(request_id, answer.cancel)
            self._answers.add(answer)  # `stop` cancels what is in flight
            work = asyncio.wrap_future(answer)
            alive = _Heartbeat.asked(req)
            try:  # the requester asked to hear that we are alive while we work: a timer says so, if it lasts
                data = (await work).SerializeToString()
            finally:
                self._answers.discard(answer)
                if alive is not None:
                    alive.cancel()
        except asyncio.CancelledError:  # the requester cancelled it (answer.cancel): nobody reads the reply
            if self._halt.done():  # or the tier stopped (`stop` cancelled it): it left the batch; its asker hears so
                error = TierStopping()
                await self._respond_error(req, error)
                return
            cancelled = True
            return
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            error = exc
            await self._respond_error(req, exc)
            return
        finally:
            self._live.pop(request_id, None)
            self._counts["infer"].record(started, error, cancelled)
        await req.respond(data)

    async def _respond_error(self, req, exc: Exception) -> None:
        if isinstance(exc, TierStopping):  # this replica's doing: its asker may ask another replica
            code, message, extra = grpc.StatusCode.UNAVAILABLE, str(exc), {OTHER_REPLICA_HEADER: "1"}
        else:
            (code, message), extra = self._status_of(exc), {}
        await req.respond_error(code=str(code.value[0]), description=message,
                                headers={STATUS_HEADER: code.name, **extra})

    def request(self, tier: str, request, timeout_s: float, after_silence: bool = False):
        """`ask_tier` from a worker thread, on this service's connection (none once it has stopped: UNAVAILABLE at
        once, not a wait for a loop that runs no more)."""
        fut = self._on_loop(lambda: ask_tier(self._nc, tier, request, timeout_s, after_silence))
        try:
            return fut.result(timeout=timeout_s + 1)
        except concurrent.futures.CancelledError:  # `stop` ended it: the loop it waited on runs no more
            raise Offline("this process's NATS link has stopped") from None
        finally:
            with self._asking_lock:
                self._asking.discard(fut)

    def stream(self, tier: str, request, timeout_s: float, after_silence: bool = False,
               is_active=lambda: True) -> Iterator:
        """`stream_tier` from a worker thread, on this service's connection: the chunks as they come (`timeout_s`
        bounds the wait for each, as there). Closed before its last chunk (its reader went away: the iterator
        closed, or `is_active()` False), the stream is closed on the loop, which tells the tier to stop decoding
        (its cancel, as the router's streams); once the link has stopped: Offline, as `request`."""
        chunks: queue.Queue = queue.Queue()  # a chunk, then another; the end, or what the stream raised

        async def pump() -> None:
            try:
                async with contextlib.aclosing(stream_tier(self._nc, tier, request, timeout_s, after_silence)) as s:
                    async for chunk in s:
                        chunks.put(chunk)
            except Exception as exc:  # noqa: BLE001 - raised to the reader, in its thread
                chunks.put(exc)
            else:
                chunks.put(_END)

        fut = self._on_loop(pump)
        try:
            while True:
                try:
                    item = chunks.get(timeout=READER_POLL_S)
                except queue.Empty:
                    if fut.cancelled():  # `stop` ended it: the loop it ran on runs no more
                        raise Offline("this process's NATS link has stopped") from None
                    if not is_active():
                        return
                    continue
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            fut.cancel()  # ended early: the pump's stream closes on the loop (the tier hears the cancel); else a no-op
            with self._asking_lock:
                self._asking.discard(fut)

    def _on_loop(self, work) -> concurrent.futures.Future:
        """`work()` (a coroutine) run on this service's loop, tracked so that `stop` ends the wait on it; Offline at
        once when the link has stopped."""
        with self._asking_lock:
            if self._link_stopped or not self._loop.is_running():
                raise Offline("this process's NATS link has stopped")
            fut = asyncio.run_coroutine_threadsafe(work(), self._loop)
            self._asking.add(fut)
        return fut

    def stop(self, grace_s: float = 0.0, serving: threading.Event | None = None) -> None:
        """Take no new request, let those in flight finish for `grace_s` seconds, end those still running with
        UNAVAILABLE (`TierStopping`), then drain the link. `serving`: set when the process's other door (gRPC) has
        answered its own requests in flight, which may still ask tiers above over this link: it stays up until
        then, within the grace."""
        async def _stop():
            if self._service:  # first: no retry is sent here (ask_tier's probe), nor any request found here
                with contextlib.suppress(Exception):  # the link is down: nothing is sent here anyway
                    await self._service.stop_discovery()
            # then every subscription that brings requests is drained, its unsubscribe sent before any UNAVAILABLE
            # below: an asker's retry after one (another replica, the queue group) is then sent after the server
            # knows this replica left, and cannot be handed back to it. What was on its way is still taken (served
            # in the grace, or answered UNAVAILABLE): a drain, not an unsubscribe
            draining = [asyncio.ensure_future(sub.drain()) for sub in self._direct]
            if self._service:
                draining.append(asyncio.ensure_future(self._service.stop()))
            self._direct = []
            await asyncio.sleep(0)  # the drains send their unsubscribes
            await self._finish_in_flight(draining, grace_s, serving)
            if not self._halt.done():  # whatever comes in from now on is answered UNAVAILABLE at once
                self._halt.set_result(None)
            for answer in list(self._answers):  # each leaves the batch; its task answers UNAVAILABLE (`_serve`)
                answer.cancel()
            try:
                for outcome in await asyncio.gather(*draining, return_exceptions=True):
                    if isinstance(outcome, BaseException):
                        raise outcome
            finally:
                if self._tasks:  # their UNAVAILABLE goes out before the drain closes the link
                    await asyncio.wait(set(self._tasks), timeout=STOP_REPLY_S)
                if self._nc:
                    await self._nc.drain()

        stop_loop_thread(self._loop, self._thread, _stop, timeout_s=grace_s + STOP_LOOP_S)
        with self._asking_lock:  # what still waits on the stopped loop is told so now, not at its timeout
            self._link_stopped = True
            asking, self._asking = list(self._asking), set()
        for fut in asking:
            fut.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def hurry(self) -> None:
        """End the grace of a `stop` now (a second SIGTERM or Ctrl-C): what is still in flight is answered
        UNAVAILABLE at once, as at the grace's end. Callable from any thread, before or during `stop`."""
        def cut() -> None:
            if not self._cut.done():
                self._cut.set_result(None)

        if not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to cut
                self._loop.call_soon_threadsafe(cut)

    async def _finish_in_flight(self, draining: list, grace_s: float, serving: threading.Event | None) -> None:
        """Serve what is in flight, and what the drains still hand over (taken from the server before its
        unsubscribe), until all of it is answered, and `serving` is set, or `grace_s` has passed, or `hurry`
        was called."""
        deadline = time.monotonic() + grace_s
        if draining and grace_s > 0 and self._nc is not None and self._nc.is_connected:
            await self._within_grace(set(draining), deadline)  # a drain is never cancelled
        while self._tasks and not self._cut.done() and time.monotonic() < deadline:
            await self._within_grace(set(self._tasks), deadline)  # a drain's late message may start one more
        if serving is not None and not self._cut.done() and (left := deadline - time.monotonic()) > 0:
            waiting = asyncio.ensure_future(asyncio.to_thread(serving.wait, left))
            await self._within_grace({waiting}, deadline)

    async def _within_grace(self, work: set, deadline: float) -> None:
        """Until all of `work` is done, the deadline passes or `hurry` cuts the grace (`work` is not cancelled)."""
        while work and not self._cut.done() and (left := deadline - time.monotonic()) > 0:
            done, _ = await asyncio.wait({*work, self._cut}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            work -= done


class _Heartbeat:
    """An empty reply with PROGRESS_HEADER to a request's requester every `every_s`, until cancelled: a timer,
    not a wait per request, as most answers come before the first beat is due. A beat that cannot be published
    is dropped (the answer, or its error, follows on the same link)."""

    def __init__(self, req, every_s: float):
        self._req, self._every_s = req, every_s
        self._loop = asyncio.get_running_loop()
        self._beats: set[asyncio.Task] = set()
        self._timer = self._loop.call_later(every_s, self._beat)

    @classmethod
    def asked(cls, req) -> "_Heartbeat | None":
        """The heartbeat the request's asker asked for (HEARTBEAT_HEADER, at most every MIN_HEARTBEAT_S), started;
        None when it asked for none."""
        beat = _seconds((req.headers or {}).get(HEARTBEAT_HEADER))
        return cls(req, max(beat, MIN_HEARTBEAT_S)) if beat and beat > 0 else None

    def _beat(self) -> None:
        task = self._loop.create_task(self._req.respond(b"", headers={PROGRESS_HEADER: "1"}))
        self._beats.add(task)
        task.add_done_callback(self._sent)
        self._timer = self._loop.call_later(self._every_s, self._beat)

    def _sent(self, task: asyncio.Task) -> None:
        self._beats.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so that asyncio does not log it: a lost beat is harmless

    def cancel(self) -> None:
        """No beat from now on: the timer, and a beat due but not yet sent (the answer goes first)."""
        self._timer.cancel()
        for task in self._beats:
            task.cancel()
