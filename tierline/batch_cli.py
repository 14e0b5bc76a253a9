"""`tierline batch submit|status|list|cancel|results`: the router's OpenAI Batch API from the command line.

It speaks the same HTTP API as the `openai` client (router/batch_http.py), with the standard library
only, so a client install needs nothing more. The endpoint and key come from flags or from
TIERLINE_OPENAI_URL (default http://127.0.0.1:8080/v1, the router of infra/manifests/local.yaml) and
TIERLINE_API_KEY. A failed call prints its HTTP status and OpenAI error message and exits 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8080/v1"
FINAL = ("completed", "failed", "expired", "cancelled")
POLL_S = 0.5  # how often --wait asks for the batch's progress


class BatchCallError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")


def add_parser(sub, parser_class) -> dict:
    """Register `batch` and its actions on the `tierline` subparsers; returns their handlers."""
    from tierline.cli import positive_int

    b = sub.add_parser("batch", help="bulk work: submit a JSONL file of requests, follow it, fetch its results")
    bsub = b.add_subparsers(dest="action", required=True, parser_class=parser_class)
    s = bsub.add_parser("submit", help="upload FILE and start a batch on it (OpenAI batch input format)")
    s.add_argument("file", type=Path, help="JSONL: one {custom_id, method, url, body} per line")
    s.add_argument("--endpoint", default=None, help="/v1/completions or /v1/chat/completions "
                                                    "(default: the url of the file's first line)")
    s.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    s.add_argument("--wait", action="store_true", help="follow its progress until it ends, then print a summary")
    s.add_argument("--output", type=Path, default=None, help="with --wait: write the output file here")
    st = bsub.add_parser("status", help="one batch's status and counts")
    ls = bsub.add_parser("list", help="your batches, newest first")
    ls.add_argument("--limit", type=positive_int("--limit"), default=20)
    c = bsub.add_parser("cancel", help="stop a batch: lines not yet run are answered as cancelled")
    r = bsub.add_parser("results", help="a finished batch's output (or --errors) file, to stdout or --output")
    r.add_argument("--errors", action="store_true", help="the error file instead")
    r.add_argument("--output", type=Path, default=None)
    for p in (st, c, r):
        p.add_argument("batch_id")
    for p in (s, st, ls, c, r):
        p.add_argument("--url", default=None, help=f"the router's OpenAI API (default: $TIERLINE_OPENAI_URL or "
                                                   f"{DEFAULT_URL})")
        p.add_argument("--api-key", default=None, help="API key (default: $TIERLINE_API_KEY)")
        p.add_argument("--json", action="store_true", help="JSON on stdout")
    return {("batch", a): _run for a in ("submit", "status", "list", "cancel", "results")}


class Api:
    def __init__(self, url: str | None, key: str | None, timeout_s: float = 60.0):
        self.url = (url or os.environ.get("TIERLINE_OPENAI_URL") or DEFAULT_URL).rstrip("/")
        self.key = key or os.environ.get("TIERLINE_API_KEY")
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
             raw: bool = False):
        headers = {"content-type": content_type} if body is not None else {}
        if self.key:
            headers["authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise BatchCallError(exc.code, message) from None
        except (urllib.error.URLError, OSError) as exc:
            raise BatchCallError(0, f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None
        return data if raw else json.loads(data)

    def upload(self, filename: str, data: bytes) -> dict:
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                f"--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
                f"content-type: application/jsonl\r\n\r\n").encode()
        body = head + data + f"\r\n--{boundary}--\r\n".encode()
        return self.call("POST", "/files", body, f"multipart/form-data; boundary={boundary}")


def submit(api: Api, filename: str, data: bytes, endpoint: str, metadata: dict | None = None) -> dict:
    """Upload a batch input file and start a batch on it; returns the batch object."""
    file = api.upload(filename, data)
    body = {"input_file_id": file["id"], "endpoint": endpoint, "completion_window": "24h",
            **({"metadata": metadata} if metadata else {})}
    return api.call("POST", "/batches", json.dumps(body).encode())


def _endpoint_of(path: Path) -> str:
    from tierline.cli import UsageError

    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return json.loads(raw)["url"]
                except (ValueError, KeyError, TypeError):
                    raise UsageError(f"{path}: the first line has no url; pass --endpoint") from None
    raise UsageError(f"{path}: empty")


def summary(b: dict) -> str:
    c = b["request_counts"]
    line = f"{b['id']}: {b['status']}, {c['completed']} completed, {c['failed']} failed of {c['total']}"
    tiers = (b.get("tierline") or {}).get("answered_by_tier")
    if tiers:
        line += " (answered by " + ", ".join(f"{t} {n}" for t, n in sorted(tiers.items())) + ")"
    files = [f"output {b['output_file_id']}" if b.get("output_file_id") else "",
             f"errors {b['error_file_id']}" if b.get("error_file_id") else ""]
    return line + ("; " + ", ".join(f for f in files if f) if any(files) else "")


def follow(api: Api, batch: dict) -> dict:
    """Poll until the batch ends, with a progress bar when rich is installed (the platform extra)."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ModuleNotFoundError:
        Progress = None
    if Progress is None or not sys.stderr.isatty():
        while batch["status"] not in FINAL:
            time.sleep(POLL_S)
            batch = api.call("GET", f"/batches/{batch['id']}")
        return batch
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(batch["status"], total=None)
        while batch["status"] not in FINAL:
            time.sleep(POLL_S)
            batch = api.call("GET", f"/batches/{batch['id']}")
            c = batch["request_counts"]
            bar.update(task, description=batch["status"], total=c["total"] or None,
                       completed=c["completed"] + c["failed"])
    return batch


