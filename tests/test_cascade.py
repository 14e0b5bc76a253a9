"""The one escalation rule (router/cascade.py), from protobuf fixtures: no network, no model."""

from __future__ import annotations

import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from tierline_api.v1 import inference_pb2 as pb
from tierline_router.cascade import NO_REPLICA_FIRST_S, NO_REPLICA_MAX_S, Cascade, Offline, cost, paid_tokens
from tierline_router.policy import Policy
from tierline_shared.transport.messaging import TierError

POLICY = Policy(device_complexity=0.3, cloud_complexity=0.7, thresholds={"device": 0.5, "edge": 0.6})


def answer(tier: str, confidence: float, tokens: int = 10, cached: bool = False) -> pb.InferResponse:
    return pb.InferResponse(tier=tier, confidence=confidence, cached=cached,
                            usage=pb.Usage(prompt_tokens=tokens - 1, completion_tokens=1))


def run(first: str, replies: dict, retries: int = 0, out_of_time: bool = False, moves: list | None = None):
    """Drive a cascade: `replies[tier]` is a list of answers or exceptions, taken in order."""
    c = Cascade(POLICY, first, retries=retries, on_escalate=lambda *m: moves.append(m) if moves is not None else None)
    while (tier := c.next_tier()) is not None:
        reply = replies[tier].pop(0)
        if isinstance(reply, BaseException):
            c.failed(tier, reply)
        else:
            c.answered(tier, reply)
    return c.decision(out_of_time)


def outcomes(decision) -> list[tuple[str, str]]:
    return [(a.tier, a.outcome) for a in decision.path]


def test_a_confident_first_answer_is_kept():
    d = run("device", {"device": [answer("device", 0.9)]})
    assert d.answer.tier == "device" and not d.degraded and outcomes(d) == [("device", "answered")]


def test_low_confidence_climbs_and_the_top_tier_is_always_kept():
    d = run("device", {"device": [answer("device", 0.1)], "edge": [answer("edge", 0.2)],
                       "cloud": [answer("cloud", 0.01)]})
    assert d.answer.tier == "cloud" and not d.degraded
    assert outcomes(d) == [("device", "low_confidence"), ("edge", "low_confidence"), ("cloud", "answered")]


def test_a_kept_answer_is_given_even_when_a_lower_tier_was_surer():
    policy = Policy(0.3, 0.7, {"device": 0.5, "edge": 0.1})
    c = Cascade(policy, "device")
    c.answered("device", answer("device", 0.3))
    c.answered("edge", answer("edge", 0.15))
    assert c.next_tier() is None and c.decision().answer.tier == "edge"


def test_a_timeout_is_retried_then_the_next_tier_is_asked():
    moves: list = []
    d = run("edge", {"edge": [NatsTimeout(), NatsTimeout()], "cloud": [answer("cloud", 0.4)]}, retries=1, moves=moves)
    assert outcomes(d) == [("edge", "timeout"), ("edge", "timeout"), ("cloud", "answered")]
    assert moves == [("edge", "cloud", "timeout")]


def test_no_responders_and_errors_are_not_retried():
    d = run("device", {"device": [NoRespondersError()], "edge": [TierError("edge", "INTERNAL", "boom")],
                       "cloud": [answer("cloud", 0.4)]}, retries=3)
    assert outcomes(d) == [("device", "no_responders"), ("edge", "error"), ("cloud", "answered")]


def test_a_full_queue_is_retried_on_another_replica():
    d = run("edge", {"edge": [TierError("edge", "RESOURCE_EXHAUSTED", "queue full"), answer("edge", 0.9)]}, retries=1)
    assert outcomes(d) == [("edge", "error"), ("edge", "answered")] and not d.degraded


def test_a_stopping_replica_is_retried_on_another_and_other_unavailables_move_up():
    """UNAVAILABLE marked by its replica as its own (it is stopping: Tierline-Other-Replica) is asked of another
    replica; any other UNAVAILABLE (an upstream engine every replica shares) moves up at once, not paid twice."""
    stopping = TierError("edge", "UNAVAILABLE", "the tier is shutting down", other_replica=True)
    d = run("edge", {"edge": [stopping, answer("edge", 0.9)]}, retries=1)
    assert outcomes(d) == [("edge", "error"), ("edge", "answered")] and not d.degraded
    d = run("cloud", {"cloud": [TierError("cloud", "UNAVAILABLE", "the upstream sent no usage"), answer("cloud", 0.9)],
                      "edge": [answer("edge", 0.5)]}, retries=1)
    assert outcomes(d)[0] == ("cloud", "error") and ("cloud", "answered") not in outcomes(d)


