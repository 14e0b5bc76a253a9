"""API keys, plans and quotas, checked by a real router (nats-server, edge, router processes)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest

from tests.conftest import new_key, run_cli
from tierline import (
    AsyncInferenceClient,
    InferenceClient,
    PermissionDenied,
    QuotaExceeded,
    TierlineError,
    Unauthenticated,
)
from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_infra.supervisor import Stack, write_manifest
from tierline_router.auth import KeyStore
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
    so the store's lookups can be counted per request (gRPC and HTTP, answered or refused)."""
    import aiohttp

    from tierline_router.auth import Gate
    from tierline_router.openai_http import OpenAIServer
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

        async def post(session, data, expected: int) -> None:
            async with session.post(f"http://127.0.0.1:{http_port}/v1/completions", data=data,
                                    headers={"authorization": f"Bearer {key}"}) as resp:
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
        finally:
            await http.stop()
            await server.stop(0)
            await nc.close()
            gate.close()
        return lookups

    lookups = asyncio.run(run())
    assert lookups == {name: 1 for name in ("grpc infer", "grpc stream", "grpc invalid", "http infer",
                                            "http stream", "http invalid")}


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
