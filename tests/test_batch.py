"""The OpenAI Batch API (router/batch.py, router/batch_http.py) on a real platform with JetStream, driven by the
official `openai` client: files and batches, per-line errors, keys, cancellation, retries, and restarts."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from tests.conftest import new_key, run_cli
from tierline_infra.supervisor import TIER_MODULES, Stack
from tierline_shared.config.manifest import load_manifest

MODEL = "tierline-reasoner"
PROMPTS = ["Q:2+3=?\nA:", "Q:7-4=?\nA:", "Q:1+1=?\nA:", "Q:9-2=?\nA:"]
WAIT_S = 180  # a batch of this file's size finishes well within this on a 2-core machine


def _overrides(**batch) -> dict:
    return {"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
            "router.confidence_threshold": {"edge": 0.0},
            "router.no_replica_wait_ms": 0,  # a tier down: each run is a 503 at once (the batch's own retries)
            "router.batch": {"ack_wait_s": 5, "max_attempts": 5, "max_stored_mb": 4, **batch},
            "auth.plans": {"pro": {"calls_per_day": 100000, "tokens_per_day": 10000000},
                           "tiny": {"calls_per_day": 3, "tokens_per_day": 100000}}}


@pytest.fixture(scope="module")
def stack(tiny_family):
    with Stack(tiny_family, tiers=("edge",), jetstream=True, auth=True, overrides=_overrides()) as s:
        yield s


def api(stack, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(api_key=key or stack.api_key, base_url=stack.http_base_url, max_retries=0, timeout=60)


def line(custom_id: str, prompt: str, max_tokens: int = 6, chat: bool = False, **body) -> dict:
    if chat:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                         **body}}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **body}}


def jsonl(items) -> bytes:
    return b"".join((json.dumps(i) if not isinstance(i, str) else i).encode() + b"\n" for i in items)


def submit(client: openai.OpenAI, data: bytes, endpoint: str = "/v1/completions"):
    f = client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h",
                                 metadata={"job": "test"})


def wait(client: openai.OpenAI, batch_id: str, until=("completed", "failed", "expired", "cancelled"),
         timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.status in until:
            return b
        time.sleep(0.25)
    raise AssertionError(f"batch {batch_id} still {b.status} after {timeout_s} s: {b.request_counts}")


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).read().splitlines()]


def test_files_and_batches_round_trip_with_the_openai_client(stack):
    client = api(stack)
    items = [line(f"req-{i}", p) for i, p in enumerate(PROMPTS)] + [line("chat-0", PROMPTS[0], chat=True)]
    # one endpoint per batch (as OpenAI): the chat line goes in a batch of its own
    batch = submit(client, jsonl(items[:4]))
    assert batch.status == "validating" and batch.endpoint == "/v1/completions" and batch.metadata == {"job": "test"}
    chat_batch = submit(client, jsonl(items[4:]), "/v1/chat/completions")
    done = wait(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 4, 0)
    assert done.error_file_id is None and done.completed_at and done.in_progress_at
    out = lines_of(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(4)]  # in the file's order
    for o, prompt in zip(out, PROMPTS):
        # the same answer the interactive API gives the same body (greedy)
        direct = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6)
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert o["response"]["body"]["choices"][0]["text"] == direct.choices[0].text
        assert o["response"]["body"]["tier"] == "edge"
    chat_done = wait(client, chat_batch.id)
    (chat_out,) = lines_of(client, chat_done.output_file_id)
    assert chat_out["response"]["body"]["object"] == "chat.completion"
    assert client.batches.retrieve(batch.id).output_file_id == done.output_file_id
    assert batch.id in [b.id for b in client.batches.list(limit=10)]
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_bad_lines_are_answered_one_by_one_and_never_fail_the_batch(stack):
    client = api(stack)
    data = jsonl([line("ok-1", PROMPTS[0]),
                  "",  # blank lines are skipped, and counted in the line numbers errors give
                  "{not json",
                  {"method": "POST", "url": "/v1/completions", "body": {"model": MODEL, "prompt": "x"}},
                  line("ok-1", PROMPTS[1]),  # a duplicate custom_id
                  {**line("wrong-url", PROMPTS[1]), "url": "/v1/embeddings"},
                  line("bad-max", PROMPTS[1], max_tokens=-1),
                  line("streaming", PROMPTS[1], stream=True),
                  line("wrong-model", PROMPTS[1], model="gpt-4"),
                  # valid JSON whose escape spells a lone surrogate: a 400 for this line, not a stalled batch
                  json.dumps(line("surrogate", "Q:2+3=?\nA:")).replace("2+3", "\\ud800"),
                  line("ok-2", PROMPTS[2])])
    done = wait(client, submit(client, data).id)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (10, 2, 8)
    assert [o["custom_id"] for o in lines_of(client, done.output_file_id)] == ["ok-1", "ok-2"]
    errors = {(e["custom_id"], (e["error"] or {}).get("code"), (e["response"] or {}).get("status_code")):
              e for e in lines_of(client, done.error_file_id)}
    assert set(errors) == {(None, "invalid_json", None), (None, "missing_custom_id", None),
                           ("ok-1", "duplicate_custom_id", None), ("wrong-url", "invalid_url", None),
                           ("bad-max", None, 400), ("streaming", None, 400), ("wrong-model", None, 404),
                           ("surrogate", None, 400)}
    assert errors[("bad-max", None, 400)]["response"]["body"]["error"]["param"] == "max_tokens"
    assert errors[("wrong-model", None, 404)]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors[("surrogate", None, 400)]["response"]["body"]["error"]["param"] == "prompt"
    bad_json = errors[(None, "invalid_json", None)]["error"]
    assert bad_json["line"] == 3 and bad_json["message"].startswith("line 3:"), bad_json  # the file's third line
    assert errors[("streaming", None, 400)]["response"]["body"]["error"]["param"] == "stream"


def test_files_are_listed_and_paged_as_openai_lists_them(stack):
    """GET /v1/files took no parameters: every file at once, `has_more` false, whatever `purpose`, `limit`, `after`
    or `order` the client sent."""
    client = api(stack, new_key(stack, "pro")[1])  # a key of its own: these files alone
    uploads = [client.files.create(file=(f"in{i}.jsonl", io.BytesIO(jsonl([line("a", p)]))), purpose="batch")
               for i, p in enumerate(PROMPTS[:3])]
    done = wait(client, client.batches.create(input_file_id=uploads[0].id, endpoint="/v1/completions",
                                              completion_window="24h").id)
    everything = client.files.list()  # 10,000 at most by default: one page
    assert not everything.has_more and len(everything.data) == 4
    first = client.files.list(limit=3)
    assert len(first.data) == 3 and first.has_more, first
    newest_first = [f.id for f in sorted(everything.data, key=lambda f: (f.created_at, f.id), reverse=True)]
    assert [f.id for f in everything.data] == newest_first  # by created_at (seconds), then id
    assert [f.id for f in first.data] == newest_first[:3]
    assert [f.id for f in client.files.list(limit=3)] == newest_first  # the client follows `after` to the end
    assert [f.id for f in client.files.list(order="asc", limit=1)] == newest_first[::-1]
    assert [f.id for f in client.files.list(purpose="batch_output")] == [done.output_file_id]
    batch_inputs = [i for i in newest_first if i != done.output_file_id]
    assert sorted(batch_inputs) == sorted(f.id for f in uploads)
    assert [f.id for f in client.files.list(purpose="batch", limit=2)] == batch_inputs
    after_output = newest_first[newest_first.index(done.output_file_id) + 1:]
    # `after` is a place in the list, whatever its file's purpose
    assert [f.id for f in client.files.list(purpose="batch", after=done.output_file_id)] == after_output
    bad = [({"purpose": "fine-tune"}, "purpose"), ({"limit": 0}, "limit"), ({"limit": 10_001}, "limit"),
           ({"limit": "ten"}, "limit"), ({"order": "newest"}, "order"), ({"after": "file-nope"}, "after"),
           ({"after": "file.*"}, "after")]
    for params, field in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.files.list(**params)
        assert err.value.status_code == 400 and err.value.body["param"] == field, (params, err.value.body)
        assert field in err.value.body["message"]
    # batches page the same way: a cursor naming no batch of this key's is a 400 too (it was an empty last page)
    assert [b.id for b in client.batches.list(after=done.id)] == []
    for after in ("batch_nope", uploads[0].id):
        with pytest.raises(openai.BadRequestError) as err:
            client.batches.list(after=after)
        assert err.value.body["param"] == "after", err.value.body


def test_requests_are_checked_and_named_by_their_openai_field(stack):
    client = api(stack)
    f = client.files.create(file=("b.jsonl", io.BytesIO(jsonl([line("a", PROMPTS[0])]))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    assert err.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="1h")
    assert err.value.body["param"] == "completion_window"
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
    assert err.value.body["param"] == "input_file_id"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("b.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert err.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                              metadata={"k": "v" * 600})
    assert err.value.body["param"] == "metadata"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch.*")  # not a KV key
    for field, value in (("endpoint", ["/v1/completions"]), ("completion_window", {"h": 24})):  # not hashable
        with pytest.raises(openai.BadRequestError) as err:
            client.batches.create(**{"input_file_id": f.id, "endpoint": "/v1/completions", "completion_window": "24h",
                                     field: value})
        assert err.value.body["param"] == field


@pytest.mark.parametrize("metadata", [rb'{"k": "\ud800"}', rb'{"\udfff": "v"}', rb'{"k": "a\u0000b"}',
                                      rb'{"k\u0000": "v"}'])
def test_batch_metadata_that_is_not_text_is_a_400_naming_it(stack, metadata):
    """Found by a fault hunt: metadata holding a lone surrogate (JSON's \\ud800 spells one) or a NUL was kept and
    shown again, where the completion doors refuse such text."""
    import httpx

    f = api(stack).files.create(file=("m.jsonl", io.BytesIO(jsonl([line("a", PROMPTS[0])]))), purpose="batch")
    body = (b'{"input_file_id": "%s", "endpoint": "/v1/completions", "completion_window": "24h", "metadata": %s}'
            % (f.id.encode(), metadata))
    r = httpx.post(f"{stack.http_base_url}/batches", content=body, timeout=60,
                   headers={"authorization": f"Bearer {stack.api_key}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata", r.text


@pytest.mark.parametrize("limit", ["\u0661\u0662", "1_0", "+5", " 5", "5\n"])  # int() takes each of them
def test_a_list_limit_is_written_in_ascii_digits(stack, limit):
    client = api(stack)
    for listing in (client.files.list, client.batches.list):
        with pytest.raises(openai.BadRequestError) as err:
            listing(limit=limit)
        assert err.value.body["param"] == "limit", err.value.body


def _form(file_disposition: bytes, **fields: str) -> bytes:
    """A multipart/form-data upload (boundary `b`): `fields` (purpose=batch unless given), then the file part."""
    parts = [b'--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k.encode(), v.encode())
             for k, v in {"purpose": "batch", **fields}.items()]
    return b"".join(parts) + (b'--b\r\nContent-Disposition: form-data; name="file"; ' + file_disposition +
                              b"\r\n\r\n" + jsonl([line("a", PROMPTS[0])]) + b"\r\n--b--\r\n")


@pytest.mark.parametrize("disposition, fields, param", [
    (b'filename="' + b"x" * 5000 + b'.jsonl"', {}, "file"),  # kept and listed whole
    (b"filename*=UTF-8''a%00b.jsonl", {}, "file"),  # a NUL, as RFC 5987 spells it
    (b"filename*=UTF-8''a%0Ab%1B%5B2J.jsonl", {}, "file"),  # a newline, a terminal escape
    ('filename="\u202egnp.jsonl"'.encode(), {}, "file"),  # RIGHT-TO-LEFT OVERRIDE: shown as "lnosj.png"
    (b'filename="b.jsonl"', {"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
     "expires_after"),  # OpenAI's expiry, which was ignored: the file was kept for ever
    (b'filename="b.jsonl"', {"purpose_": "batch"}, "purpose_"),  # an unknown field, which was ignored
])
def test_an_upload_with_a_field_or_filename_this_api_does_not_keep_is_a_400_naming_it(stack, disposition, fields,
                                                                                        param):
    """Found by a fault hunt: unknown form fields (OpenAI's expires_after among them) were ignored, and filenames of
    5000 characters or holding control characters were kept as given."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(stack.http_base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/files", body=_form(disposition, **fields), headers={
        "content-type": "multipart/form-data; boundary=b", "authorization": f"Bearer {stack.api_key}"})
    resp = conn.getresponse()
    error = json.loads(resp.read())["error"]
    conn.close()
    assert resp.status == 400 and error["param"] == param and error["message"].startswith(param + ":"), error


def test_the_openai_clients_expires_after_is_refused_and_a_long_filename_kept(stack):
    client = api(stack)
    data = jsonl([line("a", PROMPTS[0])])
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("b.jsonl", io.BytesIO(data)), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    assert err.value.body["param"] == "expires_after" and "not supported" in err.value.body["message"]
    name = "\u00e9" * 249 + ".jsonl"  # 255 characters: the most a filename may have (as common filesystems)
    assert client.files.retrieve(client.files.create(file=(name, io.BytesIO(data)), purpose="batch").id).filename \
        == name


NESTED = (b'--outer\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
          b"--outer\r\nContent-Type: multipart/mixed; boundary=inner\r\n\r\n"
          b'--inner\r\nContent-Disposition: form-data; name="file"\r\n\r\n{}\r\n--inner--\r\n\r\n--outer--\r\n')


@pytest.mark.parametrize("content_type, data", [
    ("multipart/form-data", b"no boundary given"),
    ("multipart/form-data; boundary=b", b"no part starts here"),
    ("multipart/form-data; boundary=outer", NESTED),  # a part that is itself multipart
])
def test_an_upload_that_is_not_a_form_is_a_400_naming_the_file(stack, content_type, data):
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(stack.http_base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/files", body=data, headers={"content-type": content_type,
                                                           "authorization": f"Bearer {stack.api_key}"})
    resp = conn.getresponse()
    error = json.loads(resp.read())["error"]
    conn.close()
    assert resp.status == 400 and error["param"] == "file", error


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_a_compressed_upload_is_a_415_naming_the_content_encoding(stack, coding):
    """An upload is read as it streams in, not decoded: one sent in a content coding is refused naming it, in
    OpenAI's error shape (the router's HTTP server leaves bodies to their readers: router/openai_http.py), and a
    well-formed upload sent as it is still works."""
    import gzip
    import http.client
    from urllib.parse import urlsplit

    form = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n'
            + jsonl([line("a", PROMPTS[0])]) + b"\r\n--b--\r\n")
    url = urlsplit(stack.http_base_url)
    answers = []
    for body, headers in ((gzip.compress(form), {"content-encoding": coding}), (form, {})):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.request("POST", "/v1/files", body=body, headers={"content-type": "multipart/form-data; boundary=b",
                                                              "authorization": f"Bearer {stack.api_key}", **headers})
        resp = conn.getresponse()
        answers.append((resp.status, resp.getheader("content-type"), json.loads(resp.read())))
        conn.close()
    (status, ctype, refused), (ok_status, _, uploaded) = answers
    assert (status, ctype) == (415, "application/json; charset=utf-8"), (status, ctype, refused)
    assert refused["error"]["code"] == "unsupported_content_encoding"
    assert "content-encoding" in refused["error"]["message"]
    assert ok_status == 200 and uploaded["purpose"] == "batch", uploaded


