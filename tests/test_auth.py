"""API keys, plans and quotas, checked by a real router (nats-server, edge, router processes)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest

from tests.conftest import new_key, run_cli, scrape
from tierline import (
    AsyncInferenceClient,
    InferenceClient,
    PermissionDenied,
    QuotaExceeded,
    TierlineError,
    Unauthenticated,
    Unavailable,
)
from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_infra.supervisor import Stack, write_manifest
from tierline_router.auth import BUSY_TIMEOUT_S, KeyStore, reserve_for
from tierline_shared.config.manifest import ManifestError, load_manifest

PROMPT = "Q:2+3=?\nA:"
PLANS = {"free": {"calls_per_day": 20, "tokens_per_day": 100000, "priority": "normal"},
         "pro": {"calls_per_day": 1000, "tokens_per_day": 1000000, "priority": "high"},
         "two": {"calls_per_day": 2, "tokens_per_day": 100000},
         "few_tokens": {"calls_per_day": 100, "tokens_per_day": 70}}


@pytest.fixture(scope="module")
def stack(tiny_family):
    with Stack(tiny_family, tiers=("edge",), auth=True,
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 0.0}, "auth.plans": PLANS}) as s:
        yield s


def usage(stack, key_id: str) -> dict:
    proc = run_cli("keys", "list", "--manifest", str(stack.manifest), "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    return next(k for k in json.loads(proc.stdout)["keys"] if k["id"] == key_id)


def client(stack, key: str | None) -> InferenceClient:
    return InferenceClient(api_key=key or "", endpoint=stack.router_address, retries=0)


def test_keys_are_stored_hashed(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key_id, key = store.create("free", "alice")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    secret = key.split("_", 2)[2]  # tl_<id>_<secret>; the secret may hold "_" itself
    assert key.encode() not in raw and secret.encode() not in raw
    db = sqlite3.connect(tmp_path / "keys.sqlite")
    assert db.execute("SELECT id, plan, name FROM keys").fetchall() == [(key_id, "free", "alice")]
    assert (tmp_path / "keys.sqlite").stat().st_mode & 0o077 == 0


def test_every_auth_failure_has_its_status(stack):
    with pytest.raises(Unauthenticated, match="missing API key"):
        client(stack, None).infer(PROMPT)
    with pytest.raises(Unauthenticated, match="unknown API key"):
        client(stack, "tl_00000000_not-a-key").infer(PROMPT)
    with pytest.raises(Unauthenticated, match="unknown API key"):  # streams and status are guarded too
        list(client(stack, "tl_00000000_not-a-key").stream(PROMPT))
    with pytest.raises(Unauthenticated):
        client(stack, None).status()
    raw = pb_grpc.InferenceServiceStub(grpc.insecure_channel(stack.router_address))
    with pytest.raises(grpc.RpcError) as err:  # not a bearer token
        raw.Infer(pb.InferRequest(prompt=PROMPT), metadata=(("authorization", "Basic abc"),), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.value.details()

    key_id, key = new_key(stack, "free")
    assert client(stack, key).infer(PROMPT, {"max_tokens": 4}).tier == "edge"
    proc = run_cli("keys", "revoke", key_id, "--manifest", str(stack.manifest), timeout=60)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(PermissionDenied, match=f"{key_id} was revoked") as err:
        client(stack, key).infer(PROMPT, {"max_tokens": 4})
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED

    _, two = new_key(stack, "two")
    for _ in range(2):
        client(stack, two).infer(PROMPT, {"max_tokens": 4})
    with pytest.raises(QuotaExceeded, match=r"quota of 2 calls used .* resets at \d{4}-\d\d-\d\dT00:00:00Z") as err:
        client(stack, two).infer(PROMPT, {"max_tokens": 4})
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_invalid_requests_cost_no_quota(stack):
    key_id, key = new_key(stack, "two")
    with pytest.raises(TierlineError) as err:
        client(stack, key).infer(PROMPT, {"max_tokens": 0})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert usage(stack, key_id)["calls_today"] == 0


def test_a_request_a_tier_refuses_for_its_fields_costs_its_call(stack):
    """Refused at the router: free. Refused by a tier after admission (a field only the model can check): the call
    counts, no tokens, so a sender cannot make tiers work for nothing."""
    key_id, key = new_key(stack, "two")
    with pytest.raises(TierlineError, match="attention_window") as err:
        client(stack, key).infer(PROMPT, {"max_tokens": 4, "attention_window": 100_000})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (usage(stack, key_id)["calls_today"], usage(stack, key_id)["tokens_today"]) == (1, 0)


def test_token_quota_is_never_exceeded(stack):
    key_id, key = new_key(stack, "few_tokens")
    answered = 0
    with pytest.raises(QuotaExceeded, match="quota of 70 tokens"):
        for _ in range(10):
            client(stack, key).infer(PROMPT, {"max_tokens": 8})
            answered += 1
    used = usage(stack, key_id)
    assert answered >= 1 and used["calls_today"] == answered
    assert used["tokens_today"] <= 70


def test_50_concurrent_requests_against_a_quota_of_20(stack):
    key_id, key = new_key(stack, "free")
    prompts = [f"Q:{i}+1=?\nA:" for i in range(50)]
    with InferenceClient(api_key=key, endpoint=stack.router_address, retries=0) as c:
        def one(prompt):
            try:
                return c.infer(prompt, {"max_tokens": 4})
            except TierlineError as exc:
                return exc

        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(one, prompts))
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(ok) == 20 and len(refused) == 30, [r for r in results if isinstance(r, Exception)][:3]
    used = usage(stack, key_id)
    assert used["calls_today"] == 20
    assert used["tokens_today"] == sum(r.usage.total_tokens for r in ok)  # settled to the real counts


def test_usage_survives_a_router_restart(stack):
    key_id, key = new_key(stack, "free")
    _, two = new_key(stack, "two")
    answers = [client(stack, key).infer(f"Q:{i}*2=?\nA:", {"max_tokens": 4}) for i in range(3)]
    for _ in range(2):
        client(stack, two).infer(PROMPT, {"max_tokens": 4})
    before = usage(stack, key_id)
    assert before["calls_today"] == 3 and before["tokens_today"] == sum(a.usage.total_tokens for a in answers)

    stack.restart("router")

    assert usage(stack, key_id) == before
    with pytest.raises(QuotaExceeded):  # still used up after the restart
        client(stack, two).infer(PROMPT, {"max_tokens": 4})
    after = client(stack, key).infer("Q:7*2=?\nA:", {"max_tokens": 4})
    now = usage(stack, key_id)
    assert now["calls_today"] == 4 and now["tokens_today"] == before["tokens_today"] + after.usage.total_tokens


def test_the_plan_priority_reaches_the_tiers_queues(stack):
    """A wiretap on tierline.edge.infer (a plain NATS subscriber) sees what the router sends the tiers."""
    import nats

    _, free = new_key(stack, "free")
    _, pro = new_key(stack, "pro")

    async def run():
        nc = await nats.connect(**stack.nats_options().connect_kwargs())  # the operator may tap anything
        seen: list = []

        async def tap(msg) -> None:
            seen.append(pb.InferRequest.FromString(msg.data))

        sub = await nc.subscribe("tierline.edge.infer", cb=tap)
        await nc.flush()
        for key, prompt, priority in ((free, "Q:1+4=?\nA:", None), (pro, "Q:2+4=?\nA:", None),
                                      (free, "Q:3+4=?\nA:", "high"), (pro, "Q:4+4=?\nA:", "low")):
            async with AsyncInferenceClient(api_key=key, endpoint=stack.router_address, retries=0) as c:
                await c.infer(prompt, {"max_tokens": 2}, priority=priority)
        await nc.flush()
        await sub.unsubscribe()
        await nc.close()
        return {r.prompt: r.priority for r in seen}

    got = asyncio.run(run())
    assert got == {"Q:1+4=?\nA:": pb.PRIORITY_NORMAL, "Q:2+4=?\nA:": pb.PRIORITY_HIGH,
                   "Q:3+4=?\nA:": pb.PRIORITY_NORMAL,  # a free key cannot ask for more than its plan
                   "Q:4+4=?\nA:": pb.PRIORITY_LOW}


def test_each_request_looks_its_key_up_once(stack):
    """The router's own servicer and HTTP API in this process, on the stack's NATS and key store,
    so the store's lookups can be counted per request (gRPC and HTTP, answered or refused). A body over
    KEY_FIRST_BYTES is walked for a valid key only (one lookup more): without one it is a 401 before it is parsed
    (found by a fault hunt: a 1 MiB body with no valid key held the router's event loop about 0.3 s)."""
    import aiohttp

    from tierline_router.auth import Gate
    from tierline_router.openai_http import KEY_FIRST_BYTES, OpenAIServer
    from tierline_router.policy import Policy
    from tierline_router.service import RouterServicer
    from tierline_shared.security.identities import ROUTER
    from tierline_shared.transport.messaging import NatsOptions, connect

    manifest = load_manifest(stack.manifest, check_artifacts=False)
    _, key = new_key(stack, "pro")
    body = {"model": manifest.model_name, "prompt": PROMPT, "max_tokens": 4}

    async def run() -> dict[str, int]:
        nc = await connect(NatsOptions.from_manifest(manifest, ROUTER), name="test-router")
        gate = Gate(KeyStore(manifest.key_store_path), manifest.auth.plans)
        router = RouterServicer(nc, Policy(0.0, 1.0, {"edge": 0.0}), manifest.model_name, ("edge",),
                                request_timeout_s=30.0, gate=gate)
        server = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(router, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        http = OpenAIServer(router)
        http_port = await http.start("127.0.0.1", 0)
        lookups: dict[str, int] = {}
        walk = http.parse

        def parse(*args):  # the bodies walked, by size
            parsed.append(len(json.dumps(args[0])))
            return walk(*args)
        parsed: list[int] = []
        http.parse = parse

        async def count(name: str, call) -> None:
            before = gate.store.lookups
            if name == "grpc invalid":
                with pytest.raises(TierlineError) as err:
                    await call
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            else:
                await call
            lookups[name] = gate.store.lookups - before

        async def chunks(stream) -> None:
            async for _ in stream:
                pass

        async def post(session, data, expected: int, bearer: str = key) -> None:
            async with session.post(f"http://127.0.0.1:{http_port}/v1/completions", data=data,
                                    headers={"authorization": f"Bearer {bearer}"}) as resp:
                await resp.read()
                assert resp.status == expected

        try:
            async with AsyncInferenceClient(api_key=key, endpoint=f"127.0.0.1:{port}", retries=0) as c:
                await count("grpc infer", c.infer(PROMPT, {"max_tokens": 4}))
                await count("grpc stream", chunks(c.stream(PROMPT, {"max_tokens": 4})))
                await count("grpc invalid", c.infer(PROMPT, {"max_tokens": 0}))
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                await count("http infer", post(session, json.dumps(body), 200))
                await count("http stream", post(session, json.dumps({**body, "stream": True}), 200))
                await count("http invalid", post(session, "{not json", 400))
                large = json.dumps(body) + " " * KEY_FIRST_BYTES  # valid JSON, over the size walked without a key
                await count("http large", post(session, large, 200))
                walked = len(parsed)
                await count("http large, no key", post(session, large, 401, bearer="tl_00000000_nokey"))
                assert len(parsed) == walked  # refused before its body was parsed
        finally:
            await http.stop()
            await server.stop(0)
            await nc.close()
            await gate.close()
        return lookups

    lookups = asyncio.run(run())
    assert lookups == {**{name: 1 for name in ("grpc infer", "grpc stream", "grpc invalid", "http infer",
                                               "http stream", "http invalid")},
                       "http large": 2, "http large, no key": 2}  # checked first, then with its quota / its refusal


def test_a_key_store_locked_by_another_process_is_unavailable(stack):
    """Another process (here: this test) holds the key store's write lock longer than the router waits for it
    (BUSY_TIMEOUT_S), as a long `tierline keys` command or a backup may: a request is refused as UNAVAILABLE
    (HTTP 503 in the platform's error shape), which clients retry, counted as every refusal is; it costs no quota.
    The requests queued behind the one that waited for the lock are refused with it, not BUSY_TIMEOUT_S each."""
    import urllib.error
    import urllib.request

    manifest = load_manifest(stack.manifest, check_artifacts=False)
    key_id, key = new_key(stack, "free")
    before = scrape(stack, "router").value("tierline_router_requests_total", code="UNAVAILABLE")

    def over_grpc():
        with pytest.raises(Unavailable, match="key store is unavailable .*database is locked") as err:
            client(stack, key).infer(PROMPT, {"max_tokens": 4})
        return err.value.code

    def over_http():
        req = urllib.request.Request(f"{stack.http_base_url}/completions", method="POST", headers={
            "authorization": f"Bearer {key}", "content-type": "application/json"},
            data=json.dumps({"model": manifest.model_name, "prompt": PROMPT, "max_tokens": 4}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        return err.value.code, json.loads(err.value.read())

    locker = sqlite3.connect(manifest.key_store_path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(f) for f in (over_grpc, over_http, over_grpc, over_http)]
            grpc_codes = [calls[0].result(), calls[2].result()]
            (http_status, body), _ = calls[1].result(), calls[3].result()
        took = time.monotonic() - t0
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert grpc_codes == [grpc.StatusCode.UNAVAILABLE] * 2
    assert http_status == 503, body
    assert body["error"]["type"] == "service_unavailable" and body["error"]["code"] == "unavailable"
    assert "database is locked" in body["error"]["message"]
    # the requests queued behind the first fail with it: one wait for the lock, not four (4 x BUSY_TIMEOUT_S before)
    assert took < 2 * BUSY_TIMEOUT_S + 2, took
    assert scrape(stack, "router").value("tierline_router_requests_total", code="UNAVAILABLE") == before + 4
    assert usage(stack, key_id)["calls_today"] == 0
    assert client(stack, key).infer(PROMPT, {"max_tokens": 4}).tier == "edge"  # the lock gone, served again


def test_an_answer_survives_a_key_store_locked_before_it_is_settled(stack, monkeypatch, caplog):
    """The key store gets write-locked by another connection after a request's admission, while the tiers answer
    it: the answer (unary and stream) still reaches the client; the usage it could not record is logged with the
    key's id (never the key) and counted, and its worst-case reservation stays counted (too much, never too little).
    The router's servicer in this process, on the stack's NATS, edge and key store."""
    from tierline_router import auth
    from tierline_router.auth import Gate
    from tierline_router.policy import Policy
    from tierline_router.service import RouterServicer
    from tierline_shared.security.identities import ROUTER
    from tierline_shared.transport.messaging import NatsOptions, connect

    monkeypatch.setattr(auth, "BUSY_TIMEOUT_S", 0.3)  # this router's store waits 0.3 s for a lock, not 5 s
    manifest = load_manifest(stack.manifest, check_artifacts=False)
    key_id, key = new_key(stack, "pro")
    locker = sqlite3.connect(manifest.key_store_path, isolation_level=None)

    async def run() -> tuple[list[str], int, Gate]:
        nc = await connect(NatsOptions.from_manifest(manifest, ROUTER), name="test-router")
        gate = Gate(KeyStore(manifest.key_store_path), manifest.auth.plans)
        router = RouterServicer(nc, Policy(0.0, 1.0, {"edge": 0.0}), manifest.model_name, ("edge",),
                                request_timeout_s=30.0, gate=gate)
        route, stream = router.route, router._stream

        async def route_then_lock(req, deadline):
            resp = await route(req, deadline)
            locker.execute("BEGIN IMMEDIATE")
            return resp

        async def stream_then_lock(req):
            async for chunk in stream(req):
                yield chunk
            locker.execute("BEGIN IMMEDIATE")

        router.route, router._stream = route_then_lock, stream_then_lock
        server = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(router, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        texts = []
        try:
            async with AsyncInferenceClient(api_key=key, endpoint=f"127.0.0.1:{port}", retries=0) as c:
                try:
                    texts.append((await c.infer(PROMPT, {"max_tokens": 4})).text)
                finally:
                    locker.execute("ROLLBACK")
                try:
                    texts.append("".join([text async for text in c.stream(PROMPT, {"max_tokens": 4})]))
                finally:
                    locker.execute("ROLLBACK")
                router.route, router._stream = route, stream  # the lock gone: settled as usual
                settled = await c.infer(PROMPT, {"max_tokens": 4})
                texts.append(settled.text)
        finally:
            await server.stop(0)
            await nc.close()
            await gate.close()
        return texts, settled.usage.total_tokens, gate, router

    with caplog.at_level("ERROR", logger="tierline.router.auth"):
        texts, settled_tokens, gate, router = asyncio.run(run())
    locker.close()
    assert len(texts) == 3 and all(texts), texts
    assert gate.unsettled == 2 == router.metrics.sample("tierline_router_unsettled_requests_total")
    unsettled = [r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()]
    assert len(unsettled) == 2 and all(key_id in m and "database is locked" in m for m in unsettled), unsettled
    assert key not in caplog.text and key.split("_", 2)[2] not in caplog.text
    used = usage(stack, key_id)
    assert used["calls_today"] == 3
    assert used["tokens_today"] == 2 * reserve_for(PROMPT, 4) + settled_tokens  # two reservations kept


def test_a_shared_key_store_lists_every_key_every_time_and_leaves_no_consumer(tmp_path):
    """`tierline keys list` on `auth.store: nats`: every key, on every call (nats-py's KeyValue.keys() answered
    "no keys" now and then: its watcher's end marker can come before the first key), and nothing left on the
    server (each keys() left a consumer for 5 minutes). A key whose record was deleted is not listed."""
    from tierline_infra.supervisor import NatsServer
    from tierline_router.auth import KvKeyStore
    from tierline_shared.transport.messaging import KEYS_BUCKET, NatsOptions, connect

    server = NatsServer(tmp_path, jetstream=True).start()
    opts = NatsOptions(server.url, server.user, server.password)
    store = KvKeyStore(opts, create_buckets=True)

    async def delete_and_count(key_id: str | None) -> int:
        nc = await connect(opts, name="test")
        try:
            js = nc.jetstream(timeout=10)
            if key_id:
                await (await js.key_value(KEYS_BUCKET)).delete(f"id.{key_id}")
            return (await js.stream_info(f"KV_{KEYS_BUCKET}")).state.consumer_count
        finally:
            await nc.close()

    try:
        ids = [store.create("free", name=f"k{i}")[0] for i in range(3)]
        listings = [[k.id for k in store.list()] for _ in range(300)]
        assert all(sorted(ids) == sorted(got) for got in listings), [got for got in listings if len(got) != 3][:3]
        assert asyncio.run(delete_and_count(ids[0])) == 0
        assert sorted(k.id for k in store.list()) == sorted(ids[1:])
    finally:
        store.close()
        server.stop()


def test_a_shared_key_store_nats_cannot_reach_is_unavailable(tmp_path, monkeypatch, caplog):
    """`auth.store: nats` with its nats-server gone: admission is UNAVAILABLE (the KV calls time out); settling a
    request admitted before logs and counts the usage it could not record instead of raising. Served again once
    the server is back."""
    import time

    from tierline_infra.supervisor import NatsServer
    from tierline_router import auth
    from tierline_router.auth import AccessDenied, Gate, KvKeyStore
    from tierline_shared.config.manifest import PlanConfig
    from tierline_shared.transport.messaging import NatsOptions

    monkeypatch.setattr(auth, "KV_TIMEOUT_S", 0.5)
    server = NatsServer(tmp_path, jetstream=True).start()
    store = KvKeyStore(NatsOptions(server.url, server.user, server.password), create_buckets=True)
    gate = Gate(store, {"free": PlanConfig(10, 10_000)})
    try:
        key_id, key = store.create("free")
        admission = asyncio.run(gate.admit(key, PROMPT, 4))
        server.stop()
        with pytest.raises(AccessDenied, match="key store is unavailable") as err:
            asyncio.run(gate.admit(key, PROMPT, 4))
        assert err.value.status == "UNAVAILABLE"
        with caplog.at_level("ERROR", logger="tierline.router.auth"):
            asyncio.run(gate.settle(admission, 7))
        assert gate.unsettled == 1 and f"usage of API key {key_id}" in caplog.text and key not in caplog.text

        server.start()  # on its port again, with its store: the reservation is still counted
        deadline = time.monotonic() + 30
        while True:  # read-only until it answers (a write retried after a timeout might apply twice)
            try:
                asyncio.run(gate.check(key))
                break
            except AccessDenied:
                assert time.monotonic() < deadline, "the key store did not come back"
        monkeypatch.setattr(auth, "KV_TIMEOUT_S", 5.0)
        asyncio.run(gate.admit(key, PROMPT, 4))
        assert [(k.calls_today, k.tokens_today) for k in store.list()] == [(2, 2 * reserve_for(PROMPT, 4))]
    finally:
        asyncio.run(gate.close())
        server.stop()


def test_closing_a_shared_key_store_nats_cannot_reach_leaves_nothing_behind(tmp_path, monkeypatch):
    """The router stops while its key store's nats-server is gone and a key lookup waits on JetStream: closing the
    store ends that call at once with a store error (UNAVAILABLE to its caller) instead of leaving it waiting on a
    loop that no longer runs; no task is left pending, the loop is closed, and a call after close raises at once,
    leaving no never-awaited coroutine."""
    import gc
    import threading
    import warnings

    from tierline_infra.supervisor import NatsServer
    from tierline_router import auth
    from tierline_router.auth import STORE_ERRORS, KvKeyStore
    from tierline_shared.transport.messaging import NatsOptions

    monkeypatch.setattr(auth, "KV_TIMEOUT_S", 30.0)  # how long a KV call waits for NATS to come back
    server = NatsServer(tmp_path, jetstream=True).start()
    store = KvKeyStore(NatsOptions(server.url, server.user, server.password), create_buckets=True)
    outcome: list = []

    def call(out: list) -> None:
        try:
            out.append(store.lookup(key))
        except BaseException as exc:  # noqa: BLE001 - what the call ends with is what is checked
            out.append(exc)

    try:
        _, key = store.create("free")
        server.stop()
        in_flight = threading.Thread(target=call, args=(outcome,), daemon=True)
        in_flight.start()
        deadline = time.monotonic() + 30
        while not any("_lookup" in t.get_coro().__qualname__ for t in asyncio.all_tasks(store._loop)):
            assert time.monotonic() < deadline, "the lookup never reached the store's loop"
            time.sleep(0.01)
    finally:
        store.close()
    in_flight.join(10)  # well within KV_TIMEOUT_S: only close() can end it this soon
    assert not in_flight.is_alive(), "a call in flight still waits on the closed store's loop"
    assert isinstance(outcome[0], STORE_ERRORS), outcome  # the gate answers UNAVAILABLE
    assert not [t for t in asyncio.all_tasks(store._loop) if not t.done()]
    assert store._loop.is_closed()

    after: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        late = threading.Thread(target=call, args=(after,), daemon=True)
        late.start()
        late.join(10)
        assert not late.is_alive(), "a call after close waits on a loop that no longer runs"
        gc.collect()
    assert isinstance(after[0], STORE_ERRORS), after
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


def test_keys_cli_refuses_mistakes_in_one_line(stack):
    bad_plan = run_cli("keys", "create", "--plan", "gold", "--manifest", str(stack.manifest), timeout=60)
    assert bad_plan.returncode == 2 and "--plan" in bad_plan.stderr and "free" in bad_plan.stderr
    assert len(bad_plan.stderr.strip().splitlines()) == 1
    bad_id = run_cli("keys", "revoke", "nosuchid", "--manifest", str(stack.manifest), timeout=60)
    assert bad_id.returncode == 2 and "nosuchid" in bad_id.stderr
    key_id, _ = new_key(stack, "pro")
    table = run_cli("keys", "list", "--manifest", str(stack.manifest), timeout=60)
    assert table.returncode == 0 and key_id in table.stdout and "0 / 1,000,000" in table.stdout


@pytest.mark.parametrize("auth, field", [
    ({"plans": {"free": {"calls_per_day": 0, "tokens_per_day": 10}}}, "auth.plans.free.calls_per_day"),
    ({"plans": {"free": {"calls_per_day": 5, "tokens_per_day": 10, "priority": "urgent"}}},
     "auth.plans.free: priority"),
    ({"plans": {"free": {"calls_per_day": 5}}}, "auth.plans.free.tokens_per_day"),
    ({"enabled": "yes"}, "auth.enabled"),
    ({"plans": {}}, "auth.plans"),
    ({"keystore": "x"}, "auth.keystore"),
])
def test_manifest_auth_errors_name_the_field(tiny_family, tmp_path, auth, field):
    nats = SimpleNamespace(url="nats://127.0.0.1:4222", user="u", password="p")
    path = write_manifest(tmp_path / "m.yaml", tiny_family, nats, tiers=("edge",),
                          overrides={"auth": auth})
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert field in str(err.value)


QUOTA = 20  # calls per day of the shared-quota test's plan
CONCURRENT = 50  # requests sent at once, split between two routers


def test_two_routers_share_exact_quotas_in_jetstream(tiny_family):
    """`auth.store: nats`: keys and usage in JetStream KV, changed by compare-and-set. Two routers, 50
    concurrent requests split between them against a quota of 20: exactly 20 are answered; the usage
    outlives a restart of both routers."""
    from tierline_infra.supervisor import ROUTER_MODULE

    plans = {"free": {"calls_per_day": QUOTA, "tokens_per_day": 10_000_000, "priority": "normal"}}
    overrides = {"auth.store": "nats", "auth.plans": plans, "router.confidence_threshold": {"edge": 0.0}}
    with Stack(tiny_family, tiers=("edge",), jetstream=True, auth=True, key_plan="free", overrides=overrides) as s:
        s.start_process("router-1", ROUTER_MODULE)
        key_id, key = new_key(s, "free")  # through the CLI, as the operator
        routers = [pb_grpc.InferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{s.port(name)}"))
                   for name in ("router", "router-1")]

        def one(i: int):
            try:
                routers[i % 2].Infer(pb.InferRequest(prompt=f"Q:{i}+1=?\nA:", parameters=pb.Parameters(max_tokens=4)),
                                     timeout=60, metadata=[("authorization", f"Bearer {key}")])
                return "ok"
            except grpc.RpcError as exc:
                return exc.code()

        with ThreadPoolExecutor(CONCURRENT) as pool:
            codes = list(pool.map(one, range(CONCURRENT)))
        assert codes.count("ok") == QUOTA, codes
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == CONCURRENT - QUOTA, codes
        s.restart("router")
        s.restart("router-1")
        routers = [pb_grpc.InferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{s.port(name)}"))
                   for name in ("router", "router-1")]
        assert {one(0), one(1)} == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # still used up, on both
        listed = run_cli("keys", "list", "--manifest", str(s.manifest), "--json", timeout=60)
        assert listed.returncode == 0, listed.stderr
        mine = next(k for k in json.loads(listed.stdout)["keys"] if k["id"] == key_id)
        assert mine["calls_today"] == QUOTA


def test_a_stream_cut_short_costs_what_its_chunks_said_not_its_reservation(stack):
    """Found by a fault hunt: a stream its client closed after its first chunk was charged its whole worst case
    (one token per prompt character, the start token, and every choice's max_tokens: 1,623 tokens for n=8 and
    max_tokens 200, against 295 for the same stream read to its end). Each text chunk now says its choice's tokens
    so far, and a stream cut short costs the prompt and what the chunks said: more than nothing, far less than the
    reservation. Through the router's gRPC door, as the SDK streams."""
    key_id, key = new_key(stack, "pro")
    request = pb.InferRequest(prompt=PROMPT, parameters=pb.Parameters(max_tokens=200, n=4, temperature=1.0))
    channel = grpc.insecure_channel(stack.router_address)
    try:
        stub = pb_grpc.InferenceServiceStub(channel)
        stream = stub.InferStream(request, metadata=[("authorization", f"Bearer {key}")], timeout=60)
        first = next(stream)
        stream.cancel()
    finally:
        channel.close()
    assert first.choices[0].text and first.usage.prompt_tokens > 0 and first.usage.completion_tokens >= 1, first
    deadline = time.monotonic() + 30
    while (used := usage(stack, key_id))["tokens_today"] == reserve_for(PROMPT, 4 * 200) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert used["calls_today"] == 1
    assert first.usage.prompt_tokens + 1 <= used["tokens_today"] <= first.usage.prompt_tokens + 4 * 200 // 2, used


def test_a_request_whose_asker_leaves_while_it_is_admitted_costs_nothing(tmp_path):
    """Found by a review: a handler cancelled (its client hung up) while the key store's thread was taking the
    request's call and reservation lost the admission, which nothing settled: the key was charged a call and the
    request's worst case for the day, for nothing. The store is held here by another process's write transaction
    (as a second router's would), so the admission is still being made when its asker leaves."""
    from tierline_router.auth import Gate
    from tierline_shared.config.manifest import PlanConfig

    path = tmp_path / "keys.sqlite"
    store = KeyStore(path)
    key_id, key = store.create("free")
    gate = Gate(store, {"free": PlanConfig(10, 10_000)})
    other = sqlite3.connect(path, isolation_level=None)

    async def leave_while_admitted() -> None:
        other.execute("BEGIN IMMEDIATE")  # the store's next write waits for this one (within BUSY_TIMEOUT_S)
        asking = asyncio.ensure_future(gate.admit(key, PROMPT, 50))
        await asyncio.sleep(0.3)
        asking.cancel()
        other.execute("COMMIT")  # now the admission goes through, its asker gone
        with pytest.raises(asyncio.CancelledError):
            await asking
        await gate.check(key)  # the store has one thread: the admission was made before this answers
        deadline = time.monotonic() + 10
        while store.list()[0].calls_today and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # its give-back, on the store's thread

    try:
        asyncio.run(leave_while_admitted())
        assert [(k.calls_today, k.tokens_today) for k in store.list()] == [(0, 0)]
        assert asyncio.run(gate.admit(key, PROMPT, 4)) is not None  # the key still works
    finally:
        other.close()
        asyncio.run(gate.close())


def test_a_stopping_router_records_the_usage_of_the_requests_it_ended(tmp_path, caplog):
    """Found by a review: the router's stop closed the key store's thread and the store without waiting for the
    settles in flight or the give-back of an admission whose asker had left (a task of its own, run once the store
    made the admission): each then found the store closed, was logged and counted unsettled, and the key kept a
    reservation it never used. The gate's close now waits for them (at most SETTLE_TIMEOUT_S). Here the stop comes
    as one request has its answer (its settle just started) and another's asker leaves while the store, held by
    another process's write transaction, is still admitting it; the lock goes 0.3 s into the stop. The usage is
    read back from the file by a store of its own, as the next router would."""
    from tierline_router.auth import Gate
    from tierline_shared.config.manifest import PlanConfig

    path = tmp_path / "keys.sqlite"
    store = KeyStore(path)
    key_id, key = store.create("free")
    gate = Gate(store, {"free": PlanConfig(10, 10_000)})
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # committed from the timer's thread
    unlock = threading.Timer(0.3, other.execute, ("COMMIT",))  # a thread: the stop may hold the event loop

    async def stop_as_requests_end() -> None:
        answered = await gate.admit(key, PROMPT, 50)
        other.execute("BEGIN IMMEDIATE")  # the store's next write waits for this one (within BUSY_TIMEOUT_S)
        asking = asyncio.ensure_future(gate.admit(key, PROMPT, 50))
        await asyncio.sleep(0.3)
        asking.cancel()  # its asker leaves while the store's thread waits to admit it
        with pytest.raises(asyncio.CancelledError):
            await asking
        asyncio.ensure_future(gate.settle(answered, 7))  # the answered request's settle, as the router stops
        unlock.start()
        await gate.close()

    try:
        with caplog.at_level("ERROR", logger="tierline.router.auth"):
            asyncio.run(stop_as_requests_end())
    finally:
        if unlock.is_alive():
            unlock.join()
        other.close()
    reopened = KeyStore(path)
    try:
        assert [(k.calls_today, k.tokens_today) for k in reopened.list()] == [(1, 7)]  # not (2, 7 + reservation)
    finally:
        reopened.close()
    assert gate.unsettled == 0 and "not recorded" not in caplog.text, caplog.text
