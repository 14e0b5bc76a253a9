"""The Batch API's durable side at its limits (router/batch.py), on a real nats-server with JetStream and this
router's BatchRunner: a line too large for one NATS message, an answer too large for one KV entry, a whole file
read without holding the router's event loop, and a batch JetStream will not queue, which must still end."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from tests.test_batch import PROMPTS, batch_case, jsonl, line, stored

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


def test_an_answer_larger_than_one_kv_entry_is_in_the_output_file_and_its_line_runs_once(tmp_path):
    """An answer larger than one KV entry (n choices with logprobs of a long context) was kept as the error
    `response_too_large`: the line ran, on the key's quota, and its answer was lost. It is kept whole in the Object
    Store, is in the output file like any other, and is removed with the batch's other results."""
    lines = _Lines(answer_bytes=2_000_000)

    async def work(store):
        ended = await _ended(store)
        return ended, await stored(store, BATCH)

    _, ((record, results), left) = _batch_case(tmp_path, lines, jsonl([line("huge", PROMPTS[0])]), work)
    assert record["status"] == "completed" and record["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
    (huge,) = results
    assert huge["error"] is None and huge["response"]["status_code"] == 200, huge["error"]
    assert huge["response"]["body"]["choices"][0]["text"] == "x" * 2_000_000
    assert lines.runs == 1
    assert left == ([], [], 0), left  # nothing of the batch's results is left, in the KV or in the Object Store


def test_an_answer_kept_twice_is_kept_once_and_removed_with_its_batch(tmp_path):
    """A line run twice (its worker died after answering, before acking) whose answer is large: the first write wins,
    and the second leaves nothing behind in the Object Store."""
    from tierline_router.batch import output_line

    async def work(store):
        await _ended(store)  # its output file written: what is stored changes only here from now on
        first = output_line("batch_twice", 0, "a", 200, {"id": "cmpl-1", "choices": [{"text": "1" * 2_000_000}]})
        second = output_line("batch_twice", 0, "a", 200, {"id": "cmpl-2", "choices": [{"text": "2" * 2_000_000}]})
        written = [await store.write_result("batch_twice", r) for r in (first, second)]
        kept = await store.all_results("batch_twice")
        left = await stored(store, "batch_twice")
        await store.drop_results("batch_twice")
        return written, kept, left, await stored(store, "batch_twice")

    _, (written, kept, left, dropped) = _batch_case(tmp_path, _Lines(), jsonl([line("q", PROMPTS[0])]), work)
    assert written[0] is not None and written[1] is None
    assert kept[0]["error"] is None, kept[0]["error"]
    assert kept[0]["response"]["body"]["id"] == "cmpl-1" and kept[0]["response"]["body"]["choices"][0]["text"][0] == "1"
    assert "batch_twice.0" in left[0] and len(left[1]) == 1 and left[2] == 1, left  # one object: the first answer's
    assert dropped == ([], [], 0), dropped


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


def test_a_large_late_result_written_while_its_batch_is_dropped_leaves_nothing_behind(tmp_path):
    """A line's large answer is being written to the Object Store (its name already in the results bucket) when the
    batch ends and its results are dropped: that drop removes the name before the object exists. Its writer, reading
    the record after writing, removes its own object by name; it was left in the Object Store for good."""
    from tierline_router.batch import BatchRunner, batch_record, output_line

    async def work(store):
        runner = BatchRunner(store, None, workers=1, max_attempts=2, ack_wait_s=1)
        record = batch_record("batch_race", "", None, "file-x", "/v1/completions", "24h", None)
        await store.put_record("batch.batch_race", {**record, "status": "cancelled"})  # final, as a finalizer leaves it
        gate, put = asyncio.Event(), store.files.put

        async def held_put(name, data, *args, **kwargs):  # the worker's object write is under way
            if name.startswith("result."):
                await gate.wait()
            return await put(name, data, *args, **kwargs)

        store.files.put = held_put
        late = output_line("batch_race", 0, "a", 200, {"id": "cmpl-1", "choices": [{"text": "x" * 2_000_000}]})
        writer = asyncio.create_task(runner._settle("batch_race", late))  # its name first, then its object...
        deadline = time.monotonic() + WAIT_S
        while not (await stored(store, "batch_race"))[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await store.drop_results("batch_race")  # ...while the batch's results are dropped
        gate.set()
        await writer
        return await stored(store, "batch_race")

    _, left = _batch_case(tmp_path, _Lines(), jsonl([line("q", PROMPTS[0])]), work)
    assert left == ([], [], 0), left
