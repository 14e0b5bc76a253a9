"""The one escalation rule: which tier to ask next, given what the tiers have said so far.

The live router (router/service.py), the device's front door (device_agent/agent.py) and the
offline evaluation (tierline/build/routing.py) all run a request through `Cascade`, so the
evaluation replays exactly what runs. It does no I/O: its driver asks the tier it names
(`next_tier`), reports what happened (`answered`, `failed`, `expired`) and finally takes the
`decision`.

- A request starts on the policy's first tier.
- An answer whose confidence reaches its tier's threshold is kept (the top tier's always is);
  below it, the next tier up is asked.
- An answer not kept is the next tier's draft (`draft_for`, sent as `InferRequest.draft`): a tier
  that can verifies it and writes on from where its own model parts from it, so an escalated
  request costs the tier above fewer steps for the same answer (shared/runtime/runner.py).
- A tier that fails is asked again (another replica answers) when that can help, `retries`
  times at most: a timeout, a full queue, or a replica that says another may serve it (it is
  stopping: UNAVAILABLE with `Tierline-Other-Replica`). No responders, any other error or no
  link (`Offline`) move on to the next tier up at once.
- With no tier above left, the best answer so far is given (the highest confidence; the top
  tier's over any other), marked degraded. With no answer at all, the tiers below the first
  one are asked, nearest first, and the first answer is given, degraded: a lower tier's
  answer is better than none.
- Nothing answered, and a tier had no replica up (its replicas restarting, or reconnecting after
  the NATS node they were on died): the live router waits (`NO_REPLICA_FIRST_S`, doubling up to
  `NO_REPLICA_MAX_S`) and asks those tiers again (`again`), for `router.no_replica_wait_ms` at
  most, within the request's deadline.
- A tier that refuses the request (INVALID_ARGUMENT: tiers differ in context length and
  attention window, so a prompt too long for the device's model may fit the cloud's) moves it
  to the next tier up; below the first tier nothing is asked for it.
- Nothing answered: the refusal of the highest tier that refused, as it is (the request's own
  fault, named by the tier most able to serve it), unless a tier above it failed otherwise;
  else UNAVAILABLE naming what each tier did, or DEADLINE_EXCEEDED when the request's time ran out.

`cost` is the one rule for what an answer cost: every tier that ran a model for it is paid for
its own tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from tierline_api.v1 import inference_pb2 as pb
from tierline_router.policy import Policy
from tierline_shared.transport.messaging import Offline, ReplicaSilent, TierError
from tierline_shared.wire import TIERS, TOP_TIER, tiers_above, tiers_below

CLIENT_ERRORS = {"INVALID_ARGUMENT"}  # a tier refused the request: the next tier up is asked, else the client told
# tier errors worth another replica: its queue was full; and any the replica marks so (TierError.other_replica: it
# is stopping, an upgrade or a scale down). Not UNAVAILABLE as such: most come from what every replica shares (an
# upstream engine that fails or answers without usage), where asking again would pay for the same failure twice
RETRY_STATUSES = {"RESOURCE_EXHAUSTED"}
RAN_A_MODEL = ("answered", "low_confidence")  # the attempts that are paid for
# with an answer in hand, a tier above is given the request's time less this, so that the answer still reaches the
# client before its deadline when that tier does not answer in time (degraded, rather than DEADLINE_EXCEEDED)
ANSWER_MARGIN_S = 0.25
_TIMEOUTS = (NatsTimeout, asyncio.TimeoutError, concurrent.futures.TimeoutError, TimeoutError)
NO_REPLICA_FIRST_S = 0.1  # seconds before a tier that had no replica up is asked again (doubling each round)
NO_REPLICA_MAX_S = 1.0  # seconds between two rounds at most (a replica reconnects within about a second)


def no_replica_wait(rounds: int) -> float:
    """Seconds to wait before asking tiers that had no replica up again, after `rounds` such waits."""
    return min(NO_REPLICA_FIRST_S * 2 ** min(rounds, 16), NO_REPLICA_MAX_S)


@dataclass
class Decision:
    answer: pb.InferResponse
    path: list[pb.Attempt]  # every tier tried, in order, and what it did
    degraded: bool  # a better tier was wanted but could not answer


class Cascade:
    def __init__(self, policy: Policy, first: str, available: tuple[str, ...] = TIERS, retries: int = 0,
                 origin: str = "router", on_escalate: Callable[[str, str, str], None] | None = None,
                 keep_first_answer: bool = False):
        """`keep_first_answer`: a stream's cascade, whose answer is out once it comes (text sent cannot be taken
        back): the first answer is kept whatever its confidence; failures before it move on as for any request."""
        self.policy, self.retries, self.origin = policy, retries, origin
        self._keep_first = keep_first_answer
        self._on_escalate = on_escalate  # (from tier, to tier, why; "fallback" going down): for metrics
        self._first = first
        self._ahead = [first, *tiers_above(first, available)]  # tiers still to ask, the current one first
        self._below = list(tiers_below(first, available))  # asked only when nothing answers
        self.path: list[pb.Attempt] = []
        self._best: pb.InferResponse | None = None
        self._kept: pb.InferResponse | None = None
        self._tries = 0  # of the current tier so far, beyond the first
        self._falling_back = False
        self._expired = False
        self._absent: list[str] = []  # tiers that had no replica up, in the order asked
        self._rounds = 0  # waits for absent replicas so far
        self._refusal: TierError | None = None  # the highest tier's refusal (INVALID_ARGUMENT) so far
        self._refused_by = -1  # that tier's place in TIERS
        self._draft: str | None = None  # the text of the last answer not kept: what the next tier may verify
        # the tier asked now is asked again after a replica of it went silent: the retry goes to a replica that
        # is alive (messaging.ask_tier's after_silence)
        self.after_silence = False

    def next_tier(self) -> str | None:
        """The tier to ask now; None when the decision is made."""
        if self._kept is not None or self._expired:
            return None
        if not self._ahead and self._best is None and self._below and self._refusal is None:
            self._falling_back = True
            self._ahead.append(self._below.pop(0))
        return self._ahead[0] if self._ahead else None

    def answered(self, tier: str, resp: pb.InferResponse) -> None:
        """`tier` answered `resp`: keep it, or go on up."""
        accepted = self._falling_back or self._keep_first or bool(self.policy.accept(tier, resp.confidence))
        spent = pb.Usage() if resp.cached else resp.usage  # a result-cache hit ran no model
        self.path.append(pb.Attempt(
            tier=tier, outcome="answered" if accepted else "low_confidence", confidence=resp.confidence,
            detail="" if accepted else f"confidence {resp.confidence:.3f} < {self.policy.threshold(tier)}",
            usage=pb.Usage(prompt_tokens=spent.prompt_tokens, completion_tokens=spent.completion_tokens)))
        if self._best is None or resp.confidence >= self._best.confidence or tier == TOP_TIER:
            self._best = resp
        if accepted:
            self._kept = resp
            return
        self._draft = resp.choices[0].text if len(resp.choices) == 1 else ""
        self._move_on(tier, "low_confidence")

    @property
    def answer_in_hand(self) -> bool:
        """A tier answered (not kept, as a rule): the decision has an answer to give whatever comes next."""
        return self._best is not None

    def draft_for(self, req: pb.InferRequest, max_chars: int) -> str:
        """The draft to send with `req` to the tier asked now: the last answer not kept, cut to `max_chars` (the
        tiers refuse a longer draft, and a draft is only a hint: cut, it costs nothing but the tokens cut off);
        none for a sampled request (drafts are verified greedily); the request's own until an answer was not
        kept."""
        if self._draft is None:
            return req.draft
        return self._draft[:max_chars] if req.parameters.temperature == 0 else ""

    def failed(self, tier: str, exc: BaseException, detail: str = "") -> None:
        """Asking `tier` raised `exc`: ask it again, or the next tier (a refusal: the next tier up). Raises
        anything it does not know as a failure of a tier (a bug is not a reason to escalate)."""
        if isinstance(exc, TierError) and exc.status in CLIENT_ERRORS:  # its own limits: the next tier's may do
            if TIERS.index(tier) >= self._refused_by:
                self._refusal, self._refused_by = exc, TIERS.index(tier)
            outcome, detail, retry = "refused", exc.message, False
        elif isinstance(exc, TierError):
            outcome, detail = "error", f"{exc.status}: {exc.message}"
            retry = exc.status in RETRY_STATUSES or exc.other_replica
        elif isinstance(exc, NoRespondersError):
            outcome, detail, retry = "no_responders", "no replica is up", False
            if tier not in self._absent:
                self._absent.append(tier)
        elif isinstance(exc, Offline):
            outcome, detail, retry = "offline", str(exc), False
        elif isinstance(exc, ReplicaSilent):  # noticed before the time given ran out: its own words
            outcome, detail, retry = "timeout", str(exc), True
        elif isinstance(exc, _TIMEOUTS):
            outcome, detail, retry = "timeout", detail or "no answer in time", True
        else:
            raise exc
        self.path.append(pb.Attempt(tier=tier, outcome=outcome, detail=detail))
        if retry and self._tries < self.retries:
            self._tries += 1
            # once a replica of this tier went silent, every retry of it avoids the queue group (and that replica)
            self.after_silence = self.after_silence or isinstance(exc, ReplicaSilent)
            return
        self._move_on(tier, outcome)

    def expired(self, tier: str) -> None:
        """The request's deadline passed before `tier` could be asked: decide with what there is."""
        self.path.append(pb.Attempt(tier=tier, outcome="timeout", detail="the request's deadline had passed"))
        self._expired = True

    def again(self) -> float | None:
        """Nothing answered and a tier had no replica up: those tiers are asked again, in the cascade's order
        (the first tier and those above it, then those below as a fallback); returns the seconds to wait first.
        None when an answer was kept or is there to give, the deadline passed, or every tier had a replica
        up (then the decision stands). After a refusal only the absent tiers above the refusing one are asked
        (those below would refuse too). The driver bounds the rounds by the request's time."""
        if self._kept is not None or self._best is not None or self._expired or not self._absent or self._ahead:
            return None
        first = max(TIERS.index(self._first), self._refused_by + 1)
        self._ahead = [t for t in self._absent if TIERS.index(t) >= first]
        self._below = [] if self._refusal is not None else (
            [t for t in self._absent if TIERS.index(t) < first] + self._below)
        if not self._ahead and not self._below:
            return None
        self._absent, self._tries, self._falling_back, self.after_silence = [], 0, False, False
        self._rounds += 1
        return no_replica_wait(self._rounds - 1)

    def _move_on(self, tier: str, why: str) -> None:
        self._ahead.pop(0)
        self._tries, self.after_silence = 0, False
        nxt = self.next_tier()
        if nxt is not None and self._on_escalate is not None:
            self._on_escalate(tier, nxt, "fallback" if TIERS.index(nxt) < TIERS.index(tier) else why)

    def decision(self, out_of_time: bool = False) -> Decision:
        """The answer to give, or TierError: DEADLINE_EXCEEDED when the request's time ran out (`expired`, or
        `out_of_time`: its deadline has passed by now), else UNAVAILABLE."""
        if self._kept is not None:
            return Decision(self._kept, self.path, degraded=self._falling_back)
        if self._best is not None:  # a better tier was wanted but could not answer
            return Decision(self._best, self.path, degraded=True)
        if self._refusal is not None and all(a.outcome == "refused" for a in self.path
                                             if TIERS.index(a.tier) > self._refused_by):
            raise self._refusal  # the request's own fault, as the most able tier that saw it said
        what = "; ".join(f"{a.tier} {a.outcome} {a.detail}".strip() for a in self.path)
        if self._expired or out_of_time:
            raise TierError(self.origin, "DEADLINE_EXCEEDED", f"the deadline passed before a tier answered: {what}")
        raise TierError(self.origin, "UNAVAILABLE", f"no tier could answer: {what}")


def paid_tokens(path: Iterable[pb.Attempt]) -> dict[str, int]:
    """Tier -> the tokens its model spent on a request, from the request's escalation path."""
    out: dict[str, int] = {}
    for a in path:
        if a.outcome in RAN_A_MODEL:
            out[a.tier] = out.get(a.tier, 0) + a.usage.prompt_tokens + a.usage.completion_tokens
    return out


def cost(tokens_by_tier: Mapping[str, Any], costs: Mapping[str, float]):
    """What an answer cost, in the manifest's units (cost_per_1k_tokens): every tier that ran a model for it
    is paid for its own tokens. The values may be numbers or numpy arrays (one answer each)."""
    return sum(costs[t] * n for t, n in tokens_by_tier.items()) / 1000
