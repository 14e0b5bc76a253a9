"""A learned complexity scorer: how likely a lower tier answers a prompt correctly.

The heuristic in `router.policy.complexity` counts reasoning steps. This scorer
learns instead, from the prompt text alone (deciding still costs no model call):
a small fixed feature vector (operator and separator counts, the reasoning steps
the question needs, distractors, number sizes, the family read off the prompt's
shape) feeds one logistic regression per lower tier ("device", "edge"), each
fitted in numpy by Newton's method on standardized features with an L2 penalty.

This module is what the router runs: the features, the fitted weights, loading.
Fitting them is offline work (tierline/build/scorer.py: labels from running the
tiers on the benchmark's calib split, a held-out share for accuracy and AUC). The
scorer is only valid for the model artifacts it was trained against, so it records
their sha256 digests and `Scorer.load` (and `load_scorer`, for a manifest) refuses a
file whose digests differ from the ones the caller expects.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from tierline_shared.wire import TIERS

LOWER_TIERS = TIERS[:-1]  # the tiers whose success is predicted (device, edge); the top one is the fallback
FORMAT = "tierline-scorer"
VERSION = 1
FAMILIES = ("arith", "vars", "compare", "word")
FEATURE_NAMES = (
    "n_plus", "n_minus", "n_star", "n_semicolon", "n_comma", "n_sentences", "n_digits", "n_numbers",
    "n_vars", "max_number", "length", "steps", "distractors", "steps_sq",
    "fam_arith", "fam_vars", "fam_compare", "fam_word", "bias",
)
N_FEATURES = len(FEATURE_NAMES)
BIAS = N_FEATURES - 1  # the last feature is the constant 1 (never standardized)

_NUMBER = re.compile(r"\d+")
NUMBER_DIGITS = 9  # longer numbers count as 10**9
_ASSIGN = re.compile(r"([a-z])=([a-z])?")
_COMPARE = re.compile(r"(max|min)\(")
_SENTENCE = re.compile(r"[^.?]+[.?]")
_ASKED = re.compile(r"How many (\w+) has (\w+)\?")


def _question(prompt: str) -> str:
    q = prompt.split("\nA:", 1)[0]
    return q[2:] if q.startswith("Q:") else q


def detect_family(prompt: str) -> str:
    """The benchmark family a prompt's shape matches (arith when nothing else does)."""
    q = _question(prompt)
    if _COMPARE.match(q):
        return "compare"
    if " " in q.strip():
        return "word"
    if ";" in q and _ASSIGN.search(q):
        return "vars"
    return "arith"


def _vars_steps(q: str) -> tuple[int, int, int]:
    """(assignments the asked variable depends on, assignments it does not, distinct names)."""
    decls = [d for d in q.split(";") if "=" in d and not d.endswith("=?")]
    deps: dict[str, str | None] = {}
    for d in decls:
        m = _ASSIGN.match(d)
        if m:
            deps[m.group(1)] = m.group(2)
    asked = q.rsplit(";", 1)[-1].split("=", 1)[0]
    depth, seen, cur = 0, set(), asked
    while cur in deps and cur not in seen:
        seen.add(cur)
        if deps[cur] is None:  # a literal: the chain ends here
            break
        depth += 1
        cur = deps[cur]
    return depth, max(0, len(decls) - len(seen)), len(deps)


def _word_steps(q: str) -> tuple[int, int]:
    """(events that change the asked count, distractor sentences)."""
    m = _ASKED.search(q)
    sentences = [s.strip() for s in _SENTENCE.findall(q)]
    story = [s for s in sentences if not s.startswith("How many")]
    if not m:
        return 0, max(0, len(story) - 1)
    item, who = m.group(1), m.group(2)
    events = sum(1 for s in story[1:] if s.startswith(who + " ") and s.endswith(f" {item}.")
                 and (" gets " in s or " gives " in s))
    return events, max(0, len(story) - 1 - events)


def prompt_features(prompt: str) -> np.ndarray:
    """A fixed float32 vector (see FEATURE_NAMES) computed from the prompt text only."""
    q = _question(prompt)
    family = detect_family(prompt)
    # a number's size matters up to the benchmark's (two digits): a hostile 400-digit one must not overflow a float
    numbers = [int(x) if len(x) <= NUMBER_DIGITS else 10 ** NUMBER_DIGITS for x in _NUMBER.findall(q)]
    n_plus, n_minus, n_star = q.count("+"), q.count("-"), q.count("*")
    n_vars, distractors = 0, 0
    if family == "arith":
        steps = n_plus + n_minus + n_star
    elif family == "vars":
        steps, distractors, n_vars = _vars_steps(q)
    elif family == "compare":
        steps = q.count(",")
    else:
        steps, distractors = _word_steps(q)
    x = np.zeros(N_FEATURES, dtype=np.float32)
    x[:14] = (
        n_plus, n_minus, n_star, q.count(";"), q.count(","), len(_SENTENCE.findall(q)) if family == "word" else 0,
        sum(c.isdigit() for c in q), len(numbers), n_vars, max(numbers, default=0) / 99.0, len(q) / 100.0,
        steps, distractors, steps * steps,
    )
    x[14 + FAMILIES.index(family)] = 1.0
    x[BIAS] = 1.0
    return x


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


