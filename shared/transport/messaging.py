"""NATS for Tierline: subject names, connecting with credentials, a tier's micro service.

Every subject is built by `subject()`. A tier registers a `nats.micro` service
named `tierline-<tier>` with the endpoint `tierline.<tier>.infer` in the default
queue group, so replicas of a tier share the load and `$SRV.PING|INFO|STATS`
discover them. Payloads are the protobuf `InferRequest` / `InferResponse` of
proto/tierline/v1; errors travel as nats.micro error headers carrying the gRPC
status name, converted in one place (`_respond_error`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nats
from nats.micro import add_service

SUBJECT_PREFIX = "tierline"
STATUS_HEADER = "Tierline-Status"  # the gRPC status name of an error reply
STREAM_ID_HEADER = "Tierline-Stream"  # names a stream (its reply inbox) so the requester can cancel it
RECONNECT_BASE_S = 1.0  # seconds, the first wait after the link drops (doubles after each failed attempt)
RECONNECT_MAX_S = 30.0  # seconds, the longest wait between two attempts (forever)
RECONNECT_JITTER = 0.2  # each wait is drawn from [1 - 0.2, 1] x its step, so a fleet does not reconnect in step
START_TIMEOUT_S = 10.0  # connecting and registering, at most
HANDLER_THREADS = 64  # requests in flight per tier process (they wait on the batcher)


def subject(tier: str, verb: str = "infer") -> str:
    """The one place subject names are made: tierline.<tier>.<verb>."""
    return f"{SUBJECT_PREFIX}.{tier}.{verb}"


def service_name(tier: str) -> str:
    """A tier's nats.micro service name (discovery: $SRV.PING|INFO|STATS.<name>)."""
    return f"{SUBJECT_PREFIX}-{tier}"


async def discover(nc, tier: str, verb: str = "STATS", wait_s: float = 0.25) -> list[dict]:
    """Every replica's reply to `$SRV.<verb>.tierline-<tier>`, gathered for `wait_s` seconds.

    nats.micro replicas all answer a discovery request, so this is a scatter-gather on a
    reply inbox rather than `nc.request` (which keeps only the first reply).
    """
    import json

    from nats.errors import TimeoutError as NatsTimeout

    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: list[dict] = []
    try:
        await nc.publish(f"$SRV.{verb}.{service_name(tier)}", b"", reply=inbox)
        deadline = loop.time() + wait_s
        while (left := deadline - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except NatsTimeout:
                break
            try:
                replies.append(json.loads(msg.data))
            except ValueError:
                continue  # not a nats.micro reply
    finally:
        await sub.unsubscribe()
    return replies


ERROR_CODE_HEADER = "Nats-Service-Error-Code"  # set by nats.micro on error replies
ERROR_HEADER = "Nats-Service-Error"


class TierError(Exception):
    """A tier answered with an error; `status` is the gRPC status name."""

    def __init__(self, tier: str, status: str, message: str):
        super().__init__(f"{tier}: {status}: {message}")
        self.tier, self.status, self.message = tier, status, message


async def ask_tier(nc, tier: str, request, timeout_s: float):
    """One InferRequest to a tier over NATS, with an explicit timeout.

    Raises nats' NoRespondersError (no replica: at once), TimeoutError, or TierError.
    """
    from tierline.v1 import inference_pb2 as pb

    msg = await nc.request(subject(tier), request.SerializeToString(), timeout=timeout_s,
                           headers={"Tierline-Timeout": f"{timeout_s:.3f}"})
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        raise TierError(tier, headers.get(STATUS_HEADER, "UNKNOWN"), headers.get(ERROR_HEADER, ""))
    return pb.InferResponse.FromString(msg.data)


async def stream_tier(nc, tier: str, request, timeout_s: float):
    """The chunks of one streamed answer from a tier over NATS, ending with finish_reason set.

    `timeout_s` bounds the wait for each chunk. Raises NoRespondersError before the
    first chunk when no replica is up, TimeoutError, or TierError.
    """
    from nats.errors import NoRespondersError

    from tierline.v1 import inference_pb2 as pb

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    ended = False  # the tier said its last word (the final chunk, an error, or no responders)
    try:
        await nc.publish(subject(tier, "stream"), request.SerializeToString(), reply=inbox,
                         headers={"Tierline-Timeout": f"{timeout_s:.3f}", STREAM_ID_HEADER: inbox})
        while True:
            msg = await sub.next_msg(timeout=timeout_s)
            headers = msg.headers or {}
            if headers.get("Status") == "503":
                ended = True
                raise NoRespondersError
            if ERROR_CODE_HEADER in headers:
                ended = True
                raise TierError(tier, headers.get(STATUS_HEADER, "UNKNOWN"), headers.get(ERROR_HEADER, ""))
            chunk = pb.InferResponse.FromString(msg.data)
            ended = bool(chunk.choices and chunk.choices[0].finish_reason)
            yield chunk
            if ended:
                return
    finally:
        await sub.unsubscribe()
        if not ended:  # closed early (client gone, timeout): the replica decoding it stops at its next token
            await _publish_cancel(nc, tier, inbox)


async def _publish_cancel(nc, tier: str, inbox: str) -> None:
    try:
        await nc.publish(subject(tier, "cancel"), inbox.encode())
    except Exception:  # noqa: BLE001 - the link is gone: the tier's own deadline ends the stream instead
        pass


def reconnect_delay(attempt: int, rand: float | None = None) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0: the first since the link dropped or last worked).

    RECONNECT_BASE_S doubling per failed attempt up to RECONNECT_MAX_S, less a random
    share of up to RECONNECT_JITTER; `rand` in [0, 1) fixes the draw. A board that lost
    its uplink for hours then tries twice a minute, not every second.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    step = RECONNECT_MAX_S if attempt > 30 else min(RECONNECT_MAX_S, RECONNECT_BASE_S * 2 ** attempt)
    return step * (1 - RECONNECT_JITTER * (random.random() if rand is None else rand))