def test_a_file_over_the_line_limit_is_refused_from_its_count_at_upload(stack):
    """Found by a fault hunt: creating a batch counted its input file's lines on the router's event loop, in a list
    of them all: one upload of 100 MB of short lines, then creates (each refused with a 400, at no cost to the key),
    held every client of the router for seconds (completions p50 9 -> 202 ms, max 4.3 s) and took it from 145 to
    690 MB. The lines are counted once, at upload, off the loop; creating a batch reads the count, not the file:
    here its bytes are gone from the store behind its record, and the create is still answered from the count."""
    import asyncio

    from tierline_router.batch import FILES_BUCKET, count_lines
    from tierline_shared.transport.messaging import connect

    client = api(stack)
    limit = load_manifest(stack.manifest, check_artifacts=False).router.batch.max_lines
    data = b"x\n \n" * (limit + 1)  # blank lines are not requests
    assert count_lines(data) == limit + 1
    f = client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")

    async def forget() -> None:
        nc = await connect(stack.nats_options(), name="test")
        try:
            await (await nc.jetstream().object_store(FILES_BUCKET)).delete(f.id)
        finally:
            await nc.close()

    asyncio.run(forget())
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    assert f"{limit + 1} lines; a batch holds at most {limit}" in str(refused.value), refused.value


