"""The attacks of issue 24, replayed against the platform as it runs (real nats-server with TLS and one
identity per role, real tiers, router and board), each with a stolen board's identity and with a leaked
tier's: every one is refused, and what each role legitimately does still works.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import grpc
import nats
import pytest

from tests.conftest import run_cli
from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_infra.supervisor import Stack, accepted
from tierline_shared.security.identities import ROUTER, IdentityStore, device_identity, permissions, tier_identity
from tierline_shared.transport.messaging import (
    BATCH_BUCKET,
    BATCH_STREAM,
    DESIRED_BUCKET,
    DEVICES_BUCKET,
    FILES_BUCKET,
    RESULTS_BUCKET,
    TELEMETRY_STREAM,
    NatsAuthError,
    connect,
)

BOARD, OTHER = "pi-sec-1", "pi-sec-2"
TIMEOUT = 30  # seconds, every RPC here
REFUSED_S = 1.5  # a refused JetStream call gets no reply: it times out after this long
FORGED = "FORGED ANSWER"
REQUESTS = 20


@pytest.fixture(scope="module")
def stack(tiny_family):
    overrides = {  # every request to the edge, whose answer is kept
        "router.device_complexity": 0.0, "router.cloud_complexity": 1.0, "router.confidence_threshold": {"edge": 0.0},
        "device_agent": {"device_id": BOARD, "heartbeat_s": 0.2},
    }
    with Stack(tiny_family, tiers=("device", "edge"), jetstream=True, overrides=overrides) as s:
        IdentityStore(s.credentials).create(device_identity(OTHER))  # a second board, provisioned
        s.nats.reload()
        accepted(s.nats_options(device_identity(OTHER)))
        yield s


ATTACKERS = [device_identity(BOARD), tier_identity("device")]  # a stolen board; a leaked tier identity


def _route(stack: Stack, n: int = REQUESTS) -> list[pb.InferResponse]:
    channel = grpc.insecure_channel(stack.router_address)
    router = pb_grpc.InferenceServiceStub(channel)
    try:
        return [router.Infer(pb.InferRequest(prompt=f"Q:{i}+2=?\nA:", parameters=pb.Parameters(max_tokens=6)),
                             timeout=TIMEOUT) for i in range(n)]
    finally:
        channel.close()


async def _as(stack: Stack, identity: str):
    """A connection with `identity`'s seed (what the attacker holds), recording the server's refusals."""
    errors: list[str] = []

    async def on_error(exc):
        errors.append(str(exc).lower())

    nc = await nats.connect(error_cb=on_error, **stack.nats_options(identity).connect_kwargs())
    return nc, errors


@pytest.mark.parametrize("attacker", ATTACKERS)
def test_a_stolen_identity_reads_no_prompt_and_no_answer(stack, attacker):
    async def main():
        nc, errors = await _as(stack, attacker)
        seen: list = []

        async def tap(msg):
            seen.append(msg.subject)

        for wiretap in ("tierline.>", "_INBOX.>", "_INBOX_router.>", ">", "tierline.edge.infer"):
            await nc.subscribe(wiretap, cb=tap)
        await nc.flush(timeout=TIMEOUT)
        answers = await asyncio.to_thread(_route, stack)
        await nc.flush(timeout=TIMEOUT)
        await nc.close()
        return answers, seen, errors

    answers, seen, errors = asyncio.run(main())
    assert len(answers) == REQUESTS and {a.tier for a in answers} == {"edge"}
    assert seen == []  # not one prompt, not one answer
    assert sum("permissions violation for subscription" in e for e in errors) == 5, errors


@pytest.mark.parametrize("attacker", ATTACKERS)
def test_a_stolen_identity_cannot_answer_for_another_tier(stack, attacker):
    async def main():
        nc, errors = await _as(stack, attacker)

        async def forge(msg):
            await msg.respond(pb.InferResponse(choices=[pb.Choice(text=FORGED, finish_reason="stop")], tier="edge",
                                               confidence=1.0).SerializeToString())

        for verb in ("infer", "stream"):  # joining the edge's queue group
            await nc.subscribe(f"tierline.edge.{verb}", queue="q", cb=forge)
        await nc.flush(timeout=TIMEOUT)
        answers = await asyncio.to_thread(_route, stack, 2 * REQUESTS)
        await nc.close()
        return answers, errors

    answers, errors = asyncio.run(main())
    assert not [a for a in answers if a.choices[0].text == FORGED]
    assert all(a.tier == "edge" and a.choices[0].finish_reason for a in answers)
    assert any("permissions violation for subscription" in e for e in errors), errors


@pytest.mark.parametrize("attacker", ATTACKERS)
def test_a_stolen_identity_cannot_delete_or_overwrite_fleet_state(stack, attacker):
    """Buckets and the telemetry stream cannot be deleted, nor another board's registration or anyone's
    desired model overwritten; the operator then finds everything as it was."""
    async def main():
        op = await connect(stack.nats_options(), name="operator")
        js = op.jetstream(timeout=TIMEOUT)
        devices = await js.key_value(DEVICES_BUCKET)
        await devices.put(OTHER, json.dumps({"device_id": OTHER, "status": "serving"}).encode())
        before = (await devices.get(OTHER)).value

        nc, errors = await _as(stack, attacker)
        ajs = nc.jetstream(timeout=REFUSED_S)
        attempts = {
            "delete the registry bucket": ajs.delete_key_value(DEVICES_BUCKET),
            "delete the desired bucket": ajs.delete_key_value(DESIRED_BUCKET),
            "delete the telemetry stream": ajs.delete_stream(TELEMETRY_STREAM),
            "purge the telemetry stream": ajs.purge_stream(TELEMETRY_STREAM),
            "overwrite another board's registration": ajs.publish(f"$KV.{DEVICES_BUCKET}.{OTHER}", b"{}"),
            "write a desired model": ajs.publish(f"$KV.{DESIRED_BUCKET}.{BOARD}", b"{}"),
            "read another board's desired model": ajs.get_msg(f"KV_{DESIRED_BUCKET}", subject=f"$KV.{DESIRED_BUCKET}."
                                                              f"{OTHER}", direct=True),
        }
        outcomes = await asyncio.gather(*attempts.values(), return_exceptions=True)
        await nc.close()
        after = (await devices.get(OTHER)).value
        streams = {s.config.name for s in await js.streams_info()}
        await op.close()
        return dict(zip(attempts, outcomes)), before, after, streams, errors

    outcomes, before, after, streams, errors = asyncio.run(main())
    succeeded = {what: o for what, o in outcomes.items() if not isinstance(o, Exception)}
    assert not succeeded, succeeded
    assert after == before
    assert {f"KV_{DEVICES_BUCKET}", f"KV_{DESIRED_BUCKET}", TELEMETRY_STREAM} <= streams
    assert any("permissions violation for publish" in e for e in errors), errors


def test_a_leaked_router_identity_cannot_repoint_or_delete_the_batch_streams(stack):
    """The router creates the Batch API's streams and buckets but may not change or delete them: a stream's
    subjects are in the body of the call, which permissions do not see, so an update pointing the work queue at
    the edge's request subject or a board's inbox would record every prompt or answer they carry (the fault hunt
    did that with the router's identity)."""
    from dataclasses import replace

    from tierline_router.batch import BatchStore

    async def main():
        nc, errors = await _as(stack, ROUTER)
        await BatchStore(nc, ack_wait_s=5, max_attempts=1).open()  # creates them, as the router does at its start
        js = nc.jetstream(timeout=REFUSED_S)
        config = (await js.stream_info(BATCH_STREAM)).config  # reading its own streams is allowed
        wiretap = replace(config, subjects=[*config.subjects, "tierline.edge.infer", f"_INBOX_{BOARD}.>"])
        attempts = {
            "repoint the work queue": js.update_stream(wiretap),
            "delete the work queue": js.delete_stream(BATCH_STREAM),
            "delete the batch records": js.delete_key_value(BATCH_BUCKET),
            "delete the results": js.delete_key_value(RESULTS_BUCKET),
            "delete the files": js.delete_object_store(FILES_BUCKET),
        }
        outcomes = await asyncio.gather(*attempts.values(), return_exceptions=True)
        await nc.close()
        op = await connect(stack.nats_options(), name="operator")
        after = (await op.jetstream(timeout=TIMEOUT).stream_info(BATCH_STREAM)).config.subjects
        streams = {s.config.name for s in await op.jetstream(timeout=TIMEOUT).streams_info()}
        await op.close()
        return dict(zip(attempts, outcomes)), config.subjects, after, streams, errors

    outcomes, before, after, streams, errors = asyncio.run(main())
    succeeded = {what: o for what, o in outcomes.items() if not isinstance(o, Exception)}
    assert not succeeded, succeeded
    assert after == before
    assert {BATCH_STREAM, f"KV_{BATCH_BUCKET}", f"KV_{RESULTS_BUCKET}", f"OBJ_{FILES_BUCKET}"} <= streams
    assert any("permissions violation for publish" in e for e in errors), errors


def test_the_router_refuses_batch_streams_someone_repointed(stack):
    """Streams created before the router by someone else (with the router's identity, or an operator's mistake)
    with other subjects are not used: the Batch API is off, saying which stream and why."""
    from dataclasses import replace

    from tierline_router.batch import BatchStore, BatchUnavailable

    async def main():
        op = await connect(stack.nats_options(), name="operator")
        js = op.jetstream(timeout=TIMEOUT)
        await BatchStore(op, ack_wait_s=5, max_attempts=1).open()
        config = (await js.stream_info(BATCH_STREAM)).config
        await js.update_stream(replace(config, subjects=[*config.subjects, "tierline.elsewhere.>"]))
        router = await connect(stack.nats_options(ROUTER), name="router")
        try:
            with pytest.raises(BatchUnavailable, match="TIERLINE_BATCH.*tierline.elsewhere"):
                await BatchStore(router, ack_wait_s=5, max_attempts=1).open()
        finally:
            await js.update_stream(config)
            await router.close()
        await BatchStore(op, ack_wait_s=5, max_attempts=1).open()  # as created: opens
        await op.close()

    asyncio.run(main())


def test_each_board_can_do_its_own_work(stack):
    """The board registered itself over its own identity (the running agent), and may read its own desired key."""
    async def main():
        op = await connect(stack.nats_options(), name="operator")
        entry = json.loads((await (await op.jetstream(timeout=TIMEOUT).key_value(DEVICES_BUCKET)).get(BOARD)).value)
        await op.close()
        return entry

    assert asyncio.run(main())["device_id"] == BOARD
    allowed = permissions(device_identity(BOARD))["publish"]["allow"]
    assert f"$KV.{DEVICES_BUCKET}.{BOARD}" in allowed and f"$KV.{DEVICES_BUCKET}.{OTHER}" not in allowed


def test_a_revoked_board_can_no_longer_connect_and_a_provisioned_one_can(stack):
    proc = run_cli("devices", "provision", "--manifest", str(stack.manifest), "--device", "pi-sec-new")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["identity"] == device_identity("pi-sec-new")
    stack.nats.reload()
    accepted(stack.nats_options(device_identity("pi-sec-new")))

    opts = stack.nats_options(device_identity(OTHER))
    proc = run_cli("devices", "revoke", "--manifest", str(stack.manifest), "--device", OTHER)
    assert proc.returncode == 0, proc.stderr
    stack.nats.reload()

    async def refused() -> bool:
        for _ in range(50):
            try:
                nc = await connect(opts, name="revoked", timeout_s=2)
            except NatsAuthError:
                return True
            await nc.close()
            await asyncio.sleep(0.1)
        return False

    assert asyncio.run(refused())


def test_nats_requires_tls_and_verifies_the_server(stack, tmp_path):
    """A plaintext client is turned away; a client that trusts another CA refuses the server."""
    from tierline_shared.security.tls import client_context, make_ca

    opts = stack.nats_options()
    plain = opts.url.replace("tls://", "nats://")

    async def attempt(**kw):
        try:
            nc = await nats.connect(servers=[kw.pop("url", opts.url)], nkeys_seed_str=opts.seed, connect_timeout=2,
                                    allow_reconnect=False, max_reconnect_attempts=0, **kw)
        except Exception as exc:  # noqa: BLE001 - the failure is the point
            return exc
        await nc.close()
        return None

    other_ca, _ = make_ca(tmp_path)
    assert asyncio.run(attempt(url=plain)) is not None  # no TLS: the server requires it
    assert isinstance(asyncio.run(attempt(tls=client_context(other_ca))), ssl.SSLCertVerificationError)
    assert asyncio.run(attempt(tls=client_context(stack.credentials / "ca.pem"))) is None


def test_an_exposed_tier_port_needs_a_token(tiny_family, tmp_path):
    """Bound beyond loopback, a tier's InferenceService answers only calls with its bearer token (health
    stays open); a manifest that exposes a tier without a token is refused before anything starts."""
    import yaml
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tierline_shared.config.manifest import ManifestError, load_manifest

    token = "t" * 8 + "-0123456789abcdef"
    s = Stack(tiny_family, tiers=("edge",), router=False, secure=False,
              overrides={"tiers.edge.grpc_host": "0.0.0.0", "tiers.edge.grpc_token_file": "edge.token"})
    (s.workdir / "edge.token").write_text(token + "\n")
    with s:
        channel = grpc.insecure_channel(f"127.0.0.1:{s.port('edge-0')}")
        edge = pb_grpc.InferenceServiceStub(channel)
        req = pb.InferRequest(prompt="Q:1+1=?\nA:", parameters=pb.Parameters(max_tokens=4))
        with pytest.raises(grpc.RpcError) as err:
            edge.Infer(req, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            next(iter(edge.InferStream(req, timeout=TIMEOUT, metadata=[("authorization", "Bearer wrong")])))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert edge.Infer(req, timeout=TIMEOUT, metadata=[("authorization", f"Bearer {token}")]).choices[0].text
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        exposed = yaml.safe_load(s.manifest.read_text())
    del exposed["tiers"]["edge"]["grpc_token_file"]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({**exposed, "models_dir": str(tiny_family)}))
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path / "m.yaml", check_artifacts=False)
    assert "tiers.edge.grpc_host" in str(err.value) and "grpc_token_file" in str(err.value)
