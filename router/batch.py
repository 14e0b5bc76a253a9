"""The OpenAI Batch API's durable side: files and batches in JetStream, their lines run by every router's workers.

Where things live (names in shared/transport/messaging.py):
- `FILES_BUCKET` (Object Store): each file's bytes under its id: uploaded input, the output and error files; and
  a line's result too large for one KV entry, as `result.<batch id>.<token>` until its batch ends.
- `BATCH_BUCKET` (KV): `file.<id>` and `batch.<id>` records (JSON, OpenAI's fields plus `_`-prefixed internal
  ones: owner, key hash, counts); `active.<batch id>` exists while a batch is not final.
- `BATCH_STREAM`: the work queue. One message per valid line, on `tierline.batch.work.<batch id>`, with
  `Nats-Msg-Id: <batch id>.<line>` (publishing again after a crash adds nothing); a message leaves the
  stream when a worker acks it, after the line's result is written.
- `RESULTS_BUCKET` (KV): `<batch id>.<line>` -> the line's output line, written with `create`: the first
  write wins, so a line run twice (its worker died after answering, before acking) is answered once. A larger
  one is `{"_object": its name}` there, its object named first by `<batch id>.objects.<token>`, so it is
  found and removed with the batch however its writer stopped. Everything under `<batch id>.` goes when the
  batch ends, and a result written after that (a line that finished after a cancel) is removed by its writer.

A batch's life, with OpenAI's statuses: `POST /v1/batches` writes the record `validating` and marks it
active. Each router runs a `BatchRunner`: its manager claims a validating batch (a lease in the record),
checks every line (a bad line becomes an error line now, never a failed batch) and queues the rest, then
marks it `in_progress`. Workers pull lines, run each through the router exactly as the HTTP API would
(`OpenAIServer.respond`: the caller's key and quota, the routing policy, so easy lines stay on the device
and edge tiers) at the lowest priority, write the result, ack. When the batch's subject is empty the
manager finalizes: every line without a result gets one (cancelled, expired or dead-lettered, again by
`create`), the output and error files are written in line order, the record becomes final. Every step
is idempotent, so a router killed anywhere is replaced by any other (or itself restarted) and the batch
completes with each line answered exactly once.

Retries: a line a tier fails (5xx) is redelivered (`nak` with a delay) up to `max_attempts` runs; the
consumer's `max_deliver` is one more, a delivery that only writes the line's dead letter (its worker died
on every attempt). A worker on a long line tells JetStream it is alive (`in_progress`) every third of
`ack_wait_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import secrets
import time
from dataclasses import dataclass, field

from tierline_api.v1 import inference_pb2 as pb
from tierline_router.cascade import cost
from tierline_router.openai_http import BadRequest, error_body
from tierline_shared.transport.messaging import (
    BATCH_BUCKET,
    BATCH_CONSUMER,
    BATCH_STREAM,
    FILES_BUCKET,
    RESULTS_BUCKET,
    TierError,
    batch_subject,
    kv_change,
    kv_get,
)

log = logging.getLogger("tierline.router.batch")

ENDPOINTS = {"/v1/completions": False, "/v1/chat/completions": True}  # batch endpoint -> is chat
COMPLETION_WINDOWS = {"24h": 24 * 3600}  # what OpenAI accepts, in seconds
FINAL = ("completed", "failed", "expired", "cancelled")
JS_TIMEOUT_S = 10.0  # one JetStream API call, at most
TICK_S = 0.5  # how often the manager looks at the active batches
LEASE_S = 30.0  # a manager validating a batch holds it this long; another takes over after
RETRY_DELAY_S = 1.0  # a line a tier failed waits this long per attempt before it runs again
DUPLICATE_WINDOW_S = 24 * 3600  # Nats-Msg-Id deduplication of queued lines
PUBLISH_CONCURRENCY = 256  # lines queued at once
FETCH_MAX = 1000  # messages one bulk read asks for at a time
CACHE_S = 1.0  # workers re-read a batch's record (cancelled?) at most this often
CACHE_MAX = 1000  # records kept for workers before the old ones are dropped
MAX_METADATA = 16  # metadata pairs, as OpenAI
HEADERS_ROOM = 1024  # bytes of a NATS message's max_payload kept for its headers (Nats-Msg-Id, KV's expected sequence)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def public(record: dict) -> dict:
    """A record as the API shows it: the internal (`_`) fields left out."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


