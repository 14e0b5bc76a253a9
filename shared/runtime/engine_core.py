"""The engine core in a process of its own (vLLM V1's EngineCore): the scheduler and the model apart from the
threads that serve requests.

In one process, the gRPC and NATS threads that parse, validate and answer requests take Python's GIL
between the scheduler's steps: the scheduler waits for it after every forward, and its steps get slower as
the load grows (measured on the edge at concurrency 16: 1.12 ms per step over gRPC against 0.90 ms driven
in-process, 83% of the bare engine's throughput against 100%). Here the tier process keeps the serving
(validation, the result cache, statuses, responses) and a child process, started with `spawn`, loads the
engine and runs its `Scheduler`; they talk over one pipe:

- tier -> core: ("submit", id, prompt, params, priority, timeout_s, stream, ids), ("cancel", id), ("close",):
  `ids`, the prompt's tokens, which the tier process has from validating it (its tokenizer's cache), so that
  the core's scheduler thread, which the model's steps wait on, does not encode every prompt again
- core -> tier: a list of events, sent at the end of a step that produced text or results, else every
  FLUSH_S (statistics alone): ("chunk", id, text),
  ("done", id, BatchedResult), ("fail", id, exception), ("step", StepStats), ("prefix", queries, hits).

`EngineCore` has the scheduler's interface (submit -> ticket with a future, a stream's chunk queue, cancel;
depth; close), so the servicer serves it as it serves a `Scheduler`; `CoreEngine` is what the servicer asks
of the engine in the tier process (tokenizer, info, check), without the model. A core that dies fails every
request it held (`EngineCoreDied`: UNAVAILABLE, which the router escalates) and is started again; submits
while it restarts fail the same way at once.

A core that holds requests and finishes no step for `iteration_timeout_s` (tiers.<tier>.batching; vLLM's
VLLM_ENGINE_ITERATION_TIMEOUT_S) is taken for hung (a deadlock, a device that stopped answering): it is killed,
and then fails and starts again as a core that died. Its tier process keeps saying that its requests are being
worked on (the heartbeats come from its event loop), so without this a hung core held every request routed to
the replica for the router's whole timeout, for good.

`cpus` (tiers.<tier>.engine_cpus) binds the core, its model's threads included, to those CPUs, as vLLM's CPU
backend binds its OpenMP threads and reserves the other cores for its API server; the tier process then runs
on the CPUs left (`TierProcess.engine_core`). On a small machine this keeps the serving threads, the router
and nats-server from preempting the model between its steps.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import multiprocessing as mp
import pickle
import queue
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Collection

from tierline_shared.config.manifest import BatchConfig
from tierline_shared.runtime.affinity import on, pin
from tierline_shared.runtime.engine import Engine, EngineInfo, GenerationParams, prompt_ids
from tierline_shared.runtime.scheduler import END, Scheduler, StepStats

log = logging.getLogger("tierline.engine_core")

FLUSH_S = 0.02  # seconds: the longest an event waits in the core when no step runs (a failure between steps)
LOAD_TIMEOUT_S = 600.0  # seconds a core may take to load its model
CLOSE_TIMEOUT_S = 10.0  # seconds a core may take to stop before it is killed
RESTART_DELAY_S = 0.5  # seconds between a core's death and its new start
WATCH_S = 1.0  # seconds between two looks at a quiet core (is it hung?)


@dataclass
class Loader:
    """A picklable call of `module.function(*args, **kwargs)` that imports the module only where it is called
    (in the engine core): the tier's own process need not import the model's runtime (torch: 2.4 s)."""

    module: str
    function: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __call__(self):
        return getattr(importlib.import_module(self.module), self.function)(*self.args, **self.kwargs)


class EngineCoreDied(RuntimeError):
    """The engine core process exited (or is being started again): the request was not answered."""


class CoreEngine:
    """What the serving side asks of an engine whose model runs in the core: its tokenizer and its limits."""

    def __init__(self, tokenizer, info: EngineInfo):
        self.tokenizer, self.info = tokenizer, info

    check = Engine.check  # the same limits, counted with the same tokenizer


@dataclass
class CoreTicket:
    future: Future
    chunks: queue.Queue | None
    rid: int
    core: "EngineCore"

    def cancel(self) -> None:
        self.future.cancel()
        self.core._cancel(self.rid)


class EngineCore:
    """A Scheduler in a child process, with the Scheduler's interface; `engine` is its CoreEngine."""

    def __init__(self, load: Callable[[], Engine], batch: BatchConfig | None = None,
                 prefix_cache: tuple[int, int] = (0, 16), name: str = "engine-core", cpus: Collection[int] = ()):
        """`load`: a picklable callable that returns the engine (run in the child; its exception is raised
        here); `prefix_cache`: (max_tokens, min_match) for the engine's prefix cache; `cpus`: the CPUs the
        child runs on (none: wherever the OS puts it)."""
        self._load, self.config, self._prefix, self._name = load, batch or BatchConfig(), prefix_cache, name
        self.cpus = sorted(cpus)
        self._ctx = mp.get_context("spawn")  # a fresh interpreter: no threads or CUDA state inherited
        self._lock = threading.Lock()  # the pending table and the state below (never held while sending)
        self._send_lock = threading.Lock()  # the pipe's sending end
        self._pending: dict[int, CoreTicket] = {}
        self._ids = itertools.count()
        self._waiting = self._running = 0
        self._heard = 0.0  # monotonic time of the core's last events, or of a submit to an idle core
        self._hung = False  # the watch killed the core (`_watch`)
        self._closed = False
        self._conn = self._proc = None
        self.on_step: Callable[[StepStats], None] | None = None
        self.on_prefix_lookup: Callable[[int, int], None] | None = None
        tokenizer, info = self._start()
        self.engine = CoreEngine(tokenizer, info)

    # -- the scheduler's interface -------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Requests waiting to be admitted, as the core's last step left them."""
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._pending)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def submit(self, prompt: str, params: GenerationParams, priority: int = 0, timeout_s: float | None = None,
               stream: bool = False) -> CoreTicket:
        # validation encoded it: a cache hit here
        ids = prompt_ids(self.engine.tokenizer, prompt, params.add_special_tokens)
        with self._lock:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            if self._conn is None:
                raise EngineCoreDied("the engine process is starting again")
            rid, conn = next(self._ids), self._conn
            if not self._pending:  # an idle core owes no event until now
                self._heard = time.monotonic()
            ticket = CoreTicket(Future(), queue.Queue() if stream else None, rid, self)
            self._pending[rid] = ticket  # before the send: its first chunk may come back before send returns
        try:
            with self._send_lock:
                conn.send(("submit", rid, prompt, params, priority, timeout_s, stream, ids))
        except OSError:  # the core is gone; its reader will start it again
            with self._lock:
                self._pending.pop(rid, None)
            raise EngineCoreDied("the engine process exited") from None
        return ticket

    def close(self) -> None:
        """Stop the core: requests waiting or running fail ("server shutting down")."""
        with self._lock:
            self._closed = True
            conn, proc = self._conn, self._proc
        if conn is not None:
            try:
                with self._send_lock:
                    conn.send(("close",))
            except OSError:
                pass
        if proc is not None:
            proc.join(CLOSE_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._fail_pending(RuntimeError("server shutting down"))

    # -- the pipe --------------------------------------------------------------------------------------
    def _start(self):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child, self._load, self.config, self._prefix, self.cpus),
                                 name=self._name, daemon=True)
        # spawned from a thread on its CPUs: what it imports before `_serve` binds it (numpy sizes its BLAS
        # thread pool at import, from the CPUs it may use) sees its own CPUs
        with on(self.cpus):
            proc.start()
        child.close()
        try:
            msg = parent.recv() if parent.poll(LOAD_TIMEOUT_S) else (
                "failed", EngineCoreDied(f"the engine process did not load its model in {LOAD_TIMEOUT_S:.0f} s"))
        except (EOFError, OSError):
            proc.join(1.0)
            msg = ("failed", EngineCoreDied(f"the engine process exited while loading (code {proc.exitcode})"))
        if msg[0] != "ready":
            proc.kill()
            proc.join()
            raise msg[1]
        with self._lock:
            if self._closed:  # closed while it started again
                proc.kill()
                proc.join()
                raise EngineCoreDied("the engine process was closed")
            self._conn, self._proc = parent, proc
        read = threading.Event()  # set once the reader is done with this core (it died, or was closed)
        threading.Thread(target=self._read, args=(parent, proc, read), name=f"{self._name}-reader",
                         daemon=True).start()
        threading.Thread(target=self._watching, args=(proc, read), name=f"{self._name}-watch", daemon=True).start()
        return msg[1], msg[2]

    def _cancel(self, rid: int) -> None:
        """The caller gave up: the core drops the request at its next step (or from its queue)."""
        with self._lock:
            ticket, conn = self._pending.pop(rid, None), self._conn
        if ticket is None:
            return
        if conn is not None:
            try:
                with self._send_lock:
                    conn.send(("cancel", rid))
            except OSError:
                pass  # the core is gone: nothing to stop
        if ticket.chunks is not None:
            ticket.chunks.put(END)

    def _read(self, conn, proc, read: threading.Event) -> None:
        while True:
            try:
                events = conn.recv()
            except (EOFError, OSError):
                break
            self._heard = time.monotonic()
            for event in events:
                try:
                    self._dispatch(event)
                except Exception:  # noqa: BLE001 - a metrics callback must not stop the answers
                    log.exception("engine core: event %s", event[0])
        read.set()
        proc.join(1.0)
        with self._lock:
            self._conn = None
            closed = self._closed
        conn.close()
        why = (f"finished no step in {self.config.iteration_timeout_s:g} s (hung) and was killed" if self._hung else
               f"exited (code {proc.exitcode}) before answering")
        self._hung = False
        self._fail_pending(RuntimeError("server shutting down") if closed else
                           EngineCoreDied(f"the engine process {why}"))
        if not closed:
            self._restart()

    def _watching(self, proc, read: threading.Event) -> None:
        """Every WATCH_S while the core's reader reads (a thread apart: a poll before each read would cost the
        serving process a few microseconds per step)."""
        while not read.wait(WATCH_S):
            self._watch(proc)

    def _watch(self, proc) -> None:
        """Kill the core when it holds requests and has said nothing for iteration_timeout_s: hung (`_read` then
        fails what it held and starts it again)."""
        with self._lock:
            quiet = time.monotonic() - self._heard if self._pending and not self._closed else 0.0
        if quiet > self.config.iteration_timeout_s and proc.is_alive():
            self._hung = True
            log.error("engine core: no step finished in %.0f s with requests held: taken for hung, killed "
                      "(tiers.<tier>.batching.iteration_timeout_s)", quiet)
            proc.kill()

    def _restart(self) -> None:
        threading.Event().wait(RESTART_DELAY_S)  # a tier being stopped (SIGTERM to its whole group) closes meanwhile
        while not self._closed:
            try:
                self._start()
                return
            except Exception as exc:  # noqa: BLE001 - keep trying: the tier answers UNAVAILABLE meanwhile
                if self._closed:
                    return
                log.warning("engine core: could not start again (%s); retrying in 1 s", exc)
                threading.Event().wait(1.0)

    def _dispatch(self, event: tuple) -> None:
        kind = event[0]
        if kind == "step":
            stats: StepStats = event[1]
            self._waiting, self._running = stats.waiting, stats.running
            if self.on_step is not None:
                self.on_step(stats)
        elif kind == "chunk":
            ticket = self._pending.get(event[1])
            if ticket is not None and ticket.chunks is not None:
                ticket.chunks.put(event[2])
        elif kind == "prefix":
            if self.on_prefix_lookup is not None:
                self.on_prefix_lookup(event[1], event[2])
        else:  # "done" or "fail"
            with self._lock:
                ticket = self._pending.pop(event[1], None)
            if ticket is not None:
                _settle(ticket, event[2], kind == "done")

    def _fail_pending(self, exc: Exception) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            self._waiting = self._running = 0
        for ticket in pending:
            _settle(ticket, exc, False)


