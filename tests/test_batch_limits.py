"""The Batch API's durable side at its limits (router/batch.py), on a real nats-server with JetStream and this
router's BatchRunner: a line or an answer too large for one NATS message, a whole file read without holding the
router's event loop, and a batch JetStream will not queue, which must still end."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from tests.test_batch import PROMPTS, batch_case, jsonl, line

BATCH = "batch_limits"
WAIT_S = 60  # seconds: each batch here has a few lines, answered at once


class _Lines:
    """What answers lines here, as `OpenAIServer` does: `parse` checks a body, `respond` answers it (a 200 with
    `answer_bytes` of text). Notes the threads `parse` ran on and how often `respond` ran."""

    def __init__(self, answer_bytes: int = 10):
        self.answer_bytes, self.runs, self.parsed_on = answer_bytes, 0, set()

    def parse(self, body, chat):
        self.parsed_on.add(threading.get_ident())

    async def respond(self, body, key, chat, request=None, priority=0):
        from aiohttp import web

        self.runs += 1
        return web.json_response({"id": "cmpl-x", "choices": [{"text": "x" * self.answer_bytes}], "tier": "edge"})


def _batch_case(tmp_path, lines: _Lines, data: bytes, work, prepare=None):
    return batch_case(tmp_path, lines, data, work, BATCH, prepare)


async def _ended(store, until=("completed", "cancelled", "expired", "failed")) -> tuple[dict, list[dict]]:
    """The batch once it ends: its record and every line's result (output and error files), by custom_id order."""
    deadline = time.monotonic() + WAIT_S
    while (record := (await store.get(f"batch.{BATCH}"))[0])["status"] not in until:
        assert time.monotonic() < deadline, f"the batch is still {record['status']} after {WAIT_S} s"
        await asyncio.sleep(0.2)
    results = []
    for file_id in (record["output_file_id"], record["error_file_id"]):
        if file_id:
            results += [json.loads(x) for x in (await store.file_data(file_id)).splitlines()]
    return record, sorted(results, key=lambda r: r["custom_id"] or "")


def test_a_line_too_large_to_queue_is_an_error_line_and_the_rest_run(tmp_path):
    """A line larger than one NATS message (max_payload, 1 MB) could never be queued: it was retried every lease
    (30 s) and its batch never left `validating`. It is an error line naming its size; the others run."""
    lines = _Lines()
    data = jsonl([line("big", "x" * 2_000_000), line("ok", PROMPTS[0])])
    _, (record, results) = _batch_case(tmp_path, lines, data, _ended)
    assert record["status"] == "completed" and record["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    big, ok = results
    assert big["custom_id"] == "big" and big["error"]["code"] == "line_too_large" and big["error"]["line"] == 1
    assert "max_payload" in big["error"]["message"], big["error"]
    assert ok["response"]["status_code"] == 200 and lines.runs == 1


def test_an_answer_too_large_to_keep_is_an_error_and_its_line_runs_once(tmp_path):
    """An answer larger than one KV entry (n choices with logprobs of a long context) could not be written: the line
    ran again, on the key's quota each time, until dead-lettered as if its workers had died. It runs once, and its
    error names the answer's size."""
    lines = _Lines(answer_bytes=2_000_000)
    _, (record, results) = _batch_case(tmp_path, lines, jsonl([line("huge", PROMPTS[0])]), _ended)
    assert record["status"] == "completed" and record["request_counts"] == {"total": 1, "completed": 0, "failed": 1}
    (huge,) = results
    assert huge["error"]["code"] == "response_too_large", huge["error"]
    assert "HTTP 200" in huge["error"]["message"] and huge["response"] is None
    assert lines.runs == 1


def test_a_batch_file_is_read_off_the_event_loop(tmp_path):
    """Reading every line of a file (50,000 chat lines: seconds of JSON and templates) on the router's event loop held
    every interactive request of that router meanwhile; it is read in a worker thread."""
    lines = _Lines()
    loop_thread, (record, _) = _batch_case(tmp_path, lines, jsonl([line(f"q{i}", p) for i, p in enumerate(PROMPTS)]),
                                           _ended)
    assert record["status"] == "completed" and lines.parsed_on
    assert loop_thread not in lines.parsed_on


def test_a_batch_jetstream_will_not_queue_still_expires(tmp_path):
    """Its lines cannot be queued (here: the work queue takes no message that large), so validation fails at every
    lease: the batch still ends when its completion window does, each line answered `batch_expired`, rather than
    staying `validating` forever."""
    from tierline_router.batch import BATCH_STREAM

    async def full_queue(store) -> None:
        config = (await store.js.stream_info(BATCH_STREAM)).config
        config.max_msg_size = 16  # bytes: every line is refused
        await store.js.update_stream(config)

    async def work(store):
        deadline = time.monotonic() + WAIT_S
        while (await store.get(f"batch.{BATCH}"))[0]["_lease"] == 0:  # a router has tried to validate it
            assert time.monotonic() < deadline, "no router took the batch"
            await asyncio.sleep(0.1)
        await store.change(f"batch.{BATCH}", lambda r: {**r, "expires_at": int(time.time())})  # its 24 h are up
        return await _ended(store)

    _, (record, results) = _batch_case(tmp_path, _Lines(), jsonl([line(f"q{i}", p) for i, p in enumerate(PROMPTS)]),
                                       work, prepare=full_queue)
    assert record["status"] == "expired" and record["expired_at"]
    assert [(r["custom_id"], r["error"]["code"]) for r in results] == [(f"q{i}", "batch_expired") for i in range(4)]