def _next_server(servers: list, _server_info: dict) -> tuple:
    """nats-py's reconnect hook (`reconnect_to_server_handler`): the least-failed server, after our backoff.

    nats-py counts failed attempts per server (`reconnects`, back to 0 once connected),
    sleeps the returned delay, then tries; its own `reconnect_time_wait` is fixed.
    """
    best = min(servers, key=lambda s: s.reconnects)
    return best, reconnect_delay(best.reconnects)


class NatsAuthError(ConnectionError):
    """The NATS server refused the credentials."""


@dataclass
class NatsOptions:
    url: str
    user: str = ""
    password: str = ""
    connect_timeout_s: float = 2.0

    def connect_kwargs(self) -> dict:
        kw = {"servers": [self.url], "connect_timeout": self.connect_timeout_s,
              "max_reconnect_attempts": -1, "allow_reconnect": True,
              "reconnect_time_wait": RECONNECT_BASE_S,  # nats-py's wait within the first connect() only
              "reconnect_to_server_handler": _next_server}  # after a drop: exponential backoff with jitter
        if self.user:
            kw.update(user=self.user, password=self.password)
        return kw

    @classmethod
    def from_manifest(cls, manifest) -> "NatsOptions":
        """The manifest's `nats:` section (every process connects with these)."""
        n = manifest.nats
        return cls(url=n.url, user=n.user, password=n.password, connect_timeout_s=n.connect_timeout_ms / 1000)


