"""A tier's NATS link (shared/transport) against a real nats-server: streams and their cancel, and where
requests wait."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from tests.conftest import random_torch_engine
from tierline_api.v1 import inference_pb2 as pb
from tierline_infra.supervisor import NatsServer
from tierline_shared.config.manifest import BatchConfig
from tierline_shared.runtime.engine import GenerationParams
from tierline_shared.serving.process import nats_service_for
from tierline_shared.serving.servicer import TierServicer
from tierline_shared.transport.messaging import NatsOptions, ask_tier, connect, stream_tier, subject
from tierline_shared.transport.tier_service import TierService

TIMEOUT = 30  # seconds, every wait here
CHUNKS = 400  # a stream read to the end has this many chunks
CHUNK_S = 0.01  # seconds between two chunks: a whole stream takes 4 s


class SlowStream:
    """A tier's stream callable: one chunk every CHUNK_S until the end or until is_active() says no."""

    def __init__(self):
        self.sent = 0
        self.stopped_early = threading.Event()
        self.finished = threading.Event()

    def __call__(self, data: bytes, is_active):
        for i in range(CHUNKS):
            if not is_active():
                self.stopped_early.set()
                return
            last = i == CHUNKS - 1
            self.sent += 1
            yield pb.InferResponse(choices=[pb.Choice(text="x", finish_reason="length" if last else "")],
                                   tier="edge").SerializeToString()
            time.sleep(CHUNK_S)
        self.finished.set()


@pytest.fixture
def link(tmp_path):
    server = NatsServer(tmp_path).start()
    opts = NatsOptions(server.url, server.user, server.password)
    producer = SlowStream()
    service = TierService("edge", opts, handle=None, status_of=lambda exc: (grpc.StatusCode.INTERNAL, str(exc)),
                          stream=producer)
    service.start()
    yield opts, producer, service
    service.stop()
    server.stop()