def _settle(ticket: CoreTicket, value, ok: bool) -> None:
    """The ticket's future gets its result (or exception) unless its caller cancelled it; a stream its END."""
    if ticket.future.set_running_or_notify_cancel():  # whoever popped the ticket from _pending settles it, once
        ticket.future.set_result(value) if ok else ticket.future.set_exception(value)
    if ticket.chunks is not None:
        ticket.chunks.put(END)


# -- the child ---------------------------------------------------------------------------------------------
class _Outbox:
    """Events for the tier process, sent together: at the end of a step that produced text or results, else
    every FLUSH_S."""

    def __init__(self, conn):
        self._conn, self._events, self._lock = conn, [], threading.Lock()
        self._send_lock = threading.Lock()  # held across take-and-send: batches leave in order; `add` never waits on it
        self._urgent = False  # an event a caller waits for (text, a result) is in the box

    def add(self, event: tuple, urgent: bool = True) -> None:
        with self._lock:
            self._events.append(event)
            self._urgent = self._urgent or urgent

    def flush(self) -> None:
        with self._send_lock:
            with self._lock:
                events, self._events, self._urgent = self._events, [], False
            if events:
                self._conn.send(events)

    def step(self, stats: StepStats) -> None:
        """A step ended: its text and results go now; statistics alone wait for the next flush (a message per
        step would cost both processes a wake-up per step)."""
        self.add(("step", stats), urgent=False)
        if self._urgent:
            self.flush()

    def prefix(self, queries: int, hits: int) -> None:
        self.add(("prefix", queries, hits), urgent=False)

    def finished(self, rid: int, future: Future) -> None:
        if future.cancelled():
            return  # the tier process cancelled it: it answered its caller already
        exc = future.exception()
        self.add(("done", rid, future.result()) if exc is None else ("fail", rid, _portable(exc)))