def test_a_key_keeps_at_most_max_stored_mb_of_files(stack):
    """Found by a fault hunt: uploads were unmetered: a key allowed 2 calls a day (or with its quota spent) put
    12 x 8 MB files in JetStream, and any key could fill the disk the Batch API, the fleet and the key store
    share. A key keeps at most router.batch.max_stored_mb (4 MB here) of uploads: one more is a 400 naming the
    file and the setting; deleting one makes room."""
    _, key = new_key(stack, "tiny")
    client = api(stack, key)
    blob = b"x" * 2_200_000 + b"\n"
    first = client.files.create(file=("a.jsonl", io.BytesIO(blob)), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("b.jsonl", io.BytesIO(blob)), purpose="batch")
    assert refused.value.body["param"] == "file" and "router.batch.max_stored_mb" in refused.value.body["message"]
    assert [f.id for f in client.files.list()] == [first.id]  # nothing of the refused one was kept
    client.files.delete(first.id)
    client.files.create(file=("b.jsonl", io.BytesIO(blob)), purpose="batch")


def test_batch_lines_are_numbered_and_counted_as_before():
    """`count_lines` / `parse_lines` read a file a line at a time now: the same lines (non-blank), with the same
    numbers (blank lines counted) and bytes, as splitting it at every newline did."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tierline_router.batch import _raw_lines, count_lines

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from([b"", b" ", b"\r", b"{}", b"x", b"\t{}\r", b"\x0b", b"a b"]), max_size=12),
           st.booleans())
    def same(parts, final_newline):
        data = b"\n".join(parts) + (b"\n" if final_newline else b"")
        before = [(n, raw) for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
        assert list(_raw_lines(data)) == before and count_lines(data) == len(before)

    same()


def test_a_key_sees_only_its_own_and_lines_count_against_its_quota(stack):
    mine, other = api(stack), api(stack, new_key(stack, "pro")[1])
    batch = submit(mine, jsonl([line("a", PROMPTS[0])]))
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(batch.input_file_id)
    assert batch.id not in [b.id for b in other.batches.list()]
    with pytest.raises(openai.AuthenticationError):
        api(stack, "tl_nope_nope").batches.list()
    # a plan of 3 calls a day: the batch's 5 lines run on it; 3 are admitted, 2 are refused (429) line by line
    tiny = api(stack, new_key(stack, "tiny")[1])
    done = wait(tiny, submit(tiny, jsonl([line(f"q{i}", PROMPTS[i % 4]) for i in range(5)])).id)
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 2)
    codes = sorted(e["response"]["status_code"] for e in lines_of(tiny, done.error_file_id))
    assert codes == [429, 429]
    with pytest.raises(openai.RateLimitError):  # the quota is spent: interactive calls are refused too
        tiny.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2)


def test_cancel_answers_every_line_once(stack):
    client = api(stack)
    n = 200
    batch = submit(client, jsonl([line(f"c{i}", PROMPTS[i % 4], max_tokens=16) for i in range(n)]))
    with pytest.raises(openai.ConflictError):  # its lines are read again when it ends
        client.files.delete(batch.input_file_id)
    cancelling = client.batches.cancel(batch.id)  # at once: most lines have not run
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    done = wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    answered = lines_of(client, done.output_file_id) + lines_of(client, done.error_file_id)
    assert sorted(o["custom_id"] for o in answered) == sorted(f"c{i}" for i in range(n))  # each once
    assert (done.request_counts.total, done.request_counts.completed + done.request_counts.failed) == (n, n)
    assert {e["error"]["code"] for e in lines_of(client, done.error_file_id)} == {"batch_cancelled"}
    assert client.batches.cancel(batch.id).status == "cancelled"  # again: nothing changes
    assert client.files.delete(batch.input_file_id).deleted  # ended: its input may go
    finished = wait(client, submit(client, jsonl([line("x", PROMPTS[0])])).id)
    with pytest.raises(openai.ConflictError):  # nothing left to cancel
        client.batches.cancel(finished.id)


def test_without_jetstream_the_batch_endpoints_say_so(tiny_family):
    with Stack(tiny_family, tiers=("edge",), auth=True, overrides=_overrides()) as s:
        with pytest.raises(openai.InternalServerError) as err:
            api(s).batches.list()
        assert err.value.status_code == 503 and "JetStream" in err.value.body["message"]
        # the interactive API is unaffected
        assert api(s).completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2).choices


def test_the_cli_submits_follows_and_fetches(stack, tmp_path):
    src = tmp_path / "in.jsonl"
    fresh = [f"Q:{i}+{i + 1}=?\nA:" for i in range(11, 15)]  # asked nowhere else: no tier's result cache has them
    src.write_bytes(jsonl([line(f"cli-{i}", p) for i, p in enumerate(fresh)]))
    conn = ("--url", stack.http_base_url, "--api-key", stack.api_key)
    out = tmp_path / "out.jsonl"
    done = run_cli("batch", "submit", str(src), "--wait", "--output", str(out), "--metadata", "team=risk",
                   "--json", *conn)
    assert done.returncode == 0, done.stderr
    batch = json.loads(done.stdout)
    assert batch["status"] == "completed" and batch["metadata"] == {"team": "risk"}
    assert batch["tierline"]["answered_by_tier"] == {"edge": 4}
    # what it cost, by the manifest's cost rule, from the tokens each line's tiers spent
    costs = load_manifest(stack.manifest, check_artifacts=False).costs()
    answers = [json.loads(x)["response"]["body"] for x in out.read_text().splitlines()]
    spent = sum(a["usage"]["total_tokens"] for a in answers)
    assert spent > 0 and batch["tierline"]["paid_tokens"] == {"edge": spent}
    assert batch["tierline"]["cost"] == pytest.approx(costs["edge"] * spent / 1000)
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == [f"cli-{i}" for i in range(4)]
    status = run_cli("batch", "status", batch["id"], *conn)
    assert status.returncode == 0 and "completed, 4 completed, 0 failed of 4" in status.stdout
    assert batch["id"] in run_cli("batch", "list", *conn).stdout
    results = run_cli("batch", "results", batch["id"], *conn)
    assert results.stdout == out.read_text()
    missing = run_cli("batch", "results", batch["id"], "--errors", *conn)
    assert missing.returncode == 1 and "no error file" in missing.stderr
    refused = run_cli("batch", "cancel", batch["id"], *conn)
    assert refused.returncode == 1 and "HTTP 409" in refused.stderr
    denied = run_cli("batch", "list", "--url", stack.http_base_url, "--api-key", "tl_no_key")
    assert denied.returncode == 1 and "HTTP 401" in denied.stderr


def test_a_failing_tier_is_retried_and_a_line_it_never_answers_reports_why(stack):
    client = api(stack)
    stack.kill("edge-0")
    try:
        # no tier answers: each run is a 503, retried (after 1, 2, 3, 4 s) until max_attempts, then reported
        t0 = time.monotonic()
        lost = wait(client, submit(client, jsonl([line("lost", PROMPTS[0])])).id)
        assert time.monotonic() - t0 >= 1 + 2 + 3 + 4
        (err,) = lines_of(client, lost.error_file_id)
        assert err["custom_id"] == "lost" and err["response"]["status_code"] == 503
        # the tier comes back while the lines wait for their next run: they are answered
        batch = submit(client, jsonl([line(f"r{i}", PROMPTS[i]) for i in range(4)]))
        time.sleep(2)  # the first runs fail meanwhile
    finally:
        stack.restart("edge-0", TIER_MODULES["edge"])
    done = wait(client, batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 0)


def test_router_killed_mid_batch_answers_every_line_exactly_once_after_restart(stack):
    client = api(stack)
    n = 300
    batch = submit(client, jsonl([line(f"k{i}", PROMPTS[i % 4], max_tokens=16) for i in range(n)]))
    progress = wait(client, batch.id, until=("in_progress",))
    while progress.request_counts.completed < 20:
        progress = client.batches.retrieve(batch.id)
    stack.kill("router")  # mid-batch: lines in the workers' hands, the manager's state, all gone at once
    assert progress.status == "in_progress" and progress.request_counts.completed < n
    stack.restart("router")
    client = api(stack)  # the new router's port
    done = wait(client, batch.id)
    assert done.status == "completed"
    out = lines_of(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == [f"k{i}" for i in range(n)]  # every line, once, in order
    assert done.error_file_id is None and done.request_counts.completed == n
    assert len({o["id"] for o in out}) == n


# -- the durable side alone: a real nats-server with JetStream, this router's runner, lines whose runs fail -----

class _CrashingLines:
    """What answers lines, failing as a worker that dies mid-line does (no answer, no ack), never finishing
    (`hang`), or answering after `slow_s` (longer than the consumer's ack_wait)."""

    def __init__(self, hang: bool = False, slow_s: float = 0.0):
        self.hang, self.slow_s, self.runs = hang, slow_s, 0

    def parse(self, body, chat):
        return None

    async def respond(self, body, key, chat, request=None, priority=0):
        import asyncio

        from aiohttp import web

        self.runs += 1
        if self.hang:
            await asyncio.sleep(3600)
        if self.slow_s:
            await asyncio.sleep(self.slow_s)
            return web.json_response({"id": "cmpl-slow", "choices": [{"text": "5"}], "tier": "edge"})
        raise RuntimeError("the worker died mid-line")


def batch_case(tmp_path, lines, data: bytes, work, batch_id: str, prepare=None):
    """A JetStream nats-server, `prepare(store)`, one BatchRunner (ack_wait 1 s, 2 attempts) on `lines` (what answers
    lines, as `OpenAIServer` does) and a batch `batch_id` of `data`; returns (the event loop's thread id,
    `work(store)`)."""
    import asyncio
    import threading

    import nats

    from tierline_infra.supervisor import NatsServer
    from tierline_router.batch import BatchRunner, BatchStore, batch_record

    server = NatsServer(tmp_path, jetstream=True).start()

    async def main():
        nc = await nats.connect(server.url, user=server.user, password=server.password)
        store = await BatchStore(nc, ack_wait_s=1, max_attempts=2).open()
        if prepare is not None:
            await prepare(store)
        runner = BatchRunner(store, lines, workers=4, max_attempts=2, ack_wait_s=1)
        runner.start()
        try:
            f = await store.put_file("", "in.jsonl", "batch", data)
            record = batch_record(batch_id, "", None, f["id"], "/v1/completions", "24h", None)
            await store.put_record(f"batch.{batch_id}", record)
            await store.activate(batch_id)
            return threading.get_ident(), await work(store)
        finally:
            await runner.stop()
            await nc.close()

    try:
        return asyncio.run(main())
    finally:
        server.stop()


async def stored(store, batch_id: str) -> tuple[list[str], list[str], int]:
    """What a batch's results hold in JetStream: its keys in the results KV; the names of Object Store objects that
    are not files (`file-...`), deleted ones' markers included; and chunk subjects beyond the files' own (one each)."""
    import base64

    from tierline_shared.transport.messaging import FILES_BUCKET, RESULTS_BUCKET

    keys = [s.removeprefix(f"$KV.{RESULTS_BUCKET}.") for s in await store._subjects(RESULTS_BUCKET, f"{batch_id}.>")]
    stream = f"OBJ_{FILES_BUCKET}"
    meta = (await store.js.stream_info(stream, subjects_filter=f"$O.{FILES_BUCKET}.M.>")).state.subjects or {}
    chunks = (await store.js.stream_info(stream, subjects_filter=f"$O.{FILES_BUCKET}.C.>")).state.subjects or {}
    names = [base64.urlsafe_b64decode(s.rsplit(".", 1)[-1]).decode() for s in meta]
    files = [n for n in names if n.startswith("file-")]
    return sorted(keys), sorted(n for n in names if n not in files), len(chunks) - len(files)


def _runner_case(tmp_path, lines: _CrashingLines, work):
    """`batch_case` with three lines, batch `batch_dead`: what `work(store)` returns."""
    return batch_case(tmp_path, lines, jsonl([line(f"d{i}", PROMPTS[i]) for i in range(3)]), work, "batch_dead")[1]


async def _final(store, batch_id: str, timeout_s: float = 60):
    import asyncio

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record, _ = await store.get(f"batch.{batch_id}")
        if record["status"] in ("completed", "cancelled", "expired", "failed"):
            errors = [json.loads(x) for x in (await store.file_data(record["error_file_id"])).splitlines()]
            return record, errors
        await asyncio.sleep(0.2)
    raise AssertionError(f"{batch_id} not final: {record['status']}")


def test_a_line_whose_workers_die_every_time_is_dead_lettered_into_the_error_file(tmp_path):
    lines = _CrashingLines()

    async def work(store):
        return await _final(store, "batch_dead")

    record, errors = _runner_case(tmp_path, lines, work)
    assert record["status"] == "completed" and record["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert [e["custom_id"] for e in errors] == ["d0", "d1", "d2"]
    assert {e["error"]["code"] for e in errors} == {"max_deliveries_exceeded"}
    assert lines.runs == 3 * 2  # two runs each (max_attempts), then the delivery that writes the dead letter


def test_an_expired_batch_answers_what_never_ran(tmp_path):
    lines = _CrashingLines(hang=True)

    async def work(store):
        import asyncio

        while (await store.get("batch.batch_dead"))[0]["status"] != "in_progress":
            await asyncio.sleep(0.1)
        await store.change("batch.batch_dead", lambda r: {**r, "expires_at": int(time.time())})  # its 24 h are up
        return await _final(store, "batch_dead")

    record, errors = _runner_case(tmp_path, lines, work)
    assert record["status"] == "expired" and record["expired_at"]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [(f"d{i}", "batch_expired") for i in range(3)]


class _LateLines:
    """What answers lines, answering (`answer_bytes` of text) only once `release` is set: after its batch ended."""

    def __init__(self, answer_bytes: int):
        import asyncio

        self.answer_bytes, self.runs, self.release = answer_bytes, 0, asyncio.Event()

    def parse(self, body, chat):
        return None

    async def respond(self, body, key, chat, request=None, priority=0):
        from aiohttp import web

        self.runs += 1
        await self.release.wait()
        return web.json_response({"id": "cmpl-late", "choices": [{"text": "x" * self.answer_bytes}], "tier": "edge"})


@pytest.mark.parametrize("answer_bytes", [10, 2_000_000])  # a result in one KV entry; one kept in the Object Store
def test_a_line_answered_after_its_batch_was_cancelled_leaves_nothing_behind(tmp_path, answer_bytes):
    """The batch is cancelled while its line runs: it ends (the line `batch_cancelled`) and its results are removed.
    The line's answer came after, and was written where nobody would ever remove it."""
    import asyncio

    from tierline_shared.transport.messaging import RESULTS_BUCKET

    lines = _LateLines(answer_bytes)

    async def work(store):
        deadline = time.monotonic() + 60
        while not lines.runs:
            assert time.monotonic() < deadline, "no worker took the line"
            await asyncio.sleep(0.05)
        now = int(time.time())  # as `POST /v1/batches/{id}/cancel` does
        await store.change("batch.batch_late", lambda r: {**r, "status": "cancelling", "cancelling_at": now})
        record, errors = await _final(store, "batch_late")
        written = (await store.js.stream_info(f"KV_{RESULTS_BUCKET}")).state.last_seq
        lines.release.set()  # the answer comes now
        while (await store.js.stream_info(f"KV_{RESULTS_BUCKET}")).state.last_seq == written:
            assert time.monotonic() < deadline, "the late answer was never written"
            await asyncio.sleep(0.05)
        settle = time.monotonic() + 5
        while (left := await stored(store, "batch_late")) != ([], [], 0) and time.monotonic() < settle:
            await asyncio.sleep(0.1)
        return record, errors, left

    _, (record, errors, left) = batch_case(tmp_path, lines, jsonl([line("late", PROMPTS[0])]), work, "batch_late")
    assert record["status"] == "cancelled" and [e["error"]["code"] for e in errors] == ["batch_cancelled"]
    assert left == ([], [], 0), left  # what the late answer wrote is removed with the batch's results


def test_a_line_longer_than_ack_wait_is_kept_by_its_worker_and_runs_once(tmp_path):
    """ack_wait is 1 s and each line takes 2.5 s: the worker's in-progress acks keep JetStream from handing the
    line to another worker meanwhile."""
    lines = _CrashingLines(slow_s=2.5)

    async def work(store):
        import asyncio

        deadline = time.monotonic() + 60
        while (record := (await store.get("batch.batch_dead"))[0])["status"] != "completed":
            assert time.monotonic() < deadline, record["status"]
            await asyncio.sleep(0.2)
        return record

    record = _runner_case(tmp_path, lines, work)
    assert record["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert lines.runs == 3  # once each: never redelivered while its worker was on it


def test_stopped_workers_leave_no_pull_open_for_the_connections_drain_to_wait_on(tmp_path):
    """The router stops its batch workers, then drains its NATS connection (router/__main__.py). A fetch cut short
    by the stop left its pull subscription open: the server's answer to that pull (a timeout, once it expired)
    came into the subscription, nobody read it, and the drain waited on it until the router was killed."""
    import asyncio

    import nats

    from tierline_infra.supervisor import NatsServer
    from tierline_router.batch import BATCH_CONSUMER, BATCH_STREAM, BatchRunner, BatchStore

    server = NatsServer(tmp_path, jetstream=True).start()

    async def waiting_pulls(nc) -> int:
        try:
            return (await nc.jetstream().consumer_info(BATCH_STREAM, BATCH_CONSUMER, timeout=5)).num_waiting or 0
        except nats.js.errors.NotFoundError:  # the workers have not made their consumer yet
            return 0

    async def main():
        errors = []

        async def on_error(exc):
            errors.append(exc)

        nc = await nats.connect(server.url, user=server.user, password=server.password, error_cb=on_error,
                                drain_timeout=2)  # nats-py's default is 30 s
        store = await BatchStore(nc, ack_wait_s=1, max_attempts=2).open()
        runner = BatchRunner(store, _CrashingLines(), workers=2, max_attempts=2, ack_wait_s=1)
        runner.start()
        try:
            deadline = time.monotonic() + 30
            while not await waiting_pulls(nc):
                assert time.monotonic() < deadline, "the workers never asked JetStream for lines"
                await asyncio.sleep(0.05)
        finally:
            await runner.stop()  # mid-fetch: the workers wait on the pull they just sent
        await asyncio.sleep(1.5)  # past the pull's expiry (1 s): the server has answered it
        await nc.drain()
        assert not [e for e in errors if isinstance(e, nats.errors.DrainTimeoutError)]

    try:
        asyncio.run(main())
    finally:
        server.stop()
