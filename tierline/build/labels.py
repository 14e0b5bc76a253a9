"""Routing labels without answers: a lower tier is right when it agrees with the cloud on the same prompt.

A user who imports their own family has prompts, not answers. `tierline route calibrate --prompts FILE.jsonl`
answers each prompt once on every tier (greedy) and labels the device's and the edge's answer by agreement
with the cloud's. Two answers agree when, after the documented normalisation, they are equal:

- without an extractor: each answer stripped, runs of whitespace made one space, case folded;
- with `--extract REGEX`: the regex's first match in each answer (its first group if it has one),
  normalised the same way; an answer where it does not match agrees with nothing (the cloud's included,
  unless neither matches: then the whole answers are compared).

The labels train the router's scorer and set its thresholds, exactly as true answers do for the project's
own family; `compare_label_sources` measures what is lost (docs/ROUTING.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from tierline.build.corpus import jsonl_rows
from tierline.build.evaluate import EVAL_MAX_TOKENS, answer
from tierline.build.routing import CLOUD, Outcomes
from tierline_shared.wire import TIERS

_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Agreement:
    """When two answers say the same thing (the module's documented normalisation, an optional extractor)."""

    extract: str | None = None

    def __post_init__(self):
        if self.extract is not None:
            try:
                re.compile(self.extract)
            except re.error as exc:
                raise ValueError(f"--extract: not a regular expression ({exc})") from None

    @staticmethod
    def normalise(text: str) -> str:
        return _SPACE.sub(" ", text.strip()).casefold()

    def key(self, text: str) -> str | None:
        if self.extract is None:
            return self.normalise(text)
        m = re.search(self.extract, text)
        if m is None:
            return None
        return self.normalise(m.group(1) if m.groups() else m.group(0))

    def same(self, text: str, reference: str) -> bool:
        a, b = self.key(text), self.key(reference)
        if a is None and b is None:  # neither has the answer's form: compare what they say
            return self.normalise(text) == self.normalise(reference)
        return a is not None and a == b


def read_prompts(path: str | Path) -> list[str]:
    """A .jsonl file, one object per line with a string `prompt`; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts: {path}: not found")
    prompts = []
    for n, row in jsonl_rows(path, "--prompts"):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"--prompts: {path}:{n}: needs a non-empty string 'prompt'")
        prompts.append(row["prompt"])
    if len(prompts) < 8:
        raise ValueError(f"--prompts: {path}: {len(prompts)} prompts; calibration needs at least 8")
    return prompts


def answer_on_every_tier(models_dir: str | Path, prompts: list[str], max_tokens: int = EVAL_MAX_TOKENS,
                         threads: int = 2, progress: Callable[[str, int], None] | None = None) -> dict[str, dict]:
    """Tier -> evaluate.answer's result (texts, confidence, tokens per prompt) on every tier."""
    from tierline.build.engines import load_engine

    out = {}
    for tier in TIERS:
        engine = load_engine(Path(models_dir), tier, threads=threads)
        out[tier] = answer(engine, prompts, max_tokens,
                           progress=(lambda k, t=tier: progress(t, k)) if progress else None)
        del engine
    return out


def agreement_outcomes(answers: Mapping[str, Mapping], agreement: Agreement) -> Outcomes:
    """Outcomes whose `correct` is agreement with the cloud's answer (the cloud is right by definition)."""
    n = len(answers["cloud"]["texts"])
    correct = np.zeros((n, len(TIERS)), dtype=bool)
    for col, tier in enumerate(TIERS):
        correct[:, col] = [agreement.same(t, ref) for t, ref in zip(answers[tier]["texts"], answers["cloud"]["texts"])]
    correct[:, CLOUD] = True
    confidence = np.stack([np.asarray(answers[t]["confidence"], dtype=np.float64) for t in TIERS], axis=1)
    tokens = np.stack([np.asarray(answers[t]["tokens"], dtype=np.int64) for t in TIERS], axis=1)
    return Outcomes(correct, confidence, tokens)


def lower_tier_labels(outcomes: Outcomes) -> dict[str, list[bool]]:
    """The scorer's labels: per lower tier, whether its answer counts as right."""
    return {t: [bool(c) for c in outcomes.correct[:, TIERS.index(t)]] for t in ("device", "edge")}


ANSWER_REGEX = r"####\s*(\S+)"  # the project's benchmark: the final answer after its marker


def compare_label_sources(models_dir: str | Path, n: int, target_edge_share: float, costs: Mapping[str, float],
                          seed: int = 0, threads: int = 2) -> dict:
    """On the project's family: the router calibrated from true answers, and from agreement labels (plain
    normalised text, and the benchmark's answer extractor), each measured on the test split's true answers
    at the same target share below the cloud."""
    from tierline.build.routing import calibrate_policy, run_tiers, summarize
    from tierline.build.scorer import artifact_digests, fit_scorer
    from tierline_shared.tasks.problems import generate, is_correct

    calib, test = generate("calib", n, seed=seed), generate("test", n, seed=seed)
    answers = answer_on_every_tier(models_dir, [p.prompt for p in calib], threads=threads)
    true_correct = np.stack([[is_correct(p, t) for p, t in zip(calib, answers[tier]["texts"])] for tier in TIERS],
                            axis=1)
    plain = agreement_outcomes(answers, Agreement())
    sources = {"true answers": Outcomes(true_correct, plain.confidence, plain.tokens),
               "agreement, normalised text": plain,
               f"agreement, --extract '{ANSWER_REGEX}'": agreement_outcomes(answers, Agreement(ANSWER_REGEX))}
    test_outcomes = run_tiers(models_dir, test, threads=threads)
    digests = artifact_digests(models_dir)
    out = {"n_calib": n, "n_test": n, "target_edge_share": target_edge_share,
           "cloud_only_test_accuracy": round(test_outcomes.accuracy("cloud"), 4), "sources": {}}
    for name, outcomes in sources.items():
        prompts = [p.prompt for p in calib]
        scorer = fit_scorer(prompts, lower_tier_labels(outcomes), artifacts=digests, seed=seed)

        def scores(problems):
            p = [scorer.p_correct(pr.prompt) for pr in problems]
            return np.asarray([1 - d["edge"] for d in p]), np.asarray([1 - d["device"] for d in p])

        point = calibrate_policy(outcomes, *scores(calib), target_edge_share, costs)
        result = summarize(test_outcomes, point.routing(test_outcomes, *scores(test)), costs)
        labels = lower_tier_labels(outcomes)
        out["sources"][name] = {
            "label_rate": {t: round(float(np.mean(v)), 4) for t, v in labels.items()},
            "label_agreement_with_truth": {t: round(float(np.mean(np.asarray(v) == true_correct[:, TIERS.index(t)])),
                                                    4) for t, v in labels.items()},
            "policy": point.manifest_fields(),
            "test_accuracy": round(result["accuracy"], 4),
            "test_share_below_cloud": round(1 - result["share"]["cloud"], 4),
            "test_cost_vs_cloud": round(result["cost_vs_cloud"], 4),
        }
    return out