async def connect(opts: NatsOptions, name: str, timeout_s: float = START_TIMEOUT_S):
    """Connect; it reconnects forever (waits: `reconnect_delay`); a refused login raises NatsAuthError at once."""
    refused = asyncio.Event()
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        errors.append(text)
        if "authorization" in text.lower() or "authentication" in text.lower():
            refused.set()

    connecting = asyncio.ensure_future(nats.connect(name=name, error_cb=on_error, **opts.connect_kwargs()))
    waiting = asyncio.ensure_future(refused.wait())
    done, _ = await asyncio.wait({connecting, waiting}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if connecting in done and connecting.exception() is None:
        return connecting.result()
    if connecting not in done:
        connecting.cancel()
    if refused.is_set() or any("authorization" in e.lower() for e in errors):
        raise NatsAuthError(f"NATS at {opts.url} refused the credentials for user {opts.user!r}")
    why = connecting.exception() if connecting in done else f"no connection in {timeout_s:.0f} s"
    raise ConnectionError(f"cannot connect to NATS at {opts.url}: {why or errors[-1:]}")


def stop_loop_thread(loop: asyncio.AbstractEventLoop, thread, cleanup, timeout_s: float = 5.0) -> None:
    """Run `cleanup()` (a coroutine function) on a background event loop, then stop the loop and its thread.

    Bounded: a cleanup that hangs or fails does not keep the caller from stopping."""
    if not thread.is_alive():
        return
    try:
        asyncio.run_coroutine_threadsafe(cleanup(), loop).result(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - stopping anyway
        pass
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=timeout_s)


class TierService:
    """Runs a tier's nats.micro service on its own event loop thread.

    `handle(request_bytes, timeout_s) -> response_bytes` is called in a worker
    thread for each message (the servicer's blocking path), so many requests are
    in flight at once and the batcher can group them.
    """

    def __init__(self, tier: str, opts: NatsOptions, handle, status_of, version: str = "1.0.0", stream=None,
                 stats=None):
        self.tier, self.opts, self._handle, self._status_of, self.version = tier, opts, handle, status_of, version
        self._stream = stream  # stream(request_bytes, is_active) -> iterator of response bytes
        self._stats = stats  # stats() -> dict added to each endpoint's $SRV.STATS data (e.g. queue_depth)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats-{tier}", daemon=True)
        self._nc = None
        self._service = None
        self._tasks: set[asyncio.Task] = set()
        self._live_streams: dict = {}  # stream id -> Event, set once the requester cancels
        self._pool = ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix=f"nats-{tier}")

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
        self._service = await add_service(self._nc, name=service_name(self.tier), version=self.version,
                                          description=f"Tierline {self.tier} tier",
                                          stats_handler=(lambda _: self._stats()) if self._stats else None)
        await self._service.add_endpoint(name="infer", subject=subject(self.tier), handler=self._on_request)
        if self._stream:
            await self._service.add_endpoint(name="stream", subject=subject(self.tier, "stream"),
                                             handler=self._on_stream)
            # no queue group: every replica hears a cancel, the one serving that inbox acts on it
            await self._nc.subscribe(subject(self.tier, "cancel"), cb=self._on_cancel)

    async def _on_cancel(self, msg) -> None:
        stopped = self._live_streams.get(msg.data.decode(errors="replace"))
        if stopped is not None:
            stopped.set()

    async def _on_stream(self, req) -> None:
        task = asyncio.get_running_loop().create_task(self._serve_stream(req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_stream(self, req) -> None:
        """Each chunk is published to the request's reply inbox as it is generated.

        A cancel naming that inbox (`stream_tier` closed early) stops the decoding at its next token.
        """
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        done = object()
        stream_id = (req.headers or {}).get(STREAM_ID_HEADER) or object()  # none given: nobody can cancel it
        cancelled = self._live_streams[stream_id] = threading.Event()

        def produce() -> None:
            try:
                for data in self._stream(req.data, lambda: not cancelled.is_set()):
                    loop.call_soon_threadsafe(chunks.put_nowait, data)
            except Exception as exc:  # noqa: BLE001 - reported to the requester below
                loop.call_soon_threadsafe(chunks.put_nowait, exc)
            loop.call_soon_threadsafe(chunks.put_nowait, done)

        loop.run_in_executor(self._pool, produce)
        try:
            while (item := await chunks.get()) is not done:
                if cancelled.is_set():
                    continue  # nobody reads the inbox any more; wait for the decoder to stop
                if isinstance(item, Exception):
                    await self._respond_error(req, item)
                    return
                await req.respond(item)
        finally:
            self._live_streams.pop(stream_id, None)

    async def _on_request(self, req) -> None:
        # callbacks run one at a time: hand each request to its own task
        task = asyncio.get_running_loop().create_task(self._serve(req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, req) -> None:
        timeout = float((req.headers or {}).get("Tierline-Timeout", 0)) or None
        try:
            data = await asyncio.get_running_loop().run_in_executor(self._pool, self._handle, req.data, timeout)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            await self._respond_error(req, exc)
            return
        await req.respond(data)

    async def _respond_error(self, req, exc: Exception) -> None:
        code, message = self._status_of(exc)
        await req.respond_error(code=str(code.value[0]), description=message,
                                headers={STATUS_HEADER: code.name})

    def request(self, tier: str, request, timeout_s: float):
        """`ask_tier` from a worker thread, on this service's connection."""
        fut = asyncio.run_coroutine_threadsafe(ask_tier(self._nc, tier, request, timeout_s), self._loop)
        return fut.result(timeout=timeout_s + 1)

    def stop(self) -> None:
        async def _stop():
            if self._service:
                await self._service.stop()
            if self._nc:
                await self._nc.drain()

        stop_loop_thread(self._loop, self._thread, _stop)