class _Chunks:
    """A stream's chunk queue in the core: each chunk becomes an event (END comes as the "done" event)."""

    def __init__(self, out: _Outbox, rid: int):
        self._out, self._rid = out, rid

    def put(self, item) -> None:
        if item is not END:
            self._out.add(("chunk", self._rid, item))


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it crosses the pipe intact, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception whose constructor takes other arguments than its args
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _serve(conn, load: Callable[[], Engine], batch: BatchConfig, prefix: tuple[int, int],
           cpus: list[int]) -> None:
    """The core process: load the engine, then run its scheduler on what the pipe brings, until close or EOF."""
    # Ctrl-C, and the SIGTERM a process group (a terminal, systemd's control group, `tierline up`) gets, are for
    # the tier process, which answers what the core holds and then closes it (a core gone first would fail them)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if cpus:  # before the model starts its threads
            pin(cpus)
        engine = load()
    except Exception as exc:  # noqa: BLE001 - the tier process raises it (a bad artifact exits 2 there)
        conn.send(("failed", _portable(exc)))
        return
    out = _Outbox(conn)
    engine.enable_prefix_cache(*prefix, out.prefix)
    scheduler = Scheduler(engine, batch, on_step=out.step)
    tickets: dict = {}
    conn.send(("ready", engine.tokenizer, engine.info))
    while True:
        try:
            if not conn.poll(FLUSH_S):
                out.flush()
                continue
            msg = conn.recv()
        except (EOFError, OSError):  # the tier process is gone
            break
        if msg[0] == "submit":
            _, rid, prompt, params, priority, timeout_s, stream, ids = msg
            try:
                ticket = scheduler.submit(prompt, params, priority, timeout_s, stream=stream,
                                          chunks=_Chunks(out, rid) if stream else None, ids=ids)
            except Exception as exc:  # noqa: BLE001 - a full queue: refused at once
                out.add(("fail", rid, _portable(exc)))
                out.flush()
                continue
            tickets[rid] = ticket
            ticket.future.add_done_callback(lambda f, rid=rid: (tickets.pop(rid, None), out.finished(rid, f)))
        elif msg[0] == "cancel":
            ticket = tickets.get(msg[1])
            if ticket is not None:
                ticket.cancel()
        elif msg[0] == "close":
            break
    scheduler.close()
    try:
        out.flush()
    except OSError:
        pass
