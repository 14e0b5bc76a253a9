"""The OpenAI Batch API's endpoints on the router's HTTP server: /v1/files and /v1/batches.

`POST /v1/files` (multipart: `purpose=batch`, `file`; other fields are refused, OpenAI's `expires_after` too: files
are kept until deleted), `GET /v1/files` (`purpose`, `limit`, `after`,
`order`), `GET /v1/files/{id}[/content]`, `DELETE /v1/files/{id}`; `POST /v1/batches` (`input_file_id`,
`endpoint`, `completion_window`, `metadata`), `GET /v1/batches[/{id}]` (`limit`, `after`), `POST
/v1/batches/{id}/cancel`. Every call needs a valid API key; a key sees only its own files and batches
(others' are 404), and a batch's lines run on its key's quota.
The work itself is router/batch.py's; without JetStream the endpoints answer 503.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import unicodedata

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError

from tierline_router.auth import bearer_token
from tierline_router.batch import (
    COMPLETION_WINDOWS,
    ENDPOINTS,
    FINAL,
    MAX_METADATA,
    BatchRunner,
    BatchStore,
    BatchUnavailable,
    batch_record,
    count_lines,
    new_id,
    public,
)
from tierline_router.openai_http import (
    BadRequest,
    _cut,
    _error_response,
    _shown,
    _unencodable,
    arriving,
    coding_refused,
    content_codings,
    read_json,
)
from tierline_shared.transport.messaging import BATCH_BUCKET, TierError

log = logging.getLogger("tierline.router.batch")

PURPOSES = ("batch",)  # what files are for here (OpenAI's other purposes serve features this API lacks)
FILE_PURPOSES = PURPOSES + ("batch_output",)  # what a file here can be: uploaded, or a batch's output or errors
METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 64, 512  # as OpenAI
MAX_FILENAME_CHARS = 255  # an upload's filename, as common filesystems bound a name
BIDI_CONTROLS = ("LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI")  # not in a filename (_filename)
FORM_FIELDS = ("purpose", "file")  # of POST /v1/files; OpenAI's `expires_after[...]` is refused (no expiry here)
_INTEGER = re.compile(r"-?[0-9]+")  # a query's integer (`limit`), as written in ASCII
_ID = re.compile(r"^[A-Za-z0-9_-]{1,80}$")  # file and batch ids (new_id), and nothing a KV key cannot be
LIST_LIMIT = (1, 100)  # `limit` of GET /v1/batches; 20 when not given
FILES_LIMIT = (1, 10_000)  # `limit` of GET /v1/files; 10,000 when not given (as OpenAI)
ORDERS = ("asc", "desc")  # `order` of GET /v1/files, by created_at; desc when not given


def _answered(handler):
    """The one place a failure (a refused key, a bad field, no JetStream) becomes the endpoint's HTTP answer."""
    @functools.wraps(handler)
    async def answer(self, request: web.Request) -> web.Response:
        try:
            return await handler(self, request)
        except TierError as exc:
            return _error_response(exc)
    return answer