def test_the_cloud_unreachable_gives_the_best_lower_answer_degraded():
    d = run("device", {"device": [answer("device", 0.3)], "edge": [answer("edge", 0.2)],
                       "cloud": [NoRespondersError()]})
    assert d.degraded and d.answer.tier == "device"  # the surer of the two low-confidence answers


def test_nothing_at_or_above_the_first_tier_falls_back_down():
    moves: list = []
    d = run("cloud", {"cloud": [NoRespondersError()], "edge": [Offline("link down")],
                      "device": [answer("device", 0.01)]}, moves=moves)
    assert d.degraded and d.answer.tier == "device"  # a low confidence is kept: better than no answer
    assert outcomes(d) == [("cloud", "no_responders"), ("edge", "offline"), ("device", "answered")]
    assert moves == [("cloud", "edge", "fallback"), ("edge", "device", "fallback")]


def test_tiers_with_no_replica_up_are_asked_again_in_order_after_a_growing_wait():
    """What the live router does when nothing answered and replicas were missing (`again`): the first tier and those
    above it again, then those below as a fallback; the waits double up to NO_REPLICA_MAX_S."""
    c = Cascade(POLICY, "edge")
    for tier in ("edge", "cloud", "device"):
        assert c.next_tier() == tier
        c.failed(tier, NoRespondersError() if tier != "cloud" else TierError("cloud", "INTERNAL", "boom"))
    assert c.next_tier() is None
    waits = [c.again()]
    assert c.next_tier() == "edge"  # the cloud had a replica (it failed): not asked again
    c.failed("edge", NoRespondersError())
    assert c.next_tier() == "device"  # the fallback below, as in the first round
    c.failed("device", NoRespondersError())
    for _ in range(6):
        waits.append(c.again())
        c.failed(c.next_tier(), NoRespondersError())
        c.failed(c.next_tier(), NoRespondersError())
    assert waits == [min(NO_REPLICA_FIRST_S * 2 ** i, NO_REPLICA_MAX_S) for i in range(7)]
    assert waits[-1] == NO_REPLICA_MAX_S
    waits.append(c.again())
    assert c.next_tier() == "edge"
    c.answered("edge", answer("edge", 0.9))  # back: kept, and not degraded
    d = c.decision()
    assert d.answer.tier == "edge" and not d.degraded and c.again() is None


def test_an_answer_or_replicas_that_all_answered_are_not_asked_again():
    c = Cascade(POLICY, "edge")
    c.answered("edge", answer("edge", 0.1))
    c.failed("cloud", NoRespondersError())
    assert c.next_tier() is None and c.again() is None and c.decision().degraded  # the edge's answer is given
    c = Cascade(POLICY, "cloud")
    c.failed("cloud", NatsTimeout())
    c.failed("edge", TierError("edge", "INTERNAL", "boom"))
    c.failed("device", Offline("link down"))
    assert c.next_tier() is None and c.again() is None


def test_nothing_answered_is_unavailable_or_deadline_exceeded():
    replies = {"edge": [NoRespondersError()], "cloud": [NoRespondersError()], "device": [NoRespondersError()]}
    with pytest.raises(TierError) as err:
        run("edge", {k: list(v) for k, v in replies.items()})
    assert err.value.status == "UNAVAILABLE" and "edge no_responders" in err.value.message
    with pytest.raises(TierError) as err:
        run("edge", {k: list(v) for k, v in replies.items()}, out_of_time=True)
    assert err.value.status == "DEADLINE_EXCEEDED"
    c = Cascade(POLICY, "edge")
    c.expired("edge")
    with pytest.raises(TierError, match="deadline passed") as err:
        c.decision()
    assert err.value.status == "DEADLINE_EXCEEDED"


