"""Where a request starts, and when an answer is good enough: the manifest's `router:` section as rules.

A prompt gets two scores from the prompt alone (deciding costs no model call): how likely the
edge gets it wrong (the cloud score) and how likely the device does (the device score). With a
learned scorer (router/scorer.py) they are 1 - its predicted probabilities; without one, both are
the step-counting heuristic `complexity`. A prompt whose cloud score reaches `cloud_complexity`
starts on the cloud, one whose device score is below `device_complexity` on the device, any
other on the edge. An answer is kept when its confidence reaches its tier's threshold; the top
tier's always is (nothing is above it). What happens between tiers is router/cascade.py.

The rules take numbers or numpy arrays alike, so the offline evaluation replays them over
thousands of problems at once (tierline/build/routing.py) with the very code the router runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from tierline_shared.config.manifest import RouterConfig
from tierline_shared.wire import TIERS, TOP_TIER

_STEP = re.compile(r"[-+*]|;|,|\. ")  # one reasoning step each, roughly
MAX_STEPS = 12  # prompts with this many steps or more score 1.0


def complexity(prompt: str) -> float:
    """0 (trivial) .. 1 (as hard as the benchmark gets), from the prompt alone: the heuristic score."""
    question = prompt.split("\nA:", 1)[0]
    return min(1.0, len(_STEP.findall(question)) / MAX_STEPS)


@dataclass
class Policy:
    device_complexity: float  # device score below this: start on the device
    cloud_complexity: float  # cloud score at or above this: start on the cloud
    thresholds: dict[str, float] = field(default_factory=dict)  # tier -> minimum confidence to keep its answer
    scorer: object | None = None  # a learned tierline_router.scorer.Scorer; None = the step-counting heuristic

    @classmethod
    def from_config(cls, rc: RouterConfig, scorer: object | None = None) -> "Policy":
        return cls(rc.device_complexity, rc.cloud_complexity, dict(rc.confidence_threshold), scorer)

    @classmethod
    def of_manifest(cls, manifest) -> "Policy":
        """The policy a manifest describes, its learned scorer (router.scorer) included: the router's and a board's
        front door's, which decide alike. ValueError when the scorer cannot be used (tierline_router.scorer)."""
        from tierline_router.scorer import load_scorer

        return cls.from_config(manifest.router, load_scorer(manifest))

    def scores(self, prompt: str) -> tuple[float, float]:
        """(cloud score, device score): how likely the edge, and the device, answer this prompt wrongly."""
        if self.scorer is None:
            c = complexity(prompt)
            return c, c
        p = self.scorer.p_correct(prompt)
        return 1.0 - p["edge"], 1.0 - p["device"]

    def start(self, cloud_score, device_score, available: tuple[str, ...] = TIERS):
        """The first tier's index in TIERS for these scores (an array of them for arrays of scores)."""
        middle = TIERS.index("edge") if "edge" in available else TIERS.index(available[-1])
        to_cloud = (np.asarray(cloud_score) >= self.cloud_complexity) & ("cloud" in available)
        to_device = (np.asarray(device_score) < self.device_complexity) & ("device" in available)
        return np.where(to_cloud, TIERS.index("cloud"), np.where(to_device, TIERS.index("device"), middle))

    def decide(self, prompt: str, available: tuple[str, ...] = TIERS) -> tuple[str, float]:
        """(first tier, the prompt's cloud score), from the prompt alone."""
        cloud, device = self.scores(prompt)
        return TIERS[int(self.start(cloud, device, available))], cloud

    def threshold(self, tier: str) -> float:
        return self.thresholds.get(tier, 0.0)

    def accept(self, tier: str, confidence):
        """Keep this tier's answer (a bool, or a bool array for an array of confidences)?"""
        if tier == TOP_TIER:
            return np.ones_like(confidence, dtype=bool) if isinstance(confidence, np.ndarray) else True
        return confidence >= self.threshold(tier)