class BatchApi:
    """The endpoints, and this router's `BatchRunner`, once JetStream is bound (`start`)."""

    def __init__(self, server, config, costs: dict[str, float] | None = None):
        self.server, self.config = server, config  # server: the OpenAIServer (keys, `respond`, `parse`)
        self.costs = costs  # the manifest's cost_per_1k_tokens by tier
        self.store: BatchStore | None = None
        self.runner: BatchRunner | None = None
        self.unavailable = "the Batch API is starting"
        server.app.add_routes([
            web.post("/v1/files", self.upload), web.get("/v1/files", self.list_files),
            web.get("/v1/files/{id}", self.get_file), web.get("/v1/files/{id}/content", self.file_content),
            web.delete("/v1/files/{id}", self.delete_file),
            web.post("/v1/batches", self.create), web.get("/v1/batches", self.list_batches),
            web.get("/v1/batches/{id}", self.get_batch), web.post("/v1/batches/{id}/cancel", self.cancel)])

    async def start(self, nc) -> None:
        c = self.config
        try:
            self.store = await BatchStore(nc, c.ack_wait_s, c.max_attempts).open()
        except BatchUnavailable as exc:
            self.unavailable = str(exc)
            log.warning("batch API off: %s", exc)
            return
        self.runner = BatchRunner(self.store, self.server, c.workers, c.max_attempts, c.ack_wait_s, self.costs)
        self.runner.start()

    async def stop(self) -> None:
        if self.runner:
            await self.runner.stop()

    async def _caller(self, request: web.Request) -> tuple[str, str | None]:
        """(owner, key hash) of a valid key; TierError otherwise, or 503 without JetStream."""
        owner, key_hash = await self.server.router.gate.identify(bearer_token(request.headers))
        if self.store is None:
            raise TierError("router", "UNAVAILABLE", self.unavailable)
        return owner, key_hash

    async def _owned(self, kind: str, ident: str, owner: str) -> dict:
        record = (await self.store.get(f"{kind}.{ident}"))[0] if _ID.match(ident) else None
        if record is None or record["_owner"] != owner:
            raise TierError("router", "NOT_FOUND", f"no {kind} {ident!r}")
        return record

    # -- files ------------------------------------------------------------------------------------------------
    @_answered
    async def upload(self, request: web.Request) -> web.Response:
        owner, _ = await self._caller(request)
        purpose, filename, data = await self._form(request)
        kept = sum(r["bytes"] for r in await self.store.values(BATCH_BUCKET, "file.*")
                   if r["_owner"] == owner and r["purpose"] in PURPOSES)
        if kept + len(data) > self.config.max_stored_mb * 1024 * 1024:
            raise BadRequest("file", f"file: this key keeps {kept / 2**20:.1f} MB of files already; with this one "
                                     f"({len(data) / 2**20:.1f} MB) it would keep more than the "
                                     f"{self.config.max_stored_mb} MB a key may (router.batch.max_stored_mb): "
                                     "delete files it no longer needs first")
        lines = await asyncio.to_thread(count_lines, data) if purpose == "batch" else None
        record = await _whole(self.store.put_file(owner, filename, purpose, data, lines=lines))
        return web.json_response(public(record))

    async def _form(self, request: web.Request) -> tuple[str, str, bytes]:
        """`purpose` and `file` from a multipart body, the file read up to the size limit."""
        if not request.content_type.startswith("multipart/"):
            raise BadRequest("file", "the body must be multipart/form-data with fields purpose and file")
        if [c for c in content_codings(request) if c != "identity"]:  # read as it streams in: not decoded here
            raise coding_refused("content-encoding: an upload is read as it comes (multipart/form-data): send it "
                                 "uncompressed")
        limit = self.config.max_file_mb * 1024 * 1024
        try:
            async with arriving(request, self.server.read_timeout_s):  # an upload that stops coming is a 408
                reader = await request.multipart()
                return await self._fields(reader, limit)
        except (ValueError, RequestPayloadError, HttpProcessingError) as exc:  # no boundary, a bad encoding...
            raise BadRequest("file", f"the multipart body could not be read: {exc}") from None

    async def _fields(self, reader, limit: int) -> tuple[str, str, bytes]:
        """The form's fields, each part a plain field (a nested multipart is refused)."""
        purpose = filename = data = None
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("file", "a part of the body is itself multipart; send purpose and file as fields")
            if part.name not in FORM_FIELDS:  # named, as the completion doors name an unsupported parameter
                name = part.name or "(unnamed)"
                if name.startswith("expires_after"):  # OpenAI's expires_after[anchor], expires_after[seconds]
                    raise BadRequest("expires_after", "expires_after: not supported here; files are kept until "
                                                      "deleted (DELETE /v1/files/{id})")
                name = _cut(name)
                raise BadRequest(name, f"{name}: unsupported field; send purpose and file")
            if part.name == "purpose":
                purpose = (await part.read(decode=True)).decode("utf-8", "replace")
            elif part.name == "file":
                filename, chunks, size = _filename(part.filename), [], 0
                while chunk := await part.read_chunk(1 << 16):
                    size += len(chunk)
                    if size > limit:
                        raise BadRequest("file", f"file: larger than the {self.config.max_file_mb} MB this "
                                                 f"server accepts (router.batch.max_file_mb)")
                    chunks.append(chunk)
                data = b"".join(chunks)
        if purpose not in PURPOSES:
            raise BadRequest("purpose", f"purpose: must be one of {', '.join(PURPOSES)}, got {purpose!r}")
        if data is None:
            raise BadRequest("file", "file: required")
        if not data.strip():
            raise BadRequest("file", "file: empty")
        return purpose, filename, data

    @_answered
    async def list_files(self, request: web.Request) -> web.Response:
        """The caller's files, newest first (`order=asc`: oldest first), `purpose` alone if given, a page of `limit`
        after the file `after` (the last id of the page before: its place, whatever the purpose asked)."""
        owner, _ = await self._caller(request)
        purpose, order, after = (request.query.get(name) for name in ("purpose", "order", "after"))
        if purpose is not None and purpose not in FILE_PURPOSES:
            raise BadRequest("purpose", f"purpose: one of {', '.join(FILE_PURPOSES)}, got {purpose!r}")
        if order is not None and order not in ORDERS:
            raise BadRequest("order", f"order: one of {', '.join(ORDERS)}, got {order!r}")
        limit = _int_query(request, "limit", FILES_LIMIT[1], FILES_LIMIT)
        files = [r for r in await self.store.values(BATCH_BUCKET, "file.*") if r["_owner"] == owner]
        files.sort(key=_place, reverse=order != "asc")
        files = _after(files, after, "file")
        return web.json_response(_page([r for r in files if purpose in (None, r["purpose"])], limit))

    @_answered
    async def get_file(self, request: web.Request) -> web.Response:
        owner, _ = await self._caller(request)
        record = await self._owned("file", request.match_info["id"], owner)
        return web.json_response(public(record))

    @_answered
    async def file_content(self, request: web.Request) -> web.Response:
        owner, _ = await self._caller(request)
        await self._owned("file", request.match_info["id"], owner)
        data = await self.store.file_data(request.match_info["id"])
        return web.Response(body=data, content_type="application/jsonl")

    @_answered
    async def delete_file(self, request: web.Request) -> web.Response:
        owner, _ = await self._caller(request)
        file_id = request.match_info["id"]
        await self._owned("file", file_id, owner)
        for batch_id in await self.store.active():  # its lines are read again when the batch ends
            record, _ = await self.store.get(f"batch.{batch_id}")
            if record is not None and record["input_file_id"] == file_id and record["status"] not in FINAL:
                raise TierError("router", "FAILED_PRECONDITION", f"file {file_id} is the input of batch {batch_id}, "
                                                                 "which has not ended; cancel it or wait for it first")
        await _whole(self.store.delete_file(file_id))
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    # -- batches ----------------------------------------------------------------------------------------------
    @_answered
    async def create(self, request: web.Request) -> web.Response:
        owner, key_hash = await self._caller(request)
        body = await read_json(request, self.server.read_timeout_s)
        if not isinstance(body, dict):
            raise BadRequest(None, "the body must be a JSON object")
        unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"})
        if unknown:
            raise BadRequest(unknown[0], f"{unknown[0]}: unsupported parameter")
        endpoint, window = body.get("endpoint"), body.get("completion_window")
        if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
            raise BadRequest("endpoint", f"endpoint: one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        if not isinstance(window, str) or window not in COMPLETION_WINDOWS:
            raise BadRequest("completion_window", f"completion_window: one of {', '.join(COMPLETION_WINDOWS)}, "
                                                  f"got {window!r}")
        metadata = _metadata(body.get("metadata"))
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise BadRequest("input_file_id", "input_file_id: required, the id of an uploaded file")
        try:
            file = await self._owned("file", file_id, owner)
        except TierError:
            raise BadRequest("input_file_id", f"input_file_id: no file {file_id!r}") from None
        if file["purpose"] != "batch":
            raise BadRequest("input_file_id", f"input_file_id: {file_id} has purpose {file['purpose']!r}, "
                                              f"not 'batch'")
        lines = file.get("_lines")  # counted at upload, off the event loop; not by routers before that
        if lines is None:
            lines = await asyncio.to_thread(count_lines, await self.store.file_data(file_id))
        if lines > self.config.max_lines:
            raise BadRequest("input_file_id", f"input_file_id: {lines} lines; a batch holds at most "
                                              f"{self.config.max_lines} (router.batch.max_lines)")
        batch_id = new_id("batch_")
        record = batch_record(batch_id, owner, key_hash, file_id, endpoint, window, metadata)
        async def store() -> None:
            await self.store.put_record(f"batch.{batch_id}", record)
            await self.store.activate(batch_id)  # the managers pick it up from here

        await _whole(store())
        return web.json_response(public(record))

    @_answered
    async def get_batch(self, request: web.Request) -> web.Response:
        owner, _ = await self._caller(request)
        record = await self._owned("batch", request.match_info["id"], owner)
        return web.json_response(await self._shown(record))

    async def _shown(self, record: dict) -> dict:
        """The record as the API shows it, with the counts of a running batch read from the work queue."""
        # lines done = lines queued less those still in the queue; not once a cancel or expiry has emptied it
        if record["status"] not in FINAL + ("validating",) and record["_ending"] in (None, "completed"):
            done = record["_queued"] - await self.store.remaining(record["id"])
            failed = record["_invalid"] + record["_failed"]
            record["request_counts"] = {"total": record["request_counts"]["total"],
                                        "completed": max(0, done - record["_failed"]), "failed": failed}
        return public(record)

    @_answered
    async def list_batches(self, request: web.Request) -> web.Response:
        owner, _ = await self._caller(request)
        limit = _int_query(request, "limit", 20, LIST_LIMIT)
        records = [r for r in await self.store.values(BATCH_BUCKET, "batch.*") if r["_owner"] == owner]
        records.sort(key=_place, reverse=True)
        return web.json_response(_page(_after(records, request.query.get("after"), "batch"), limit))

    @_answered
    async def cancel(self, request: web.Request) -> web.Response:
        owner, _ = await self._caller(request)
        batch_id = request.match_info["id"]
        record = await self._owned("batch", batch_id, owner)
        if record["status"] in FINAL and record["status"] != "cancelled":
            raise TierError("router", "FAILED_PRECONDITION", f"batch {batch_id} is {record['status']}: there is "
                                                             f"nothing left to cancel")
        now = int(time.time())
        record = await _whole(self.store.change(f"batch.{batch_id}", lambda r: None if r["status"] in FINAL or r[
            "_ending"] or r["status"] == "cancelling" else {**r, "status": "cancelling", "cancelling_at": now}))
        return web.json_response(await self._shown(record))


async def _whole(change):
    """Await a change of the stored files and batches to its end even when the client goes away meanwhile (its
    handler is cancelled: router/openai_http.py): a file without its record, a batch record never activated, would
    otherwise stay behind."""
    return await asyncio.shield(change)


def _place(record: dict) -> tuple[int, str]:
    """A file's or batch's place in a list: by created_at (seconds), then id."""
    return record["created_at"], record["id"]


def _after(records: list[dict], after: str | None, what: str) -> list[dict]:
    """The records after the one `after` names (the last id of the page before), all of them without it; a cursor
    naming none of the caller's is the client's mistake (a 400), not an empty last page."""
    if after is None:
        return records
    ids = [r["id"] for r in records]
    if after not in ids:
        raise BadRequest("after", f"after: no {what} {after!r}; give the last id of the page before")
    return records[ids.index(after) + 1:]


def _page(records: list[dict], limit: int) -> dict:
    """The first `limit` records, as OpenAI's cursor pages: `has_more` when others follow (`after`: `last_id`)."""
    page = [public(r) for r in records[:limit]]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(records) > limit}