def _run(args) -> int:
    from tierline.cli import UsageError

    api = Api(args.url, args.api_key)
    try:
        if args.action == "submit":
            if not args.file.is_file():
                raise UsageError(f"{args.file}: no such file")
            metadata = dict(m.split("=", 1) for m in args.metadata if "=" in m) or None
            if len(metadata or {}) != len(args.metadata):
                raise UsageError("--metadata: KEY=VALUE")
            batch = submit(api, args.file.name, args.file.read_bytes(), args.endpoint or _endpoint_of(args.file),
                           metadata)
            if not args.wait:
                print(json.dumps(batch) if args.json else batch["id"])
                return 0
            batch = follow(api, batch)
            if args.output and batch.get("output_file_id"):
                args.output.write_bytes(api.call("GET", f"/files/{batch['output_file_id']}/content", raw=True))
            print(json.dumps(batch) if args.json else summary(batch))
            return 0 if batch["status"] == "completed" else 1
        if args.action == "list":
            page = api.call("GET", f"/batches?limit={args.limit}")
            print(json.dumps(page) if args.json else "\n".join(summary(b) for b in page["data"]) or "no batches")
            return 0
        if args.action in ("status", "cancel"):
            batch = api.call(*(("GET", f"/batches/{args.batch_id}") if args.action == "status" else
                               ("POST", f"/batches/{args.batch_id}/cancel", b"{}")))
            print(json.dumps(batch) if args.json else summary(batch))
            return 0
        batch = api.call("GET", f"/batches/{args.batch_id}")
        file_id = batch.get("error_file_id" if args.errors else "output_file_id")
        if file_id is None:
            what = "error" if args.errors else "output"
            raise BatchCallError(404, f"batch {args.batch_id} is {batch['status']} and has no {what} file")
        data = api.call("GET", f"/files/{file_id}/content", raw=True)
        if args.output:
            args.output.write_bytes(data)
        else:
            sys.stdout.buffer.write(data)
        return 0
    except BatchCallError as exc:
        print(f"tierline: error: {exc}", file=sys.stderr)
        return 1