class BatchUnavailable(Exception):
    """JetStream is not there (the NATS server runs without it, or the router may not use it)."""


@dataclass
class Line:
    """One input line, checked: `body` to run, or `error` (the reason it never reaches the endpoint)."""

    n: int  # its place among the file's non-empty lines, from 0
    custom_id: str | None
    number: int = 0  # its line number in the file, from 1 (blank lines counted), as errors name it
    body: dict | None = None
    error: dict | None = None  # {"code", "message"}, or an HTTP error answer: {"status_code", "body"}
    request: dict = field(default_factory=dict)


def queued(line: Line) -> bytes:
    """A valid line as the work queue carries it (`BatchStore.enqueue`)."""
    return json.dumps({"n": line.n, "custom_id": line.custom_id, "body": line.body}).encode()


def _raw_lines(data: bytes):
    """The file's non-blank lines and their numbers (from 1, blank lines counted), one at a time: a file of
    millions of short lines is never split into a list of them all at once."""
    for number, raw in enumerate(io.BytesIO(data), 1):
        if raw.strip():
            yield number, raw[:-1] if raw.endswith(b"\n") else raw


def count_lines(data: bytes) -> int:
    """The requests in a batch file (its non-blank lines). CPU work on the whole file: run it off the event loop."""
    return sum(1 for _ in _raw_lines(data))


def parse_lines(data: bytes, endpoint: str, parse, max_bytes: int | None = None) -> list[Line]:
    """The file's lines, each checked on its own: JSON, `custom_id` (unique), `method`, `url` (the batch's
    endpoint), then its body as the endpoint reads it (`parse(body, chat)` raises BadRequest), and, given
    `max_bytes`, its size in the work queue (one NATS message: a larger one could never be queued, and the
    batch would never leave `validating`). CPU work on the whole file: run it off the event loop."""
    chat, seen, lines = ENDPOINTS[endpoint], set(), []
    for number, raw in _raw_lines(data):
        line = Line(len(lines), None, number)
        lines.append(line)
        try:
            item = json.loads(raw)
        except (ValueError, RecursionError):
            line.error = {"code": "invalid_json", "message": f"line {number}: not a JSON object (UTF-8)"}
            continue
        if not isinstance(item, dict):
            line.error = {"code": "invalid_json", "message": f"line {number}: not a JSON object"}
            continue
        cid = item.get("custom_id")
        line.custom_id = cid if isinstance(cid, str) else None
        problem = None
        if not isinstance(cid, str) or not cid:
            problem = ("missing_custom_id", "custom_id: required, a non-empty string")
        elif cid in seen:
            problem = ("duplicate_custom_id", f"custom_id: {cid!r} is used by an earlier line")
        elif item.get("method") != "POST":
            problem = ("invalid_method", f"method: must be POST, got {item.get('method')!r}")
        elif item.get("url") != endpoint:
            problem = ("invalid_url", f"url: must be the batch's endpoint {endpoint}, got {item.get('url')!r}")
        elif not isinstance(item.get("body"), dict):
            problem = ("invalid_body", "body: must be a JSON object")
        if isinstance(cid, str):
            seen.add(cid)
        if problem:
            line.error = {"code": problem[0], "message": f"line {number}: {problem[1]}"}
            continue
        try:
            parse(item["body"], chat)
            if item["body"].get("stream"):
                raise BadRequest("stream", "stream: a batch line cannot stream; leave stream out")
        except BadRequest as exc:
            status, body = error_body(exc, chat)  # what the HTTP API would have answered
            line.error = {"status_code": status, "body": body}
            continue
        except Exception as exc:  # noqa: BLE001 - a bug reading one line: that line fails, never the batch
            log.exception("batch line %d: could not be read", number)
            status, body = error_body(TierError("router", "INTERNAL", f"the line could not be read: "
                                                                      f"{type(exc).__name__}"), chat)
            line.error = {"status_code": status, "body": body}
            continue
        line.body = item["body"]
        if max_bytes is not None and (size := len(queued(line))) > max_bytes:
            line.body, line.error = None, {"code": "line_too_large", "message": f"line {number}: {size} bytes "
                                           f"once queued; a batch line holds at most {max_bytes} (the NATS server's "
                                           f"max_payload less {HEADERS_ROOM} for headers)"}
    return lines