class Scorer:
    """Per-tier probability that the tier answers a prompt correctly, from the prompt alone."""

    def __init__(self) -> None:
        self.mean = np.zeros(N_FEATURES, dtype=np.float64)
        self.std = np.ones(N_FEATURES, dtype=np.float64)
        self.weights: dict[str, np.ndarray] = {}
        self.artifacts: dict[str, str] = {}
        self.n_train = 0
        self.n_heldout = 0
        self.heldout: dict[str, dict[str, Any]] = {}
        self.l2 = 1.0

    # ------------------------------------------------------------ scoring
    def _z(self, prompt: str) -> np.ndarray:
        if not self.weights:
            raise ValueError("scorer is not fitted (call fit or load)")
        return (prompt_features(prompt) - self.mean) / self.std

    def p_correct(self, prompt: str) -> dict[str, float]:
        """Tier -> probability that the tier answers this prompt correctly."""
        z = self._z(prompt)
        return {tier: float(sigmoid(z @ w)) for tier, w in self.weights.items()}

    def complexity(self, prompt: str) -> float:
        """0 (edge surely right) .. 1 (edge surely wrong): 1 - p_correct['edge']."""
        return 1.0 - float(sigmoid(self._z(prompt) @ self.weights["edge"]))

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "features": list(FEATURE_NAMES),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "weights": {t: [float(v) for v in w] for t, w in self.weights.items()},
            "l2": self.l2,
            "artifacts": dict(self.artifacts),
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
            "heldout": self.heldout,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, expected_artifacts: dict[str, str] | None = None) -> Scorer:
        """A saved scorer; ValueError naming the file if it is malformed or was trained for other artifacts."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot read scorer ({exc})") from None
        s = cls()
        try:
            s._from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed scorer ({exc})") from None
        if expected_artifacts is not None:
            for tier in sorted(set(expected_artifacts) | set(s.artifacts)):
                want, have = expected_artifacts.get(tier), s.artifacts.get(tier)
                if want != have:
                    raise ValueError(
                        f"{path}: trained for tier {tier!r} artifact sha256 {have or '<none>'}, "
                        f"but the expected artifact is {want or '<none>'}"
                    )
        return s

    def _from_dict(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"format/version {data.get('format')!r}/{data.get('version')!r}, "
                             f"expected {FORMAT!r}/{VERSION}")
        if data.get("features") != list(FEATURE_NAMES):
            raise ValueError("feature list differs from this code's FEATURE_NAMES")

        def vector(value: Any, what: str) -> np.ndarray:
            if not isinstance(value, list) or len(value) != N_FEATURES:
                raise ValueError(f"{what} must be a list of {N_FEATURES} numbers")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise ValueError(f"{what} holds a non-finite or non-numeric value")
            return np.asarray(value, dtype=np.float64)

        mean, std = vector(data["mean"], "mean"), vector(data["std"], "std")
        if np.any(std <= 0):
            raise ValueError("std must be positive")
        weights = data["weights"]
        if not isinstance(weights, dict) or set(weights) != set(LOWER_TIERS):
            raise ValueError(f"weights must be an object with tiers {', '.join(LOWER_TIERS)}")
        artifacts = data.get("artifacts", {})
        if not isinstance(artifacts, dict) or not all(isinstance(v, str) for v in artifacts.values()):
            raise ValueError("artifacts must map tier to sha256 string")
        self.mean, self.std = mean, std
        self.weights = {t: vector(weights[t], f"weights[{t!r}]") for t in LOWER_TIERS}
        self.artifacts = dict(artifacts)
        self.n_train, self.n_heldout = int(data["n_train"]), int(data.get("n_heldout", 0))
        self.heldout = dict(data.get("heldout") or {})
        self.l2 = float(data.get("l2", 1.0))


def load_scorer(manifest) -> Scorer | None:
    """The manifest's learned scorer (router.scorer), refused unless it was trained for these tiers' artifacts;
    None when the manifest names none (the step-counting heuristic decides)."""
    if not manifest.router.scorer:
        return None
    path = manifest.models_path / manifest.router.scorer
    if not path.is_file():
        raise ValueError(f"{manifest.path}: router.scorer: file not found: {path}")
    scorer = Scorer.load(path)
    for tier in LOWER_TIERS:  # only the tiers this platform serves matter
        if tier in manifest.tiers and scorer.artifacts.get(tier) != manifest.tiers[tier].sha256:
            raise ValueError(f"{path}: trained for the {tier} artifact with sha256 {scorer.artifacts.get(tier)}, "
                             f"but the manifest's {tier} is {manifest.tiers[tier].sha256}")
    return scorer