def test_a_tiers_refusal_goes_up_to_a_tier_whose_limits_may_serve_it_and_a_bug_is_not_a_tier_failure():
    """Tiers differ in context and window: the edge's refusal moves the request up, never down; when every tier
    refuses, the highest one's refusal is the answer (INVALID_ARGUMENT, not UNAVAILABLE)."""
    too_long = TierError("edge", "INVALID_ARGUMENT", "this model's maximum context length is 128 tokens")
    moves = []
    d = run("edge", {"edge": [too_long], "cloud": [answer("cloud", 0.9)]}, moves=moves)
    assert d.answer.tier == "cloud" and not d.degraded and outcomes(d) == [("edge", "refused"), ("cloud", "answered")]
    assert moves == [("edge", "cloud", "refused")]
    with pytest.raises(TierError, match="256 tokens") as err:
        run("device", {"device": [TierError("device", "INVALID_ARGUMENT", "maximum context length is 64 tokens")],
                       "edge": [too_long], "cloud": [TierError("cloud", "INVALID_ARGUMENT", "is 256 tokens")]})
    assert err.value.status == "INVALID_ARGUMENT" and err.value.tier == "cloud"
    with pytest.raises(TierError) as err:  # a tier above the refusal failed otherwise (it may have served it);
        run("edge", {"edge": [too_long], "cloud": [NoRespondersError()], "device": []})  # the device is not asked
    assert err.value.status == "UNAVAILABLE" and "edge refused" in err.value.message
    waits = Cascade(POLICY, "edge")  # the tier above restarting: asked again, as for any request
    waits.failed("edge", too_long)
    waits.failed("cloud", NoRespondersError())
    assert waits.next_tier() is None and waits.again() is not None and waits.next_tier() == "cloud"
    waits.answered("cloud", answer("cloud", 0.9))
    assert waits.decision().answer.tier == "cloud"
    below = Cascade(POLICY, "device")  # a tier below the refusal is never asked again: it would refuse too
    below.failed("device", NoRespondersError())
    below.failed("edge", too_long)
    below.failed("cloud", TierError("cloud", "INVALID_ARGUMENT", "window"))
    assert below.next_tier() is None and below.again() is None
    kept = run("device", {"device": [answer("device", 0.1)], "edge": [too_long],
                          "cloud": [TierError("cloud", "INVALID_ARGUMENT", "window")]})
    assert kept.answer.tier == "device" and kept.degraded  # an answer in hand is given, not a refusal
    with pytest.raises(KeyError):
        Cascade(POLICY, "edge").failed("edge", KeyError("a bug"))


def test_every_tier_that_ran_a_model_pays_for_its_own_tokens_and_a_cache_hit_for_none():
    d = run("device", {"device": [answer("device", 0.1, tokens=20)], "edge": [answer("edge", 0.9, tokens=30)]})
    assert paid_tokens(d.path) == {"device": 20, "edge": 30}
    assert cost(paid_tokens(d.path), {"device": 0.01, "edge": 0.1, "cloud": 1.0}) == pytest.approx(0.0032)
    hit = run("edge", {"edge": [answer("edge", 0.9, tokens=30, cached=True)]})
    assert paid_tokens(hit.path) == {"edge": 0}


def test_an_answer_not_kept_is_the_next_tiers_draft_cut_to_the_prompt_limit_and_greedy_only():
    """The draft sent up is the last answer not kept, cut to the limit the tiers check (a draft is a hint: an
    over-long one must not make the tier above refuse), none for a sampled request, and never a stale one: an
    empty answer not kept sends an empty draft. Until an answer is not kept, the request's own draft goes."""
    greedy = pb.InferRequest(prompt="Q:1+1=?\nA:", draft="client's own")
    sampled = pb.InferRequest(prompt="Q:1+1=?\nA:", parameters=pb.Parameters(temperature=0.7))
    c = Cascade(POLICY, "device")
    assert c.draft_for(greedy, 100) == "client's own"
    low = answer("device", 0.1)
    low.choices.add(text="x" * 150)
    c.answered("device", low)
    assert c.draft_for(greedy, 100) == "x" * 100 and c.draft_for(sampled, 100) == ""
    empty = answer("edge", 0.1)
    empty.choices.add(text="")
    c.answered("edge", empty)
    assert c.draft_for(greedy, 100) == ""


def test_every_retry_of_a_tier_after_one_of_its_replicas_went_silent_avoids_the_queue_group():
    """A retry after a ReplicaSilent goes to a replica that answers $SRV.PING (`after_silence`). Found by a fault
    hunt: with more retries than one, a later retry after another error (a full queue) went back to the queue group,
    which may draw the silent replica again. It stays on for that tier, and is off for the next tier."""
    from tierline_shared.transport.messaging import ReplicaSilent

    c = Cascade(POLICY, "edge", retries=3)
    assert c.after_silence is False
    c.failed("edge", NatsTimeout())
    assert c.next_tier() == "edge" and c.after_silence is False  # a slow tier: the queue group, as before
    c.failed("edge", ReplicaSilent("edge: the replica went silent for 1.0 s"))
    assert c.next_tier() == "edge" and c.after_silence is True
    c.failed("edge", TierError("edge", "RESOURCE_EXHAUSTED", "queue full"))
    assert c.next_tier() == "edge" and c.after_silence is True
    c.failed("edge", TierError("edge", "RESOURCE_EXHAUSTED", "queue full"))  # retries spent: the cloud
    assert c.next_tier() == "cloud" and c.after_silence is False
