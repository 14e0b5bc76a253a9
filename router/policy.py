"""Where a request goes first, and when an answer is good enough.

The first policy is a transparent heuristic on the prompt alone (so deciding costs
no model call): it counts the reasoning steps a prompt asks for (operators,
assignments, list items, story sentences) and maps them to a complexity in
[0, 1]. Issue 5 replaces the scorer with a learned one; the cascade rule (escalate
while the answering tier's confidence is below its threshold) stays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TIER_ORDER = ("device", "edge", "cloud")  # cheapest first
_STEP = re.compile(r"[-+*]|;|,|\. ")  # one reasoning step each, roughly
MAX_STEPS = 12  # prompts with this many steps or more score 1.0


def complexity(prompt: str) -> float:
    """0 (trivial) .. 1 (as hard as the benchmark gets), from the prompt alone."""
    question = prompt.split("\nA:", 1)[0]
    return min(1.0, len(_STEP.findall(question)) / MAX_STEPS)


@dataclass
class Policy:
    device_complexity: float = 0.2  # below: the device may answer
    cloud_complexity: float = 0.8  # at or above: straight to the cloud
    thresholds: dict[str, float] | None = None  # tier -> minimum confidence to keep its answer
    scorer: object | None = None  # a learned router.scorer.Scorer; None = the step-counting heuristic

    def decide(self, prompt: str, available: tuple[str, ...] = TIER_ORDER) -> tuple[str, float]:
        """(first tier, complexity) for a prompt, from the prompt alone."""
        if self.scorer is None:
            score = complexity(prompt)
            return self.first_tier(score, available), score
        p = self.scorer.p_correct(prompt)
        score = 1.0 - p["edge"]  # how likely the edge gets it wrong
        if score >= self.cloud_complexity and "cloud" in available:
            return "cloud", score
        if 1.0 - p["device"] < self.device_complexity and "device" in available:
            return "device", score
        return ("edge" if "edge" in available else available[-1]), score

    def first_tier(self, score: float, available: tuple[str, ...] = TIER_ORDER) -> str:
        if score >= self.cloud_complexity and "cloud" in available:
            return "cloud"
        if score < self.device_complexity and "device" in available:
            return "device"
        return "edge" if "edge" in available else available[-1]

    def accept(self, tier: str, confidence: float) -> bool:
        """Keep this tier's answer? The cloud's is always kept (nothing above it)."""
        if tier == "cloud":
            return True
        return confidence >= (self.thresholds or {}).get(tier, 0.0)

    @staticmethod
    def next_tier(tier: str, available: tuple[str, ...] = TIER_ORDER) -> str | None:
        i = TIER_ORDER.index(tier)
        for t in TIER_ORDER[i + 1:]:
            if t in available:
                return t
        return None
