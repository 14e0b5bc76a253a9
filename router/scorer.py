"""A learned complexity scorer: how likely a lower tier answers a prompt correctly.

The heuristic in `router.policy.complexity` counts reasoning steps. This scorer
learns instead, from the prompt text alone (deciding still costs no model call):
a small fixed feature vector (operator and separator counts, the reasoning steps
the question needs, distractors, number sizes, the family read off the prompt's
shape) feeds one logistic regression per lower tier ("device", "edge"), each
fitted in numpy by Newton's method on standardized features with an L2 penalty.

Labels come from running the tiers on the benchmark's calib split
(`collect_labels`); a share of them is held out and the saved scorer records its
accuracy and AUC there. The scorer is only valid for the model artifacts it was
trained against, so it records their sha256 digests and `Scorer.load` refuses a
file whose digests differ from the ones the caller expects.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

LOWER_TIERS = ("device", "edge")  # the tiers whose success is predicted; the cloud is the fallback
FORMAT = "tierline-scorer"
VERSION = 1
FAMILIES = ("arith", "vars", "compare", "word")
FEATURE_NAMES = (
    "n_plus", "n_minus", "n_star", "n_semicolon", "n_comma", "n_sentences", "n_digits", "n_numbers",
    "n_vars", "max_number", "length", "steps", "distractors", "steps_sq",
    "fam_arith", "fam_vars", "fam_compare", "fam_word", "bias",
)
N_FEATURES = len(FEATURE_NAMES)
_BIAS = N_FEATURES - 1  # the last feature is the constant 1 (never standardized)

_NUMBER = re.compile(r"\d+")
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
    numbers = [int(x) for x in _NUMBER.findall(q)]
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
    x[_BIAS] = 1.0
    return x


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> np.ndarray:
    """Weights of an L2-penalized logistic regression by Newton's method (the last column is the bias).

    The bias carries only a tiny penalty, so a label set of one class still gives finite weights.
    """
    n, d = x.shape
    penalty = np.full(d, l2, dtype=np.float64)
    penalty[-1] = 1e-6
    w = np.zeros(d, dtype=np.float64)
    for _ in range(iters):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + penalty * w
        hess = (x * (p * (1.0 - p))[:, None]).T @ x + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.max(np.abs(step))) < 1e-9:
            break
    return w


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None when one class is missing."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


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

    # ------------------------------------------------------------ training
    def fit(
        self,
        prompts: list[str],
        labels_by_tier: dict[str, list[bool]],
        artifacts: dict[str, str] | None = None,
        heldout_fraction: float = 0.25,
        seed: int = 0,
        l2: float = 1.0,
    ) -> Scorer:
        """Fit one logistic regression per lower tier; a random `heldout_fraction` is kept for metrics.

        `artifacts` maps a tier to the sha256 of the model artifact the labels came from.
        """
        missing = [t for t in LOWER_TIERS if t not in labels_by_tier]
        if missing:
            raise ValueError(f"labels missing for tier(s) {', '.join(missing)}")
        for tier in LOWER_TIERS:
            if len(labels_by_tier[tier]) != len(prompts):
                raise ValueError(f"{len(labels_by_tier[tier])} labels for tier {tier!r} but {len(prompts)} prompts")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        n = len(prompts)
        n_held = int(round(n * heldout_fraction))
        if n - n_held < 2:
            raise ValueError(f"too few prompts to fit: {n}")
        perm = np.random.default_rng(seed).permutation(n)
        held, train = perm[:n_held], perm[n_held:]
        feats = np.stack([prompt_features(p) for p in prompts]).astype(np.float64)
        self.mean = feats[train].mean(axis=0)
        self.std = feats[train].std(axis=0)
        self.std[self.std < 1e-8] = 1.0  # constant features (and the bias) are left as they are
        self.mean[_BIAS], self.std[_BIAS] = 0.0, 1.0
        z = (feats - self.mean) / self.std
        self.l2 = float(l2)
        self.weights, self.heldout = {}, {}
        for tier in LOWER_TIERS:
            y = np.asarray(labels_by_tier[tier], dtype=np.float64)
            self.weights[tier] = fit_logistic(z[train], y[train], l2=self.l2)
            if n_held:
                p = _sigmoid(z[held] @ self.weights[tier])
                truth = y[held] > 0.5
                area = auc(p, truth)
                self.heldout[tier] = {
                    "accuracy": round(float(np.mean((p >= 0.5) == truth)), 4),
                    "auc": None if area is None else round(area, 4),
                    "base_rate": round(float(truth.mean()), 4),
                }
        self.artifacts = dict(artifacts or {})
        self.n_train, self.n_heldout = int(len(train)), int(n_held)
        return self

    # ------------------------------------------------------------ scoring
    def _z(self, prompt: str) -> np.ndarray:
        if not self.weights:
            raise ValueError("scorer is not fitted (call fit or load)")
        return (prompt_features(prompt) - self.mean) / self.std

    def p_correct(self, prompt: str) -> dict[str, float]:
        """Tier -> probability that the tier answers this prompt correctly."""
        z = self._z(prompt)
        return {tier: float(_sigmoid(z @ w)) for tier, w in self.weights.items()}

    def complexity(self, prompt: str) -> float:
        """0 (edge surely right) .. 1 (edge surely wrong): 1 - p_correct['edge']."""
        return 1.0 - float(_sigmoid(self._z(prompt) @ self.weights["edge"]))

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


# ------------------------------------------------------------------ helpers
def decision_latency(scorer: Scorer, prompts: list[str], warmup: int = 10) -> dict[str, float]:
    """Per-decision time (one `scorer.complexity` call: features + model) in milliseconds."""
    if not prompts:
        raise ValueError("no prompts to time")
    for p in prompts[:warmup]:
        scorer.complexity(p)
    ns = np.empty(len(prompts), dtype=np.int64)
    for i, p in enumerate(prompts):
        t0 = time.perf_counter_ns()
        scorer.complexity(p)
        ns[i] = time.perf_counter_ns() - t0
    ms = ns / 1e6
    return {
        "n": len(prompts),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
    }


def artifact_digests(models_dir: str | Path, tiers: tuple[str, ...] = LOWER_TIERS) -> dict[str, str]:
    """Tier -> sha256 of its weights file, as the models directory's manifest records it."""
    from tierline_shared.models.artifacts import load_manifest, tier_entry

    models_dir = Path(models_dir)
    manifest = load_manifest(models_dir)
    return {t: tier_entry(manifest, t, models_dir)["weights"]["sha256"] for t in tiers}


def collect_labels(
    models_dir: Path, n: int, seed: int, threads: int = 1
) -> tuple[list[str], dict[str, list[bool]]]:
    """Prompts of `generate("calib", n, seed)` and, per lower tier, whether it answered each correctly."""
    from tierline.build.evaluate import evaluate
    from tierline_shared.models.artifacts import load_engine
    from tierline_shared.tasks.problems import generate

    problems = generate("calib", n, seed)
    labels: dict[str, list[bool]] = {}
    for tier in LOWER_TIERS:
        engine = load_engine(Path(models_dir), tier, threads=threads)
        labels[tier] = [bool(c) for c in evaluate(engine, problems)["correct"]]
        del engine
    return [p.prompt for p in problems], labels