def _filename(name: str | None) -> str:
    """An upload's filename as it is kept and shown again: at most MAX_FILENAME_CHARS, text without control
    characters (NUL, newlines, escapes), lone surrogates or the bidi controls that show a name as another
    (U+202E: "gnp.jsonl" shown as "lnosj.png"); BadRequest naming `file` otherwise."""
    if not name:
        return "upload.jsonl"
    if len(name) > MAX_FILENAME_CHARS:
        raise BadRequest("file", f"file: a filename of {len(name)} characters; at most {MAX_FILENAME_CHARS}")
    if bad := next((c for c in name if unicodedata.category(c) in ("Cc", "Cs")
                    or unicodedata.bidirectional(c) in BIDI_CONTROLS), None):
        raise BadRequest("file", f"file: the filename holds {ascii(bad)}; control characters are not accepted")
    return name


def _metadata(value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= METADATA_KEY_CHARS
            and len(v) <= METADATA_VALUE_CHARS for k, v in value.items()):
        raise BadRequest("metadata", f"metadata: at most {MAX_METADATA} string pairs (keys up to "
                                     f"{METADATA_KEY_CHARS} characters, values up to {METADATA_VALUE_CHARS})")
    # as the completion doors: no string UTF-8 cannot carry (a lone surrogate, \ud800), and no NUL
    if _unencodable(value) is not None or any("\x00" in s for pair in value.items() for s in pair):
        raise BadRequest("metadata", "metadata: keys and values must be text: no NUL, no lone surrogate such as "
                                     "\\ud800 (no UTF-8 encoding)")
    return value


def _int_query(request: web.Request, name: str, default: int, bounds: tuple[int, int]) -> int:
    """A query's integer: ASCII digits, a minus sign at most (not int()'s other digits, `_` or `+`)."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        if not _INTEGER.fullmatch(raw):
            raise ValueError(raw)
        value = int(raw)  # ValueError past sys.get_int_max_str_digits()
    except ValueError:
        raise BadRequest(name, f"{name}: must be an integer, got {_shown(raw)}") from None
    if not bounds[0] <= value <= bounds[1]:
        raise BadRequest(name, f"{name}: {value} is out of range [{bounds[0]}, {bounds[1]}]")
    return value
