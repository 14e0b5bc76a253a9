"""Building the router's learned scorer beside the models it routes between (offline; the router only loads it).

`collect_labels` runs the device and edge models on the benchmark's calib split; `fit_scorer`
fits one logistic regression per lower tier on the prompt features (tierline_router.scorer)
by Newton's method on standardized features with an L2 penalty, keeping a share of the
labels out for accuracy and AUC. `make models` calls `train_scorer` after the tiers are
built; `tierline route train-scorer` re-runs it alone. The scorer lands in
`<models>/router/scorer.json` with a Markdown card, and is listed in the models index
(`<models>/manifest.json`) with its sha256.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from tierline.build.engines import load_engine
from tierline.build.evaluate import evaluate
from tierline_router.scorer import BIAS, LOWER_TIERS, Scorer, prompt_features, sigmoid
from tierline_shared.models.artifacts import INDEX, file_entry, load_index, tier_entry
from tierline_shared.tasks.problems import generate

SCORER_PATH = Path("router") / "scorer.json"
DEFAULT_SCORER_N = 1000  # calibration problems labelled (both lower tiers answer each once)


def train_scorer(models_dir: Path, n: int = DEFAULT_SCORER_N, seed: int = 0, threads: int = 2) -> dict:
    """Label the calib split with the device and edge models, fit, save, list in the models index."""
    models_dir = Path(models_dir)
    prompts, labels = collect_labels(models_dir, n, seed, threads=threads)
    scorer = fit_scorer(prompts, labels, artifacts=artifact_digests(models_dir), seed=seed)
    return save_scorer(models_dir, scorer, prompts, f"{n} calib problems, seed {seed}")


def save_scorer(models_dir: Path, scorer: Scorer, prompts: list[str], trained_on: str) -> dict:
    """The scorer at <models>/router/scorer.json with its card, listed in the models index; returns the card."""
    path = models_dir / SCORER_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    scorer.save(path)
    latency = decision_latency(scorer, prompts[:500])
    card = {"kind": "router scorer (logistic regression per lower tier, prompt features only)",
            "trained_on": trained_on, "heldout": scorer.heldout,
            "artifacts": scorer.artifacts, "decision_latency_ms": latency}
    (path.parent / "card.md").write_text(
        "# Router scorer card\n\n```json\n" + json.dumps(card, indent=2) + "\n```\n")
    index = load_index(models_dir)
    index["artifacts"]["router_scorer"] = file_entry(models_dir, path)
    (models_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return card


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> np.ndarray:
    """Weights of an L2-penalized logistic regression by Newton's method (the last column is the bias).

    The bias carries only a tiny penalty, so a label set of one class still gives finite weights.
    """
    n, d = x.shape
    penalty = np.full(d, l2, dtype=np.float64)
    penalty[-1] = 1e-6
    w = np.zeros(d, dtype=np.float64)
    for _ in range(iters):
        p = sigmoid(x @ w)
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


def fit_scorer(
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
    s = Scorer()
    n = len(prompts)
    n_held = int(round(n * heldout_fraction))
    if n - n_held < 2:
        raise ValueError(f"too few prompts to fit: {n}")
    perm = np.random.default_rng(seed).permutation(n)
    held, train = perm[:n_held], perm[n_held:]
    feats = np.stack([prompt_features(p) for p in prompts]).astype(np.float64)
    s.mean = feats[train].mean(axis=0)
    s.std = feats[train].std(axis=0)
    s.std[s.std < 1e-8] = 1.0  # constant features (and the bias) are left as they are
    s.mean[BIAS], s.std[BIAS] = 0.0, 1.0
    z = (feats - s.mean) / s.std
    s.l2 = float(l2)
    s.weights, s.heldout = {}, {}
    for tier in LOWER_TIERS:
        y = np.asarray(labels_by_tier[tier], dtype=np.float64)
        s.weights[tier] = fit_logistic(z[train], y[train], l2=s.l2)
        if n_held:
            p = sigmoid(z[held] @ s.weights[tier])
            truth = y[held] > 0.5
            area = auc(p, truth)
            s.heldout[tier] = {
                "accuracy": round(float(np.mean((p >= 0.5) == truth)), 4),
                "auc": None if area is None else round(area, 4),
                "base_rate": round(float(truth.mean()), 4),
            }
    s.artifacts = dict(artifacts or {})
    s.n_train, s.n_heldout = int(len(train)), int(n_held)
    return s


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
    """Tier -> sha256 of its weights file, as the models index records it."""
    models_dir = Path(models_dir)
    index = load_index(models_dir)
    return {t: tier_entry(index, t, models_dir)["weights"]["sha256"] for t in tiers}


def collect_labels(
    models_dir: Path, n: int, seed: int, threads: int = 1
) -> tuple[list[str], dict[str, list[bool]]]:
    """Prompts of `generate("calib", n, seed)` and, per lower tier, whether it answered each correctly."""
    problems = generate("calib", n, seed)
    labels: dict[str, list[bool]] = {}
    for tier in LOWER_TIERS:
        engine = load_engine(Path(models_dir), tier, threads=threads)
        labels[tier] = [bool(c) for c in evaluate(engine, problems)["correct"]]
        del engine
    return [p.prompt for p in problems], labels