def _read(opts: NatsOptions, chunks: int | None) -> int:
    """Read `chunks` chunks of one stream (None: all of them), then close it; returns how many came."""
    async def main() -> int:
        nc = await connect(opts, name="test")
        try:
            got = 0
            stream = stream_tier(nc, "edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), timeout_s=TIMEOUT)
            async for _ in stream:
                got += 1
                if chunks is not None and got == chunks:
                    break
            await stream.aclose()
            await nc.flush(timeout=TIMEOUT)
            return got
        finally:
            await nc.close()

    return asyncio.run(main())


def test_a_stream_closed_early_stops_the_tier_at_its_next_chunk(link):
    opts, producer, service = link
    assert _read(opts, chunks=3) == 3
    assert producer.stopped_early.wait(TIMEOUT), "the tier kept decoding a stream nobody reads"
    assert producer.sent < CHUNKS // 2  # stopped within a fraction of the stream, not at its end
    deadline = time.monotonic() + TIMEOUT
    while service._live and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not service._live  # nothing is kept for a stream that ended


def test_a_stream_read_to_the_end_is_not_cancelled(link):
    opts, producer, _ = link
    assert _read(opts, chunks=None) == CHUNKS
    assert producer.finished.wait(TIMEOUT) and not producer.stopped_early.is_set()



def test_a_boards_link_streams_from_a_tier_above_and_a_stream_closed_early_stops_it(link):
    """A board's front door streams from a tier above through its TierService (`stream`, from a gRPC thread), as
    the router streams (`stream_tier`): read to its end, every chunk comes; closed early (its app went away), the
    tier above stops decoding at its next chunk; the link stopped meanwhile, the stream ends at once, Offline."""
    from tierline_shared.transport.messaging import Offline

    opts, producer, _ = link
    board = TierService("device", opts, handle=None, status_of=lambda exc: (grpc.StatusCode.INTERNAL, str(exc)))
    board.start()
    try:
        whole = list(board.stream("edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), TIMEOUT))
        assert len(whole) == CHUNKS and whole[-1].choices[0].finish_reason == "length"
        assert producer.finished.wait(TIMEOUT) and not producer.stopped_early.is_set()
        producer.finished.clear()
        chunks = board.stream("edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), TIMEOUT)
        assert [next(chunks) for _ in range(3)] and chunks.close() is None
        assert producer.stopped_early.wait(TIMEOUT), "the tier above kept decoding a stream nobody reads"
        assert not board._asking
        chunks = board.stream("edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), TIMEOUT)
        next(chunks)
        threading.Timer(0.2, board.stop).start()
        t0 = time.monotonic()
        with pytest.raises(Offline):
            list(chunks)
        assert time.monotonic() - t0 < 5
    finally:
        board.stop()


def test_a_stream_whose_chunks_can_no_longer_be_published_stops_the_tier(link):
    """The tier's own link drops mid-stream (its reader stays subscribed, so no cancel comes): publishing the
    next chunk fails, the decoder stops at its next token, and the stream counts as an error."""
    opts, producer, service = link

    async def main() -> None:
        nc = await connect(opts, name="test")
        try:
            three = asyncio.Event()

            async def chunk(msg) -> None:
                three.set() if producer.sent >= 3 else None

            inbox = nc.new_inbox()
            await nc.subscribe(inbox, cb=chunk)
            await nc.publish(subject("edge", "stream"), pb.InferRequest(prompt="Q:2+3=?\nA:").SerializeToString(),
                             reply=inbox)
            await asyncio.wait_for(three.wait(), TIMEOUT)
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(service._nc.close(), service._loop))
        finally:
            await nc.close()

    asyncio.run(main())
    assert producer.stopped_early.wait(TIMEOUT), "the tier kept decoding a stream it could no longer send"
    assert producer.sent < CHUNKS // 2
    deadline = time.monotonic() + TIMEOUT
    while service._counts["stream"].requests < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (service._counts["stream"].requests, service._counts["stream"].errors) == (1, 1)


class GatedEngine(type(random_torch_engine(seed=5))):
    """The real torch engine, whose forward passes wait until `gate` is open."""

    gate = threading.Event()

    def _forward(self, *args):
        assert self.gate.wait(TIMEOUT), "the test never opened the gate"
        return super()._forward(*args)


IN_FLIGHT = 100  # requests sent at once: more than any thread pool a tier might have waited in


def test_every_request_over_nats_waits_in_the_scheduler_not_in_a_thread(tmp_path):
    """The tier's NATS front door queues each request with the scheduler at once: its bounded queue (and
    the queue depth that $SRV.STATS reports) sees every request in flight, however many there are."""
    base = random_torch_engine(seed=5, tier="edge")
    engine = GatedEngine(base.model, base.tokenizer, base.info)
    engine.gate.clear()
    servicer = TierServicer(engine, BatchConfig(max_num_seqs=1, max_queue=2 * IN_FLIGHT))
    server = NatsServer(tmp_path).start()
    opts = NatsOptions(server.url, server.user, server.password)
    service = nats_service_for("edge", opts, servicer)
    service.start()
    try:
        prompts = [f"Q:{i}+1=?\nA:" for i in range(IN_FLIGHT)]

        async def ask_all():
            nc = await connect(opts, name="test")
            try:
                return await asyncio.gather(*(ask_tier(nc, "edge", pb.InferRequest(
                    prompt=p, parameters=pb.Parameters(max_tokens=2)), TIMEOUT) for p in prompts))
            finally:
                await nc.close()

        asking = threading.Thread(target=lambda: answers.extend(asyncio.run(ask_all())), daemon=True)
        answers: list = []
        asking.start()
        deadline = time.monotonic() + TIMEOUT
        # every request reaches the queue, perhaps before the scheduler admits the first: wait for the state
        # where one runs (held at the gate) and all the others queue
        while (servicer.scheduler.running, servicer.scheduler.depth) != (1, IN_FLIGHT - 1) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (servicer.scheduler.running, servicer.scheduler.depth) == (1, IN_FLIGHT - 1)
        engine.gate.set()
        asking.join(TIMEOUT)
        alone = [base.generate(p, GenerationParams(max_tokens=2)).text for p in prompts]
        assert [a.choices[0].text for a in answers] == alone
    finally:
        engine.gate.set()
        service.stop()
        servicer.scheduler.close()
        server.stop()


class CountingEngine(type(random_torch_engine(seed=5))):
    """The real torch engine, counting its forward passes, each held until `gate` is open."""

    gate = threading.Event()
    entered = threading.Event()  # a forward pass waits at the gate
    forwards = 0

    def _forward(self, *args):
        self.entered.set()
        assert self.gate.wait(TIMEOUT), "the test never opened the gate"
        type(self).forwards += 1
        return super()._forward(*args)


def test_a_request_its_asker_gave_up_on_leaves_the_batch(tmp_path):
    """ask_tier that ends without an answer (its deadline, a silent replica, its caller cancelled) tells the tier,
    which takes the request out of the batch at the next step instead of decoding it to the end for nobody."""
    base = random_torch_engine(seed=5, tier="edge")
    engine = CountingEngine(base.model, base.tokenizer, base.info)
    prompt, params = "Q:9*9=?\nA:", pb.Parameters(max_tokens=40)
    steps_alone = base.generate(prompt, GenerationParams(max_tokens=40)).completion_tokens
    assert steps_alone >= 30  # this answer runs to max_tokens: a row left in the batch would take this many
    servicer = TierServicer(engine, BatchConfig(max_num_seqs=4))
    server = NatsServer(tmp_path).start()
    opts = NatsOptions(server.url, server.user, server.password)
    service = nats_service_for("edge", opts, servicer)
    service.start()
    try:
        engine.gate.clear()
        engine.entered.clear()

        async def give_up() -> None:  # its caller goes away once the request runs (its first forward, held)
            nc = await connect(opts, name="test")
            try:
                asking = asyncio.ensure_future(ask_tier(nc, "edge", pb.InferRequest(prompt=prompt, parameters=params),
                                                        TIMEOUT))
                assert await asyncio.to_thread(engine.entered.wait, TIMEOUT)
                asking.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await asking
                await nc.flush(timeout=TIMEOUT)
            finally:
                await nc.close()

        asyncio.run(give_up())
        deadline = time.monotonic() + TIMEOUT / 3  # well within the request's own deadline (TIMEOUT)
        while (service._live or not servicer.scheduler.running) and time.monotonic() < deadline:
            time.sleep(0.01)  # it reached the batch, and the cancel reached the tier
        assert not service._live, "the tier never heard that its requester gave up"
        assert servicer.scheduler.running == 1  # still held at its first forward
        engine.gate.set()
        while servicer.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert servicer.scheduler.running == 0 and CountingEngine.forwards <= 3, CountingEngine.forwards
    finally:
        engine.gate.set()
        service.stop()
        servicer.scheduler.close()
        server.stop()


def _counted_edge(tmp_path):
    """A CountingEngine's edge tier served over NATS on a server of its own: (engine, servicer, server, its
    options, the service)."""
    base = random_torch_engine(seed=5, tier="edge")
    engine = CountingEngine(base.model, base.tokenizer, base.info)
    servicer = TierServicer(engine, BatchConfig(max_num_seqs=4))
    server = NatsServer(tmp_path).start()
    opts = NatsOptions(server.url, server.user, server.password)
    service = nats_service_for("edge", opts, servicer)
    service.start()
    return engine, servicer, server, opts, service


def test_a_cancel_that_comes_before_its_request_still_stops_it(tmp_path):
    """The tier handles each subscription's messages in a task of its own, so a cancel sent just after its request
    (a client gone at once) can be handled first: it is remembered, and the request stops as it arrives."""
    from tierline_shared.transport.messaging import STREAM_ID_HEADER, TIMEOUT_HEADER

    engine, servicer, server, opts, service = _counted_edge(tmp_path)
    engine.gate.clear()  # were it decoded, its first forward would wait here until its own deadline
    try:
        async def main() -> int:
            nc = await connect(opts, name="test")
            try:
                inbox = nc.new_inbox()
                replies = await nc.subscribe(inbox)
                await nc.publish(subject("edge", "cancel"), inbox.encode())
                await nc.flush(timeout=TIMEOUT)
                await asyncio.sleep(0.3)  # the cancel is there first
                await nc.publish(subject("edge"), pb.InferRequest(prompt="Q:9*9=?\nA:").SerializeToString(),
                                 reply=inbox, headers={STREAM_ID_HEADER: inbox, TIMEOUT_HEADER: f"{TIMEOUT}"})
                await nc.flush(timeout=TIMEOUT)
                deadline = time.monotonic() + TIMEOUT / 3  # well within the request's own deadline
                while service._counts["infer"].cancelled < 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.2)
                return replies.pending_msgs
            finally:
                await nc.close()

        answered = asyncio.run(main())
        assert service._counts["infer"].cancelled == 1, "the request ran on though its cancel had come"
        assert answered == 0 and not service._live and not service._early
    finally:
        engine.gate.set()
        service.stop()
        servicer.scheduler.close()
        server.stop()


async def _endpoint_stats(nc, name: str) -> dict:
    """The one edge replica's $SRV.STATS figures for endpoint `name`, as `tierline status` reads them."""
    from tierline_shared.transport.messaging import discover

    (replica,) = await discover(nc, "edge", "STATS", wait_s=1.0)
    return next(e for e in replica["endpoints"] if e["name"] == name)


def test_a_cancelled_request_is_counted_apart_in_the_replicas_stats(tmp_path):
    """A request its asker gave up on got no reply: $SRV.STATS counts it as `num_cancelled` (the tier's metrics:
    outcome="cancelled"), not as a request answered, and its time stays out of the mean; answers and errors are
    counted as before."""
    from tierline_shared.transport.messaging import discover

    engine, servicer, server, opts, service = _counted_edge(tmp_path)
    engine.gate.clear()
    engine.entered.clear()
    try:
        async def main() -> tuple[dict, dict]:
            nc = await connect(opts, name="test")
            try:
                asking = asyncio.ensure_future(ask_tier(nc, "edge", pb.InferRequest(
                    prompt="Q:9*9=?\nA:", parameters=pb.Parameters(max_tokens=40)), TIMEOUT))
                assert await asyncio.to_thread(engine.entered.wait, TIMEOUT)  # it runs, held at its first forward
                asking.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await asking
                await nc.flush(timeout=TIMEOUT)
                deadline = time.monotonic() + TIMEOUT / 3
                while service._live and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)  # the cancel reached the tier, which let the request go
                after_cancel = await _endpoint_stats(nc, "infer")
                engine.gate.set()
                await ask_tier(nc, "edge", pb.InferRequest(prompt="Q:2+3=?\nA:",
                                                           parameters=pb.Parameters(max_tokens=4)), TIMEOUT)
                assert len(await discover(nc, "edge")) == 1
                return after_cancel, await _endpoint_stats(nc, "infer")
            finally:
                await nc.close()

        after_cancel, after_answer = asyncio.run(main())
        assert not service._live, "the tier never heard that its requester gave up"
        counted = lambda e: (e["num_requests"], e["num_errors"], (e["data"] or {}).get("num_cancelled"))  # noqa: E731
        assert counted(after_cancel) == (0, 0, 1), after_cancel
        assert (after_cancel["processing_time"], after_cancel["average_processing_time"]) == (0, 0)
        assert counted(after_answer) == (1, 0, 1), after_answer
        assert after_answer["average_processing_time"] == after_answer["processing_time"]  # the answer's time only
        assert after_answer["data"]["queue_depth"] == 0  # the tier's own figures are still there
    finally:
        engine.gate.set()
        service.stop()
        servicer.scheduler.close()
        server.stop()


def test_a_stream_closed_early_is_counted_as_cancelled_not_answered(link):
    """The same for a stream whose reader went away: `num_cancelled` on the stream endpoint, not a request."""
    opts, producer, service = link
    assert _read(opts, chunks=3) == 3
    assert producer.stopped_early.wait(TIMEOUT)

    async def stats() -> dict:
        nc = await connect(opts, name="test")
        try:
            deadline = time.monotonic() + TIMEOUT
            while service._live and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the stream's task has ended, and counted itself
            return await _endpoint_stats(nc, "stream")
        finally:
            await nc.close()

    stream = asyncio.run(stats())
    assert (stream["num_requests"], stream["num_errors"], (stream["data"] or {}).get("num_cancelled")) == (0, 0, 1)


def test_a_drain_never_outlasts_the_supervisors_patience(tmp_path):
    """A subscription whose messages nobody reads holds nats-py's drain for 30 s by default; every Tierline
    connection bounds it (DRAIN_TIMEOUT_S), so a process told to stop closes before the supervisor's SIGKILL."""
    from tierline_infra.supervisor import STOP_TIMEOUT_S
    from tierline_shared.transport.messaging import DRAIN_TIMEOUT_S

    server = NatsServer(tmp_path).start()

    async def main() -> float:
        nc = await connect(NatsOptions(server.url, server.user, server.password), name="test-drain")
        sub = await nc.subscribe("tierline.test.unread")
        await nc.publish("tierline.test.unread", b"x")
        await nc.flush()
        await sub.next_msg(timeout=5)  # one read: the subscription works
        await nc.publish("tierline.test.unread", b"y")  # and one nobody reads
        await nc.flush()
        t0 = time.monotonic()
        await nc.drain()
        return time.monotonic() - t0

    try:
        took = asyncio.run(main())
    finally:
        server.stop()
    assert took > DRAIN_TIMEOUT_S - 0.5  # it waited on the unread message (nats-py's default: 30 s), then closed
    assert took < STOP_TIMEOUT_S - 2  # the router's gRPC grace (2 s) comes first


def test_requests_share_one_reply_subscription_and_each_gets_its_own_answer(tmp_path):
    """ask_tier and stream_tier take their replies on one wildcard subscription per connection (one PUB per
    request, not SUB + PUB + UNSUB): answers that come back out of order reach their own requests, a reply
    after its request gave up is dropped, no replica is still NoRespondersError at once, and nothing is kept
    for a request that ended."""
    import random

    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from tierline_shared.transport.messaging import _replies

    server = NatsServer(tmp_path).start()
    opts = NatsOptions(server.url, server.user, server.password)

    async def main():
        tier = await connect(opts, name="test-tier")
        nc = await connect(opts, name="test-asker")
        try:
            async def answer(msg) -> None:  # each answer after a random delay: they come back out of order
                prompt = pb.InferRequest.FromString(msg.data).prompt
                await asyncio.sleep(random.uniform(0, 0.05) if prompt != "late" else 1.0)
                await tier.publish(msg.reply, pb.InferResponse(
                    choices=[pb.Choice(text=prompt, finish_reason="stop")], tier="edge").SerializeToString())

            async def answer_in_chunks(msg) -> None:
                prompt = pb.InferRequest.FromString(msg.data).prompt
                for i, ch in enumerate(prompt):
                    await asyncio.sleep(random.uniform(0, 0.01))
                    last = i == len(prompt) - 1
                    await tier.publish(msg.reply, pb.InferResponse(choices=[pb.Choice(
                        text=ch, finish_reason="stop" if last else "")], tier="edge").SerializeToString())

            async def unary_cb(msg) -> None:  # each its own task: a callback holds its subscription's next message
                asyncio.ensure_future(answer(msg))

            async def stream_cb(msg) -> None:
                asyncio.ensure_future(answer_in_chunks(msg))

            await tier.subscribe(subject("edge"), cb=unary_cb)
            await tier.subscribe(subject("edge", "stream"), cb=stream_cb)
            await tier.flush()
            subs_before = len(nc._subs)

            async def streamed(prompt: str) -> str:
                return "".join([c.choices[0].text async for c in stream_tier(nc, "edge", pb.InferRequest(
                    prompt=prompt), timeout_s=TIMEOUT)])

            prompts = [f"Q:{i}+{i}=?" for i in range(60)]
            unary = [ask_tier(nc, "edge", pb.InferRequest(prompt=p), TIMEOUT) for p in prompts]
            answers = await asyncio.gather(*unary, *(streamed(p) for p in prompts))
            assert [a.choices[0].text for a in answers[:60]] == prompts and answers[60:] == prompts
            with pytest.raises(NatsTimeout):  # its answer comes after it gave up, and goes nowhere
                await ask_tier(nc, "edge", pb.InferRequest(prompt="late"), 0.3)
            await asyncio.sleep(1.0)
            assert (await ask_tier(nc, "edge", pb.InferRequest(prompt="next"), TIMEOUT)).choices[0].text == "next"
            with pytest.raises(NoRespondersError):
                await ask_tier(nc, "cloud", pb.InferRequest(prompt="x"), TIMEOUT)
            assert len(nc._subs) - subs_before == 1  # the one reply subscription, for every request
            assert not _replies(nc)._boxes
        finally:
            await nc.close()
            await tier.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_refusal_after_connecting_is_logged_once_naming_the_subject(tmp_path, caplog):
    """The server refuses a publish apart from the call (which succeeds, or times out waiting for an answer):
    the connection's error callback says so in the log, the same refusal once however often it comes."""
    import logging

    from tierline_shared.security.credentials import init_credentials
    from tierline_shared.security.identities import IdentityStore, inbox_prefix, read_seed, tier_identity

    made = init_credentials(tmp_path / "creds")
    server = NatsServer(tmp_path, credentials=tmp_path / "creds").start()
    edge = tier_identity("edge")
    opts = NatsOptions(server.url, identity=edge, inbox_prefix=inbox_prefix(edge), tls_ca=made["tls_ca"],
                       seed=read_seed(IdentityStore(tmp_path / "creds").seed_path(edge)))

    async def main():
        nc = await connect(opts, name="test-refused")
        try:
            for _ in range(5):  # the edge may ask only the cloud: the device's subject is refused
                await nc.publish(subject("device"), b"x")
                await nc.flush(timeout=TIMEOUT)
            await asyncio.sleep(0.5)
        finally:
            await nc.close()

    try:
        with caplog.at_level(logging.WARNING, logger="tierline.nats"):
            asyncio.run(main())
    finally:
        server.stop()
    refusals = [r.getMessage() for r in caplog.records if "permissions violation" in r.getMessage().lower()]
    assert len(refusals) == 1 and subject("device") in refusals[0] and "test-refused" in refusals[0], caplog.text


def test_a_closed_connection_that_asked_a_tier_is_freed(tmp_path):
    """A connection's reply subscription (`_replies`) lives as long as the connection, not longer: a process that
    makes connections and closes them (the bench, the CLI, tests) does not keep each one, buffers and all."""
    import gc
    import weakref

    server = NatsServer(tmp_path).start()
    opts = NatsOptions(server.url, server.user, server.password)

    async def main():
        nc = await connect(opts, name="test")

        async def answer(msg) -> None:
            await nc.publish(msg.reply, pb.InferResponse(tier="edge").SerializeToString())

        await nc.subscribe(subject("edge"), cb=answer)
        assert (await ask_tier(nc, "edge", pb.InferRequest(prompt="Q:1+1=?\nA:"), TIMEOUT)).tier == "edge"
        await nc.close()
        return weakref.ref(nc)

    try:
        gone = asyncio.run(main())
        gc.collect()
        assert gone() is None
    finally:
        server.stop()



async def _answers_when_stopped(service, asking: list) -> tuple[list, float]:
    """Stop `service` (from a thread, as its tier process does) while `asking` wait: what each got (an exception
    included), and how long after the stop began the last one came."""
    t0 = time.monotonic()
    stopping = asyncio.ensure_future(asyncio.to_thread(service.stop))
    got = await asyncio.gather(*asking, return_exceptions=True)
    took = time.monotonic() - t0
    await stopping
    return list(got), took


def _unary_tier(tmp_path, handle):
    """A nats-server of its own and, on it, an edge TierService answering unary requests with `handle` (data,
    timeout -> a concurrent Future of the InferResponse), started: (server, its options, the service)."""
    server = NatsServer(tmp_path).start()
    opts = NatsOptions(server.url, server.user, server.password)
    service = TierService("edge", opts, handle=handle,
                          status_of=lambda exc: (grpc.StatusCode.INTERNAL, str(exc)), stream=None)
    service.start()
    return server, opts, service


def test_a_request_longer_than_the_silence_limit_is_kept_alive_by_heartbeats_and_answered(tmp_path):
    """A tier working on a request for longer than SILENCE_S says so every HEARTBEAT_S (empty replies with the
    progress header), so its asker neither takes the replica for dead nor asks another; the answer follows, and
    no beat is sent once it has. An asker that asked for no heartbeat hears none."""
    import concurrent.futures

    from tierline_shared.transport.messaging import (
        HEARTBEAT_HEADER,
        HEARTBEAT_S,
        PROGRESS_HEADER,
        SILENCE_S,
        TIMEOUT_HEADER,
    )

    took_s = SILENCE_S + 0.5

    def handle(data: bytes, timeout):
        answer: concurrent.futures.Future = concurrent.futures.Future()
        threading.Timer(took_s, answer.set_result, [pb.InferResponse(tier="edge", choices=[pb.Choice(text="5")])]
                        ).start()
        return answer

    server, opts, service = _unary_tier(tmp_path, handle)
    try:
        async def main():
            nc = await connect(opts, name="test")
            try:
                answer = await ask_tier(nc, "edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), TIMEOUT)
                heard: dict[str, list] = {}
                for name, headers in (("beats", {TIMEOUT_HEADER: f"{TIMEOUT}", HEARTBEAT_HEADER: f"{HEARTBEAT_S}"}),
                                      ("none", {TIMEOUT_HEADER: f"{TIMEOUT}"})):
                    got = heard[name] = []

                    async def keep(msg, got=got):
                        got.append(msg)

                    inbox = nc.new_inbox()
                    sub = await nc.subscribe(inbox, cb=keep)
                    await nc.publish(subject("edge"), pb.InferRequest(prompt="Q:2+3=?\nA:").SerializeToString(),
                                     reply=inbox, headers=headers)
                    deadline = time.monotonic() + TIMEOUT
                    while not any(m.data for m in got) and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(3 * HEARTBEAT_S)  # a beat after the answer would come in this time
                    await sub.unsubscribe()
                return answer, heard
            finally:
                await nc.close()

        answer, heard = asyncio.run(main())
        assert answer.choices[0].text == "5"
        beats, last = heard["beats"][:-1], heard["beats"][-1]
        assert pb.InferResponse.FromString(last.data).choices[0].text == "5"  # the answer, last: no beat after it
        assert all(m.data == b"" and (m.headers or {}).get(PROGRESS_HEADER) == "1" for m in beats)
        assert int(took_s / HEARTBEAT_S) - 2 <= len(beats) <= int(took_s / HEARTBEAT_S) + 1, len(beats)
        assert len(heard["none"]) == 1 and heard["none"][0].data  # the answer alone
    finally:
        service.stop()
        server.stop()


def test_a_stream_in_flight_when_the_tier_stops_ends_with_unavailable_and_counts_as_an_error(link):
    """A tier that stops (SIGTERM, a drain) mid-stream tells the reader at once, after the chunks already sent:
    UNAVAILABLE "the tier is shutting down", not silence until its timeout; the decoding stops, and $SRV.STATS
    counts the stream as an error, not as an answer nor as cancelled by its reader."""
    from tierline_shared.transport.messaging import SILENCE_S, TierError

    opts, producer, service = link

    async def main() -> tuple[int, TierError, float]:
        nc = await connect(opts, name="test")
        try:
            got, stopping, stopped_at = 0, None, 0.0
            with pytest.raises(TierError) as ended:
                async for _ in stream_tier(nc, "edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), timeout_s=5):
                    got += 1
                    if got == 5:
                        stopped_at = time.monotonic()
                        stopping = asyncio.ensure_future(asyncio.to_thread(service.stop))
            took = time.monotonic() - stopped_at
            await stopping
            return got, ended.value, took
        finally:
            await nc.close()

    got, error, took = asyncio.run(main())
    assert (error.status, error.message) == ("UNAVAILABLE", "the tier is shutting down"), error
    assert 5 <= got < CHUNKS and took < SILENCE_S, (got, took)
    assert producer.stopped_early.wait(TIMEOUT), "the tier kept decoding a stream after it stopped"
    counts = service._counts["stream"]
    assert (counts.requests, counts.errors, counts.cancelled) == (1, 1, 0), counts
    assert counts.last_error == "TierStopping: the tier is shutting down"


def test_a_request_in_flight_when_the_tier_stops_gets_unavailable_at_once(tmp_path):
    """The same for a unary request: its asker hears UNAVAILABLE at once (the router asks elsewhere) rather than
    silence until SILENCE_S or its timeout, the work leaves the batch, and it counts as an error."""
    import concurrent.futures

    from tierline_shared.transport.messaging import SILENCE_S, TierError

    asked: list[concurrent.futures.Future] = []

    def handle(data: bytes, timeout):  # an answer that never comes: the request is still running when the tier stops
        asked.append(concurrent.futures.Future())
        return asked[-1]

    server, opts, service = _unary_tier(tmp_path, handle)
    try:
        async def main() -> tuple[BaseException, float]:
            nc = await connect(opts, name="test")
            try:
                asking = asyncio.ensure_future(ask_tier(nc, "edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), TIMEOUT))
                deadline = time.monotonic() + TIMEOUT
                while not asked and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                (error,), took = await _answers_when_stopped(service, [asking])
                return error, took
            finally:
                await nc.close()

        error, took = asyncio.run(main())
        assert isinstance(error, TierError), repr(error)
        assert (error.status, error.message) == ("UNAVAILABLE", "the tier is shutting down") and took < SILENCE_S
        assert asked[0].cancelled()  # it left the batch
        counts = service._counts["infer"]
        assert (counts.requests, counts.errors, counts.cancelled) == (1, 1, 0), counts
    finally:
        service.stop()
        server.stop()


def test_a_stream_in_flight_when_the_tier_stops_with_a_grace_is_read_to_its_end(link):
    """A tier stopping with a grace (tiers.<tier>.stop_grace_s: a rolling upgrade) lets a stream in flight finish:
    every chunk reaches its reader and it counts as an answer, where without a grace it was cut mid-way with
    UNAVAILABLE, which no one can retry once chunks were read. The stop returns when the stream ends, not at the
    end of the grace; a request sent once the stop began is not taken (no responders)."""
    import nats.errors

    opts, producer, service = link
    grace = 20.0

    async def main() -> tuple[int, float, BaseException | None]:
        nc = await connect(opts, name="test")
        try:
            got, stopping, t0 = 0, None, 0.0
            async for _ in stream_tier(nc, "edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), timeout_s=TIMEOUT):
                got += 1
                if got == 5:
                    t0 = time.monotonic()
                    stopping = asyncio.ensure_future(asyncio.to_thread(service.stop, grace))
                    await asyncio.sleep(0.2)
                    late = None
                    try:  # the replica left its queue group at once: a new request finds no one
                        await ask_tier(nc, "edge", pb.InferRequest(prompt="Q:1+1=?\nA:"), timeout_s=2)
                    except nats.errors.NoRespondersError as exc:
                        late = exc
            await stopping
            return got, time.monotonic() - t0, late
        finally:
            await nc.close()

    got, took, late = asyncio.run(main())
    assert got == CHUNKS and producer.finished.is_set() and not producer.stopped_early.is_set(), got
    assert took < CHUNKS * CHUNK_S + 5 < grace, took  # stopped once the stream ended: not the whole grace
    assert late is not None, "a request sent after the stop began was taken"
    counts = service._counts["stream"]
    assert (counts.requests, counts.errors, counts.cancelled) == (1, 0, 0), counts


def test_a_request_still_running_at_the_end_of_the_grace_gets_unavailable_then(tmp_path):
    """Unary requests in flight when the tier stops with a grace: one answered within it gets its answer; one
    still running when the grace ends leaves the batch and gets UNAVAILABLE (another replica may take it) then,
    and the stop ends with it, not later."""
    import concurrent.futures

    from tierline_shared.transport.messaging import SILENCE_S, TierError

    asked: list[concurrent.futures.Future] = []

    def handle(data: bytes, timeout):  # answered by the test, or never
        asked.append(concurrent.futures.Future())
        return asked[-1]

    grace = 1.5
    server, opts, service = _unary_tier(tmp_path, handle)
    try:
        async def main():
            nc = await connect(opts, name="test")
            try:
                asking = [asyncio.ensure_future(ask_tier(nc, "edge", pb.InferRequest(prompt=f"Q:{i}+3=?\nA:"),
                                                         TIMEOUT)) for i in range(2)]
                deadline = time.monotonic() + TIMEOUT
                while len(asked) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                t0 = time.monotonic()
                stopping = asyncio.ensure_future(asyncio.to_thread(service.stop, grace))
                await asyncio.sleep(0.3)
                asked[0].set_result(pb.InferResponse(choices=[pb.Choice(text="5")], tier="edge"))
                answered = await asking[0]
                first = time.monotonic() - t0
                with pytest.raises(TierError) as ended:
                    await asking[1]
                second = time.monotonic() - t0
                await stopping
                return answered, first, ended.value, second, time.monotonic() - t0
            finally:
                await nc.close()

        answered, first, error, second, stopped = asyncio.run(main())
        assert answered.choices[0].text == "5" and first < grace, first
        assert (error.status, error.message) == ("UNAVAILABLE", "the tier is shutting down"), error
        assert grace <= second < grace + SILENCE_S and stopped < grace + SILENCE_S + 1, (second, stopped)
        assert asked[1].cancelled()  # it left the batch
        counts = service._counts["infer"]
        assert (counts.requests, counts.errors, counts.cancelled) == (2, 1, 0), counts
    finally:
        service.stop()
        server.stop()


@pytest.mark.parametrize("direct", [False, True])
def test_requests_the_tier_has_taken_but_not_yet_read_when_it_stops_get_unavailable_not_silence(tmp_path, direct):
    """Requests already on their way to a replica when it stops (on its socket, or in its subscription's queue, not
    yet handed to its callback) were dropped unanswered by nats.micro's unsubscribe: their askers waited for a silence
    (ReplicaSilent after SILENCE_S) or their timeout. The endpoints are drained now: each is answered UNAVAILABLE,
    marked for another replica. So is the replica's own subject (`direct`: a retry after a silence goes there), which
    a review found unsubscribed at first."""
    import concurrent.futures

    from tierline_shared.transport.messaging import SILENCE_S, TierError, _ask_one

    def handle(data: bytes, timeout):
        return concurrent.futures.Future()  # never answered: only the stop answers

    server, opts, service = _unary_tier(tmp_path, handle)
    try:
        async def main() -> tuple[list, float]:
            nc = await connect(opts, name="test")
            try:
                held = threading.Event()
                service._loop.call_soon_threadsafe(lambda: (held.set(), time.sleep(0.5)))  # the tier's loop busy
                assert await asyncio.to_thread(held.wait, TIMEOUT)
                to = subject("edge", replica=service._service.id) if direct else subject("edge")
                deadline = asyncio.get_running_loop().time() + TIMEOUT
                asking = [asyncio.ensure_future(_ask_one(nc, "edge", to, pb.InferRequest(prompt=f"Q:{i}+1=?\nA:"),
                                                         deadline)) for i in range(10)]
                await nc.flush(timeout=TIMEOUT)  # all 10 at the server: on their way to the busy replica
                return await _answers_when_stopped(service, asking)  # its stop queued behind the busy loop
            finally:
                await nc.close()

        errors, took = asyncio.run(main())
        assert all(isinstance(e, TierError) and e.status == "UNAVAILABLE" and e.other_replica for e in errors), errors
        assert took < SILENCE_S, took
    finally:
        service.stop()
        server.stop()


def test_no_heartbeat_follows_the_answer_when_both_fall_due_together(tmp_path):
    """The answer and a beat due at the same moment (the tier's loop was busy when both came due): the beat, not yet
    sent, is dropped; it was published after the answer."""
    import concurrent.futures

    from tierline_shared.transport.messaging import HEARTBEAT_HEADER, HEARTBEAT_S, TIMEOUT_HEADER

    answers: list[concurrent.futures.Future] = []

    def handle(data: bytes, timeout):
        answers.append(concurrent.futures.Future())
        return answers[-1]

    server, opts, service = _unary_tier(tmp_path, handle)
    try:
        async def main() -> list:
            nc = await connect(opts, name="test")
            try:
                got = []

                async def keep(msg):
                    got.append(msg)

                inbox = nc.new_inbox()
                sub = await nc.subscribe(inbox, cb=keep)
                beats = {TIMEOUT_HEADER: f"{TIMEOUT}", HEARTBEAT_HEADER: f"{HEARTBEAT_S}"}
                await nc.publish(subject("edge"), pb.InferRequest(prompt="Q:2+3=?\nA:").SerializeToString(),
                                 reply=inbox, headers=beats)
                deadline = time.monotonic() + TIMEOUT
                while not answers and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                held = threading.Event()
                # the tier's loop busy past the first beat's time; the answer comes meanwhile
                service._loop.call_soon_threadsafe(lambda: (held.set(), time.sleep(2 * HEARTBEAT_S)))
                assert await asyncio.to_thread(held.wait, TIMEOUT)
                answers[0].set_result(pb.InferResponse(tier="edge", choices=[pb.Choice(text="5")]))
                while not any(m.data for m in got) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(3 * HEARTBEAT_S)
                await sub.unsubscribe()
                return got
            finally:
                await nc.close()

        got = asyncio.run(main())
        assert got and got[-1].data, [(m.data, m.headers) for m in got]  # the answer is the last word
    finally:
        service.stop()
        server.stop()


def test_a_retry_after_a_silence_goes_to_a_replica_that_answers_and_not_to_an_impostor(tmp_path):
    """ask_tier's `after_silence` asks $SRV.PING who is alive. Found by a review: the first reply ended the probe even
    when it named no usable replica (`[]`, an id that is no subject token), and a replica that answered the probe but
    then said nothing to the request (hung since; a server whose permissions predate its subject) failed the retry.
    Now the probe takes the first usable reply, and a silent direct attempt falls back to the queue group in the time
    left, as does a probe nobody answers in time (a slow link, a busy replica); with no replica up, it ends at
    once."""
    import concurrent.futures
    import json

    import nats.errors

    from tierline_shared.transport.messaging import PROBE_S, SILENCE_S, _alive_replica, service_name

    def handle(data: bytes, timeout):
        answer: concurrent.futures.Future = concurrent.futures.Future()
        answer.set_result(pb.InferResponse(tier="edge", choices=[pb.Choice(text="5")]))
        return answer

    server, opts, service = _unary_tier(tmp_path, handle)
    try:
        async def main():
            nc = await connect(opts, name="test")
            impostor = await connect(opts, name="impostor")
            try:
                t0 = time.monotonic()
                with pytest.raises(nats.errors.NoRespondersError):  # no cloud replica: at once
                    await _alive_replica(nc, "cloud", 10.0)
                no_one_s = time.monotonic() - t0
                held = threading.Event()  # the only replica does not answer the probe in time (busy): the queue
                service._loop.call_soon_threadsafe(lambda: (held.set(), time.sleep(3 * PROBE_S)))
                assert await asyncio.to_thread(held.wait, TIMEOUT)
                busy = await ask_tier(nc, "edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), TIMEOUT, after_silence=True)

                async def claim(msg):  # answers the probe first, with nothing usable, then with a replica of its own
                    for reply in ([], {"id": "x.>"}, {"name": "no id"}):
                        await msg.respond(json.dumps(reply).encode())

                async def swallow(msg):  # takes the requests sent to "ghost" and says nothing
                    pass

                await impostor.subscribe(f"$SRV.PING.{service_name('edge')}", cb=claim)
                await impostor.subscribe(subject("edge", replica="ghost"), cb=swallow)
                await impostor.flush(timeout=TIMEOUT)
                held.clear()
                service._loop.call_soon_threadsafe(lambda: (held.set(), time.sleep(0.1)))  # the replica answers last
                assert await asyncio.to_thread(held.wait, TIMEOUT)
                alive = await _alive_replica(nc, "edge", 10.0)

                async def ghost(msg):  # now it claims a replica that does not answer
                    await msg.respond(json.dumps({"id": "ghost"}).encode())

                await impostor.close()
                impostor = await connect(opts, name="impostor")
                await impostor.subscribe(f"$SRV.PING.{service_name('edge')}", cb=ghost)
                await impostor.subscribe(subject("edge", replica="ghost"), cb=swallow)
                await impostor.flush(timeout=TIMEOUT)
                held.clear()
                service._loop.call_soon_threadsafe(lambda: (held.set(), time.sleep(0.1)))  # "ghost" answers first
                assert await asyncio.to_thread(held.wait, TIMEOUT)
                t0 = time.monotonic()
                answer = await ask_tier(nc, "edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), TIMEOUT, after_silence=True)
                return no_one_s, busy, alive, answer, time.monotonic() - t0
            finally:
                await impostor.close()
                await nc.close()

        no_one_s, busy, alive, answer, took = asyncio.run(main())
        assert no_one_s < PROBE_S, no_one_s
        assert busy.choices[0].text == "5"  # a review found a probe nobody answered in time failing the retry
        assert alive == service._service.id
        assert answer.choices[0].text == "5"
        assert SILENCE_S <= took < SILENCE_S + PROBE_S + 1, took  # "ghost" silent, then the queue group
    finally:
        service.stop()
        server.stop()


def test_a_stopping_replica_answers_no_probe_before_it_answers_unavailable(tmp_path):
    """Found by a fault hunt: a replica told to stop (SIGTERM: a rolling restart) still answered $SRV.PING while it
    ended its requests, so a retry after a silence could be sent to it and fail ("the tier is shutting down", or no
    responders once it left). It stops answering discovery first: when it starts answering UNAVAILABLE (its halt),
    its $SRV subscriptions are gone, and a probe after its requests heard so finds no replica."""
    import concurrent.futures

    import nats.errors

    from tierline_shared.transport.messaging import ReplicaSilent, TierError, _alive_replica

    taken = threading.Event()

    def handle(data: bytes, timeout):
        taken.set()
        return concurrent.futures.Future()  # never answered: only the stop answers

    server, opts, service = _unary_tier(tmp_path, handle)
    try:
        discovery_at_halt: list[int] = []
        service._loop.call_soon_threadsafe(lambda: service._halt.add_done_callback(
            lambda _: discovery_at_halt.append(len(service._service._subscriptions))))

        async def main():
            nc = await connect(opts, name="test")
            try:
                assert await _alive_replica(nc, "edge", 10.0) == service._service.id
                asking = asyncio.ensure_future(ask_tier(nc, "edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), TIMEOUT))
                assert await asyncio.to_thread(taken.wait, TIMEOUT)  # in flight on the replica
                stopping = asyncio.ensure_future(asyncio.to_thread(service.stop))
                with pytest.raises(TierError, match="shutting down"):
                    await asking
                try:
                    return await _alive_replica(nc, "edge", 10.0)
                except (nats.errors.NoRespondersError, ReplicaSilent) as exc:
                    return exc
                finally:
                    await stopping
            finally:
                await nc.close()

        probed = asyncio.run(main())
        assert discovery_at_halt == [0], discovery_at_halt  # no $SRV subscription left when it halted
        assert isinstance(probed, Exception), f"the stopping replica answered the probe: {probed}"
    finally:
        service.stop()
        server.stop()


def test_the_askers_own_stall_is_not_taken_for_a_silent_replica(tmp_path):
    """Found by a review: the asker's event loop blocked for over a second (a slow callback, a GC pause) while a
    healthy replica worked on its stream and said so; its heartbeats were still unread in the socket when the
    asker's wait ended, so the stream was taken for silent (the router's client got UNAVAILABLE mid-stream). A wait
    that ends well after it was due is this side's own stall, not the replica's silence."""
    def pausing(data: bytes, is_active):  # a chunk, then 2.5 s of work (heartbeats only), then the last chunk
        yield pb.InferResponse(choices=[pb.Choice(text="x")], tier="edge").SerializeToString()
        time.sleep(2.5)
        yield pb.InferResponse(choices=[pb.Choice(text="y", finish_reason="stop")], tier="edge").SerializeToString()

    server = NatsServer(tmp_path).start()
    opts = NatsOptions(server.url, server.user, server.password)
    service = TierService("edge", opts, handle=None, status_of=lambda exc: (grpc.StatusCode.INTERNAL, str(exc)),
                          stream=pausing)
    service.start()
    try:
        async def main() -> str:
            nc = await connect(opts, name="test")
            try:
                text = ""
                async for chunk in stream_tier(nc, "edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), timeout_s=TIMEOUT):
                    text += chunk.choices[0].text
                    if len(text) == 1:  # blocks this loop while the stream waits for its next chunk
                        asyncio.get_running_loop().call_later(0.3, time.sleep, 1.5)
                return text
            finally:
                await nc.close()

        assert asyncio.run(main()) == "xy"
    finally:
        service.stop()
        server.stop()


def test_a_request_waiting_on_the_link_when_the_process_stops_ends_at_once_offline(tmp_path):
    """Found by a review: a board's front door asks the tiers above through its TierService (`request`, from a
    gRPC thread); a request still waiting when the service stopped waited on a loop that ran no more, for its whole
    time (nats.request_timeout_ms + 1 s), which kept the process alive past its supervisor's kill. It ends at once
    now, as Offline (the cascade moves on: the board answers itself), and later ones are not sent."""
    import concurrent.futures

    from tierline_shared.transport.messaging import Offline

    server, opts, edge = _unary_tier(tmp_path, lambda data, timeout: concurrent.futures.Future())
    service = TierService("device", opts, handle=None, status_of=lambda exc: (grpc.StatusCode.INTERNAL, str(exc)))
    service.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # the edge's own replica takes it and never answers: the request waits
            waiting = pool.submit(service.request, "edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), 20.0)
            time.sleep(0.5)
            assert not waiting.done()
            t0 = time.monotonic()
            service.stop()
            with pytest.raises(Offline):
                waiting.result(timeout=TIMEOUT)
            assert time.monotonic() - t0 < 5, time.monotonic() - t0
        with pytest.raises(Offline):
            service.request("edge", pb.InferRequest(prompt="Q:2+3=?\nA:"), 20.0)
    finally:
        service.stop()
        edge.stop()
        server.stop()