def output_line(batch_id: str, line: Line | int, custom_id: str | None, status: int | None = None,
                body: dict | None = None, error: dict | None = None) -> dict:
    """One line of the output or error file, in OpenAI's shape."""
    n = line.n if isinstance(line, Line) else line
    response = None if status is None else {"status_code": status, "request_id": (body or {}).get("id", ""),
                                            "body": body}
    return {"id": f"batch_req_{batch_id.removeprefix('batch_')}_{n}", "custom_id": custom_id,
            "response": response, "error": error, "_n": n}


def is_success(result: dict) -> bool:
    return result.get("response") is not None and result["response"]["status_code"] == 200


class BatchStore:
    """The JetStream side: buckets and the work queue, bound (or created) once."""

    def __init__(self, nc, ack_wait_s: float, max_attempts: int):
        self.nc = nc
        self.js = nc.jetstream(timeout=JS_TIMEOUT_S)
        self.ack_wait_s, self.max_attempts = ack_wait_s, max_attempts
        self.files = self.records = self.results = None

    @property
    def max_bytes(self) -> int:
        """The most one queued line or one line's result may take: a NATS message, less room for its headers."""
        return self.nc.max_payload - HEADERS_ROOM

    async def open(self) -> "BatchStore":
        from nats.js.api import ConsumerConfig, RetentionPolicy, StreamConfig
        from nats.js.errors import BadRequestError, NoStreamResponseError, ServiceUnavailableError

        try:
            self.files = await self.js.create_object_store(FILES_BUCKET)
            self.records = await self.js.create_key_value(bucket=BATCH_BUCKET, history=1)
            self.results = await self.js.create_key_value(bucket=RESULTS_BUCKET, history=1)
            await self.js.add_stream(StreamConfig(
                name=BATCH_STREAM, subjects=[batch_subject("*")], retention=RetentionPolicy.WORK_QUEUE,
                duplicate_window=DUPLICATE_WINDOW_S))
            self.consumer_config = ConsumerConfig(
                durable_name=BATCH_CONSUMER, ack_wait=self.ack_wait_s, max_deliver=self.max_attempts + 1,
                max_ack_pending=10_000, filter_subject=batch_subject("*"))
        except BadRequestError as exc:  # a stream of that name exists with another configuration
            raise BatchUnavailable(f"the Batch API's JetStream streams exist with another configuration "
                                   f"({exc.description}): {await self._foreign()}") from None
        except (NoStreamResponseError, ServiceUnavailableError, asyncio.TimeoutError) as exc:
            raise BatchUnavailable(f"JetStream is not available on the NATS server ({type(exc).__name__}: "
                                   f"{exc}); the Batch API needs it (nats-server -js)") from None
        if foreign := await self._foreign():  # created before by someone else: not used, whatever they carry
            raise BatchUnavailable(f"the Batch API's JetStream streams are not its own: {foreign}")
        return self

    async def _foreign(self) -> str:
        """The Batch API's streams whose subjects are not its own, and an operator's way out ('' when none)."""
        own = {BATCH_STREAM: [batch_subject("*")], f"KV_{BATCH_BUCKET}": [f"$KV.{BATCH_BUCKET}.>"],
               f"KV_{RESULTS_BUCKET}": [f"$KV.{RESULTS_BUCKET}.>"],
               f"OBJ_{FILES_BUCKET}": [f"$O.{FILES_BUCKET}.C.>", f"$O.{FILES_BUCKET}.M.>"]}
        wrong = []
        for name, subjects in own.items():
            try:
                found = list((await self.js.stream_info(name)).config.subjects or [])
            except Exception:  # noqa: BLE001 - not there or unreadable: nothing to name
                continue
            if sorted(found) != sorted(subjects):
                wrong.append(f"stream {name} has subjects {found}, not {subjects}")
        return "; ".join(wrong) + (" (an operator must delete them; the router creates them again)" if wrong else "")

    async def subscribe(self):
        return await self.js.pull_subscribe(batch_subject("*"), durable=BATCH_CONSUMER, stream=BATCH_STREAM,
                                            config=self.consumer_config)

    # -- records (KV) ---------------------------------------------------------------------------------------
    async def get(self, key: str) -> tuple[dict | None, int]:
        return await kv_get(self.records, key)

    async def change(self, key: str, change) -> dict | None:
        """`change(record) -> new record or None (leave it)`, by compare-and-set; None when there is no record."""
        return await kv_change(self.records, key, lambda record: None if record is None else change(record))

    async def put_record(self, key: str, record: dict) -> None:
        await self.records.put(key, json.dumps(record).encode())

    async def _subjects(self, bucket: str, pattern: str) -> dict[str, int]:
        """The KV bucket's subjects matching `pattern` (its keys, deleted ones' markers included): message counts."""
        info = await self.js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.{pattern}")
        return info.state.subjects or {}

    async def active(self) -> list[str]:
        """The batches not yet final (`active.<id>`, removed whole when a batch ends: no delete marker stays)."""
        prefix = f"$KV.{BATCH_BUCKET}.active."
        return [s.removeprefix(prefix) for s in await self._subjects(BATCH_BUCKET, "active.*")]

    async def activate(self, batch_id: str) -> None:
        await self.records.put(f"active.{batch_id}", b"")

    async def deactivate(self, batch_id: str) -> None:
        await self.js.purge_stream(f"KV_{BATCH_BUCKET}", subject=f"$KV.{BATCH_BUCKET}.active.{batch_id}")

    async def values(self, bucket: str, pattern: str) -> list[dict]:
        """Every live value of the keys matching `pattern`, read in bulk by a consumer of their latest messages.

        Counted, not watched: the keys there are are counted first (stream info), and exactly that many
        messages are read, so no entry can be missed (nats-py's KV watch can report "no more" before the
        entries already on their way have arrived)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        subject = f"$KV.{bucket}.{pattern}"
        expected = len(await self._subjects(bucket, pattern))
        if not expected:
            return []
        sub = await self.js.pull_subscribe(subject, stream=f"KV_{bucket}", config=ConsumerConfig(
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE, mem_storage=True,
            inactive_threshold=JS_TIMEOUT_S))
        values, seen = [], 0
        try:
            while seen < expected:
                for msg in await sub.fetch(min(expected - seen, FETCH_MAX), timeout=JS_TIMEOUT_S):
                    seen += 1
                    if not (msg.headers and "KV-Operation" in msg.headers):  # a delete or purge marker
                        values.append(json.loads(msg.data))
        finally:
            await sub.unsubscribe()
        return values

    # -- files (Object Store) ---------------------------------------------------------------------------------
    async def put_file(self, owner: str, filename: str, purpose: str, data: bytes, file_id: str | None = None,
                       lines: int | None = None) -> dict:
        """Store a file and its record; `lines`: the requests a batch input file holds (`count_lines`), kept so
        that creating a batch on it need not read it again."""
        file_id = file_id or new_id("file-")
        await self.files.put(file_id, data)
        record = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "_owner": owner}
        if lines is not None:
            record["_lines"] = lines
        await self.put_record(f"file.{file_id}", record)
        return record

    async def file_data(self, file_id: str) -> bytes:
        return (await self.files.get(file_id)).data

    async def delete_file(self, file_id: str) -> None:
        from nats.js.errors import NotFoundError, ObjectNotFoundError

        try:
            await self.files.delete(file_id)
        except (NotFoundError, ObjectNotFoundError):
            pass
        await self.records.purge(f"file.{file_id}")

    # -- lines and results -------------------------------------------------------------------------------------
    async def enqueue(self, batch_id: str, lines: list[Line]) -> None:
        subject = batch_subject(batch_id)
        limit = asyncio.Semaphore(PUBLISH_CONCURRENCY)

        async def one(line: Line) -> None:
            async with limit:
                await self.js.publish(subject, queued(line), headers={"Nats-Msg-Id": f"{batch_id}.{line.n}"})

        await asyncio.gather(*(one(line) for line in lines))

    async def remaining(self, batch_id: str) -> int:
        """Lines of the batch still in the work queue (waiting, or run and not yet acked)."""
        subject = batch_subject(batch_id)
        info = await self.js.stream_info(BATCH_STREAM, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)

    async def drop_queued(self, batch_id: str) -> None:
        await self.js.purge_stream(BATCH_STREAM, subject=batch_subject(batch_id))

    async def write_result(self, batch_id: str, result: dict) -> dict | None:
        """The line's result as written, unless it has one already (None then). One too large for a KV entry (n
        choices with logprobs of a long context) is kept whole in the Object Store, its KV entry saying where (and
        the result returned naming it, `_object`, for its writer to remove should the batch have ended)."""
        from nats.js.errors import KeyWrongLastSequenceError

        value = json.dumps(result).encode()
        token = None
        if len(value) > self.max_bytes:
            token = secrets.token_hex(8)
            await self.results.put(f"{batch_id}.objects.{token}", b"")  # first: drop_results finds it from here
            await self.files.put(_result_object(batch_id, token), value)
            value = json.dumps({"_n": result["_n"], "_object": _result_object(batch_id, token)}).encode()
        try:
            await self.results.create(f"{batch_id}.{result['_n']}", value)
            return result if token is None else {**result, "_object": _result_object(batch_id, token)}
        except KeyWrongLastSequenceError:
            if token:  # another run's result was first: this one's object goes now, its name with the batch
                await self._drop_object(_result_object(batch_id, token))
            return None

    async def has_result(self, batch_id: str, n: int) -> bool:
        from nats.js.errors import KeyDeletedError, KeyNotFoundError

        try:
            await self.results.get(f"{batch_id}.{n}")
            return True
        except (KeyNotFoundError, KeyDeletedError):
            return False

    async def all_results(self, batch_id: str) -> dict[int, dict]:
        results = {}
        for r in await self.values(RESULTS_BUCKET, f"{batch_id}.*"):
            if "_object" in r:  # too large for its KV entry
                r = json.loads(await self.file_data(r["_object"]))
            results[r["_n"]] = r
        return results

    async def drop_results(self, batch_id: str, objects: tuple[str, ...] = ()) -> None:
        """Remove the batch's results: the objects its large ones are kept in (those its keys name, and `objects`:
        a writer's own, whose key another drop may have removed while it was written), then every key under
        `<batch id>.`."""
        prefix = f"$KV.{RESULTS_BUCKET}.{batch_id}.objects."
        named = [_result_object(batch_id, subject.removeprefix(prefix))
                 for subject in await self._subjects(RESULTS_BUCKET, f"{batch_id}.objects.*")]
        for name in dict.fromkeys([*named, *objects]):
            await self._drop_object(name)
        await self.js.purge_stream(f"KV_{RESULTS_BUCKET}", subject=f"$KV.{RESULTS_BUCKET}.{batch_id}.>")

    async def _drop_object(self, name: str) -> None:
        """An object removed whole: its chunks and its meta (`ObjectStore.delete` leaves a deleted marker)."""
        import base64

        from nats.js.errors import ObjectNotFoundError
        from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_META_PRE_TEMPLATE, OBJ_STREAM_TEMPLATE

        try:
            info = await self.files.get_info(name, show_deleted=True)
        except ObjectNotFoundError:  # never written (its writer stopped first), or removed already
            return
        stream = OBJ_STREAM_TEMPLATE.format(bucket=FILES_BUCKET)
        await self.js.purge_stream(stream, subject=OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=FILES_BUCKET, obj=info.nuid))
        meta = base64.urlsafe_b64encode(name.encode()).decode()
        await self.js.purge_stream(stream, subject=OBJ_META_PRE_TEMPLATE.format(bucket=FILES_BUCKET, obj=meta))

    async def stuck(self, batch_id: str) -> list[tuple[int, dict]]:
        """Queued lines no worker will get again (delivered `max_deliver` times, never acked): (seq, line)."""
        from nats.js.errors import NotFoundError

        info = await self.js.consumer_info(BATCH_STREAM, BATCH_CONSUMER)
        if info.num_pending or info.num_ack_pending:
            return []  # something is still on its way to a worker, or in one's hands
        out, seq = [], 0
        while True:
            try:
                msg = await self.js.get_msg(BATCH_STREAM, seq=seq + 1, subject=batch_subject(batch_id), next=True)
            except NotFoundError:
                return out
            seq = msg.seq
            out.append((seq, json.loads(msg.data)))

    async def delete_queued(self, seq: int) -> None:
        await self.js.delete_msg(BATCH_STREAM, seq)


def _result_object(batch_id: str, token: str) -> str:
    """The Object Store name of a result too large for its KV entry (`BatchStore.write_result`)."""
    return f"result.{batch_id}.{token}"


def batch_record(batch_id: str, owner: str, key_hash: str | None, input_file_id: str, endpoint: str,
                 window: str, metadata: dict | None) -> dict:
    now = int(time.time())
    return {"id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": input_file_id,
            "completion_window": window, "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": now, "in_progress_at": None, "expires_at": now + COMPLETION_WINDOWS[window],
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata, "_owner": owner, "_key": key_hash, "_queued": 0, "_invalid": 0, "_failed": 0,
            "_ending": None, "_lease": 0}


class BatchRunner:
    """One router's share of the batch work: `workers` lines at a time, and the manager of active batches."""

    def __init__(self, store: BatchStore, api, workers: int, max_attempts: int, ack_wait_s: float,
                 costs: dict[str, float] | None = None):
        self.store, self.api = store, api  # api: the OpenAIServer whose `respond` answers a line
        self.costs = costs  # the manifest's cost_per_1k_tokens by tier: a finished batch says what it cost
        self.workers, self.max_attempts, self.ack_wait_s = workers, max_attempts, ack_wait_s
        self._tasks: list[asyncio.Task] = []
        self._busy: dict[str, asyncio.Task] = {}  # batch id -> the manager's task on it
        self._records: dict[str, tuple[float, dict | None]] = {}  # batch id -> (read at, record), for workers
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pull(), name="batch-workers"),
                       asyncio.create_task(self._manage(), name="batch-manager")]

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks + list(self._busy.values()):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._busy.values(), return_exceptions=True)

    # -- workers ----------------------------------------------------------------------------------------------
    async def _pull(self) -> None:
        import nats.errors

        sub = await self.store.subscribe()
        idle, freed = self.workers, asyncio.Event()
        running: set[asyncio.Task] = set()

        def done(task: asyncio.Task) -> None:
            nonlocal idle
            running.discard(task)
            idle += 1
            freed.set()

        try:
            while not self._stop.is_set():
                while idle == 0:
                    freed.clear()
                    await freed.wait()
                try:
                    msgs = await sub.fetch(idle, timeout=1.0)  # as many lines as there are idle workers
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                except Exception as exc:  # noqa: BLE001 - the link is down, say: wait, then ask again
                    log.warning("batch: fetching lines failed: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
                for msg in msgs:
                    idle -= 1
                    task = asyncio.create_task(self._line(msg))
                    running.add(task)
                    task.add_done_callback(done)
        finally:  # a fetch cut short leaves its pull request open: a drain of the connection would wait on it
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _record(self, batch_id: str) -> dict | None:
        read_at, record = self._records.get(batch_id, (0.0, None))
        if time.monotonic() - read_at > CACHE_S:
            if len(self._records) > CACHE_MAX:  # batches long gone
                self._records = {b: v for b, v in self._records.items() if time.monotonic() - v[0] < 60}
            record, _ = await self.store.get(f"batch.{batch_id}")
            self._records[batch_id] = (time.monotonic(), record)
        return record

    async def _line(self, msg) -> None:
        batch_id = msg.subject.rsplit(".", 1)[-1]
        try:
            item = json.loads(msg.data)
            record = await self._record(batch_id)
            if record is None or record["status"] in FINAL or record["_ending"] or \
                    await self.store.has_result(batch_id, item["n"]):
                await msg.ack()  # nothing left to do for it (the finalizer answers what is not run)
                return
            delivered = msg.metadata.num_delivered
            if delivered > self.max_attempts:  # its workers died on every attempt: the dead letter
                await self._dead_letter(batch_id, item, delivered - 1)
                await msg.ack()
                return
            status, body, quota = await self._run(msg, record, item)
            # the tiers failed it, or every tier's queue was full (a 429 that is not the key's quota): again, later
            if (status >= 500 or status == 429 and not quota) and delivered < self.max_attempts:
                await msg.nak(delay=RETRY_DELAY_S * delivered)
                return
            await self._settle(batch_id, output_line(batch_id, item["n"], item["custom_id"], status, body))
            await msg.ack_sync()
        except Exception:  # noqa: BLE001 - this line's failure is this line's: redelivered after ack_wait
            log.exception("batch %s: a line failed unexpectedly", batch_id)

    async def _run(self, msg, record: dict, item: dict) -> tuple[int, dict, bool]:
        """The line answered as the HTTP API answers it, telling JetStream it is alive meanwhile: (HTTP status,
        body, whether a refusal is the key's quota, which only its reset ends: `retry-after`)."""
        from tierline_router.auth import HashedKey

        async def alive() -> None:
            while True:
                await asyncio.sleep(self.ack_wait_s / 3)
                await msg.in_progress()

        keepalive = asyncio.create_task(alive())
        try:
            key = HashedKey(record["_key"]) if record["_key"] else None
            resp = await self.api.respond(item["body"], key, ENDPOINTS[record["endpoint"]],
                                          priority=pb.PRIORITY_LOW)
        finally:
            keepalive.cancel()
        return resp.status, json.loads(resp.body), "retry-after" in resp.headers

    async def _dead_letter(self, batch_id: str, item: dict, attempts: int) -> None:
        """A line no worker ever finished (each stopped mid-line), in the error file instead of an answer."""
        await self._settle(batch_id, output_line(batch_id, item["n"], item["custom_id"], error={
            "code": "max_deliveries_exceeded",
            "message": f"no answer after {attempts} attempts (each worker stopped mid-line)"}))

    async def _settle(self, batch_id: str, result: dict) -> None:
        """Write a line's result (once); a failure counts toward the batch's `failed` while it runs. A batch that
        ended as the line ran (cancelled, expired) has had its results removed: so is this one, once written."""
        written = await self.store.write_result(batch_id, result)
        if written is None:
            return

        def count(r: dict) -> dict | None:
            if r["status"] in FINAL or is_success(written):
                return None  # a read, no change
            return {**r, "_failed": r["_failed"] + 1}

        # the record read after the write: a batch not final then drops its results after it is, this one with them
        record = await self.store.change(f"batch.{batch_id}", count)
        if record is None or record["status"] in FINAL:
            await self.store.drop_results(batch_id, tuple(filter(None, [written.get("_object")])))

    # -- the manager ------------------------------------------------------------------------------------------
    async def _manage(self) -> None:
        while not self._stop.is_set():
            try:
                for batch_id in await self.store.active():
                    if batch_id not in self._busy:
                        task = asyncio.create_task(self._advance(batch_id))
                        self._busy[batch_id] = task
                        task.add_done_callback(lambda t, b=batch_id: self._busy.pop(b, None))
            except Exception as exc:  # noqa: BLE001 - the link is down, say: look again at the next tick
                log.warning("batch: listing active batches failed: %s", exc)
            try:
                await asyncio.wait_for(self._stop.wait(), TICK_S)
            except asyncio.TimeoutError:
                pass

    async def _advance(self, batch_id: str) -> None:
        """One look at an active batch: move it on if it can."""
        try:
            record, _ = await self.store.get(f"batch.{batch_id}")
            if record is None or record["status"] in FINAL:  # finished by another router (or before a crash)
                await self.store.drop_results(batch_id)  # first: the batch stays active until it is done
                await self.store.deactivate(batch_id)
                return
            now = time.time()
            if record["status"] == "validating" and now < record["expires_at"]:  # past it: expired, however far
                if record["_lease"] < now:
                    await self._validate(batch_id)
                return
            if record["_ending"] is None:
                if record["status"] == "cancelling":
                    ending = "cancelled"
                elif now >= record["expires_at"]:
                    ending = "expired"
                elif await self.store.remaining(batch_id) == 0:
                    ending = "completed"
                else:
                    for seq, item in await self.store.stuck(batch_id):
                        await self._dead_letter(batch_id, item, self.max_attempts + 1)
                        await self.store.delete_queued(seq)
                    return
                ending = record["_ending"] = ending

                def decide(r):
                    if r["_ending"] is not None:
                        return None
                    stamp = {"completed": "finalizing_at"}.get(ending)
                    return {**r, "_ending": ending, **({"status": "finalizing", stamp: int(now)} if stamp else {})}

                record = await self.store.change(f"batch.{batch_id}", decide)
            await self._finalize(batch_id, record)
        except Exception:  # noqa: BLE001 - tried again at the next tick (every step is idempotent)
            log.exception("batch %s: could not advance it", batch_id)

    async def _validate(self, batch_id: str) -> None:
        """Claim the batch (a lease), check its lines, queue the valid ones, mark it in_progress."""
        me = secrets.token_hex(4)

        def claim(r):
            if r["status"] != "validating" or r["_lease"] >= time.time():
                return None
            return {**r, "_lease": time.time() + LEASE_S, "_claimed_by": me}

        record = await self.store.change(f"batch.{batch_id}", claim)
        if record is None or record.get("_claimed_by") != me:
            return
        try:
            data = await self.store.file_data(record["input_file_id"])
        except Exception as exc:  # noqa: BLE001 - the file is gone: the batch cannot run
            error = {"code": "invalid_file", "message": f"the input file could not be read: {exc}",
                     "param": "input_file_id", "line": None}
            await self.store.change(f"batch.{batch_id}", lambda r: {
                **r, "status": "failed", "failed_at": int(time.time()), "errors": {"object": "list", "data": [error]}})
            return
        lines = await asyncio.to_thread(parse_lines, data, record["endpoint"], self.api.parse, self.store.max_bytes)
        invalid = [line for line in lines if line.error]
        for line in invalid:
            err = line.error
            result = (output_line(batch_id, line, line.custom_id, err["status_code"], err["body"])
                      if "status_code" in err else output_line(batch_id, line, line.custom_id, error={
                          **err, "line": line.number}))
            await self.store.write_result(batch_id, result)
        await self.store.enqueue(batch_id, [line for line in lines if line.body is not None])
        counts = {"total": len(lines), "completed": 0, "failed": len(invalid)}
        record = await self.store.change(f"batch.{batch_id}", lambda r: None if r["status"] != "validating" else {
            **r, "status": "in_progress", "in_progress_at": int(time.time()), "request_counts": counts,
            "_queued": len(lines) - len(invalid), "_invalid": len(invalid)})
        if record is None or record["status"] in FINAL:  # cancelled and ended meanwhile: these error lines go too
            await self.store.drop_results(batch_id)

    async def _finalize(self, batch_id: str, record: dict) -> None:
        """Every line answered once (what never ran gets its reason), the files written, the record final."""
        ending = record["_ending"]
        if ending != "completed":
            await self.store.drop_queued(batch_id)
        results = await self.store.all_results(batch_id)
        total = record["request_counts"]["total"]
        if ending != "completed" or len(results) < total:  # what never ran (or was never read: cancelled early)
            from nats.js.errors import NotFoundError, ObjectNotFoundError

            code = {"cancelled": "batch_cancelled", "expired": "batch_expired"}.get(ending, "not_run")
            message = f"the batch was {ending} before this line ran"
            try:
                data = await self.store.file_data(record["input_file_id"])
                lines = [(line.n, line.custom_id) for line in
                         await asyncio.to_thread(parse_lines, data, record["endpoint"], self.api.parse)]
            except (NotFoundError, ObjectNotFoundError):  # deleted as the batch ran (DELETE checks first)
                lines = [(n, None) for n in range(total)]
                message += " (its input file was deleted, so its custom_id is unknown)"
            for n, custom_id in lines:
                if n not in results:
                    await self.store.write_result(batch_id, output_line(batch_id, n, custom_id, error={
                        "code": code, "message": message}))
            results = await self.store.all_results(batch_id)
        ok = [results[n] for n in sorted(results) if is_success(results[n])]
        bad = [results[n] for n in sorted(results) if not is_success(results[n])]
        hex_id = batch_id.removeprefix("batch_")
        out_id = err_id = None
        if ok:
            out_id = (await self.store.put_file(record["_owner"], f"{batch_id}_output.jsonl", "batch_output",
                                                await asyncio.to_thread(_jsonl, ok), f"file-{hex_id}-output"))["id"]
        if bad:
            err_id = (await self.store.put_file(record["_owner"], f"{batch_id}_errors.jsonl", "batch_output",
                                                await asyncio.to_thread(_jsonl, bad), f"file-{hex_id}-errors"))["id"]
        tiers: dict[str, int] = {}
        paid: dict[str, int] = {}
        for r in ok:
            body = r["response"]["body"] or {}
            tiers[body.get("tier", "")] = tiers.get(body.get("tier", ""), 0) + 1
            for tier, tokens in (body.get("tierline") or {}).get("paid_tokens", {}).items():
                paid[tier] = paid.get(tier, 0) + tokens
        now = int(time.time())
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[ending]

        def final(r):
            if r["status"] in FINAL:
                return None
            return {**r, "status": ending, stamp: now, "output_file_id": out_id, "error_file_id": err_id,
                    "request_counts": {"total": len(results), "completed": len(ok), "failed": len(bad)},
                    "tierline": {"answered_by_tier": tiers, "paid_tokens": paid,
                                 "cost": round(cost(paid, self.costs), 6) if self.costs else None}}

        await self.store.change(f"batch.{batch_id}", final)
        await self.store.drop_results(batch_id)  # first: the batch stays active until it is done
        await self.store.deactivate(batch_id)


def _jsonl(results: list[dict]) -> bytes:
    return b"".join(json.dumps({k: v for k, v in r.items() if k != "_n"}).encode() + b"\n" for r in results)
