"""Offline evaluation of routers: run every tier once, then replay routing policies over the outcomes.

`run_tiers` is the only step that calls models: it answers every problem on every tier (with the one
evaluation loop, tierline/build/evaluate.py) and keeps, per (problem, tier), whether the answer was
correct, the engine's confidence and the tokens it cost (prompt + completion). Everything else replays
those outcomes without a model call:

* a router maps each problem to a tier path (the tiers it tried, cheapest first); the last tier answers;
* tierline's router is the live one: its first tier is `Policy.start` and its escalations are the
  router's own `Cascade` (tierline_router.cascade), replayed with each tier's recorded confidence,
  so the evaluation cannot drift from what runs (`cascade_routing`);
* every tier tried is paid for its own tokens (tierline_router.cascade.cost, the rule the demo and
  the bench charge with);
* score-based routers (random, length, tierline) are swept over their threshold, giving a curve of
  accuracy against the share of requests the cloud answers, summarised as RouteLLM does (APGR, CPT(50%),
  CPT(80%)) with weak = edge_only and strong = cloud_only.

Curve conventions (see `curve_metrics`): points are sorted by cloud share, the anchors (0, weak accuracy)
and (1, strong accuracy) are added where the sweep does not reach those shares, the accuracy is made
monotone by a running maximum (with a budget of at most c cloud calls one may run any operating point that
uses fewer) and linearly interpolated between points (mixing two operating points at random does exactly
that). APGR is the trapezoid integral of PGR = (acc - weak) / (strong - weak) over cloud share in [0, 1].
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tierline.build.evaluate import evaluate
from tierline_api.v1 import inference_pb2 as pb
from tierline_router.cascade import RAN_A_MODEL, Cascade, cost
from tierline_router.policy import Policy
from tierline_shared.config.manifest import RouterConfig
from tierline_shared.wire import TIERS

DEVICE, EDGE, CLOUD = (TIERS.index(t) for t in ("device", "edge", "cloud"))  # the columns of every Outcomes array
ROUTERS = ("tierline", "device_only", "edge_only", "cloud_only", "random", "length", "oracle")
SCORE_ROUTERS = ("random", "length", "tierline")
DEFAULTS = RouterConfig()  # the manifest schema's defaults, for a policy given in part


# ------------------------------------------------------------------ outcomes
@dataclass(frozen=True)
class Outcomes:
    """Per problem (rows) and tier (columns, in TIERS order): correct, confidence, tokens."""

    correct: np.ndarray  # (n, 3) bool
    confidence: np.ndarray  # (n, 3) float64 in [0, 1]
    tokens: np.ndarray  # (n, 3) int64, prompt + completion tokens

    def __post_init__(self) -> None:
        shapes = {self.correct.shape, self.confidence.shape, self.tokens.shape}
        if len(shapes) != 1 or self.correct.ndim != 2 or self.correct.shape[1] != len(TIERS):
            raise ValueError(f"Outcomes arrays must share the shape (n, {len(TIERS)}), got {sorted(shapes)}")

    @property
    def n(self) -> int:
        return int(self.correct.shape[0])

    def accuracy(self, tier: str) -> float:
        return float(self.correct[:, TIERS.index(tier)].mean())

    def subset(self, idx: Sequence[int] | np.ndarray) -> Outcomes:
        idx = np.asarray(idx)
        return Outcomes(self.correct[idx], self.confidence[idx], self.tokens[idx])

    def save(self, path: str | Path) -> None:
        """An .npz file (numpy adds the suffix if it is missing)."""
        np.savez(Path(path), correct=self.correct, confidence=self.confidence, tokens=self.tokens,
                 tiers=np.asarray(TIERS))

    @classmethod
    def load(cls, path: str | Path) -> Outcomes:
        with np.load(Path(path)) as data:
            if tuple(str(t) for t in data["tiers"]) != TIERS:
                raise ValueError(f"{path}: tiers {list(data['tiers'])} differ from {list(TIERS)}")
            return cls(data["correct"].astype(bool), data["confidence"].astype(np.float64),
                       data["tokens"].astype(np.int64))


def run_tiers(models_dir: str | Path, problems: list, threads: int = 1) -> Outcomes:
    """Answer every problem once on every tier (`evaluate`: greedy, the evaluation's token budget)."""
    from tierline.build.engines import load_engine

    n = len(problems)
    correct = np.zeros((n, len(TIERS)), dtype=bool)
    confidence = np.zeros((n, len(TIERS)), dtype=np.float64)
    tokens = np.zeros((n, len(TIERS)), dtype=np.int64)
    for col, tier in enumerate(TIERS):
        r = evaluate(load_engine(Path(models_dir), tier, threads=threads), problems)
        correct[:, col], confidence[:, col], tokens[:, col] = r["correct"], r["confidence"], r["tokens"]
    return Outcomes(correct, confidence, tokens)


# ------------------------------------------------------------------ simulation
@dataclass(frozen=True)
class Routing:
    """Which tiers each problem tried (bool (n, 3)) and which one answered (int (n,))."""

    attempted: np.ndarray
    final: np.ndarray


def fixed_routing(n: int, tier: str | int) -> Routing:
    col = TIERS.index(tier) if isinstance(tier, str) else int(tier)
    attempted = np.zeros((n, len(TIERS)), dtype=bool)
    attempted[:, col] = True
    return Routing(attempted, np.full(n, col, dtype=np.int64))


def two_way_routing(scores: np.ndarray, threshold: float) -> Routing:
    """Cloud when score >= threshold, else edge (RouteLLM's strong/weak rule)."""
    to_cloud = np.asarray(scores, dtype=np.float64) >= threshold
    final = np.where(to_cloud, CLOUD, EDGE).astype(np.int64)
    attempted = np.zeros((len(final), len(TIERS)), dtype=bool)
    attempted[np.arange(len(final)), final] = True
    return Routing(attempted, final)


def _replayed(start: int, kept: tuple[bool, ...]) -> tuple[tuple[bool, ...], int]:
    """(tiers that ran a model, final tier) of the live Cascade starting at TIERS[start] when tier i's answer is
    kept exactly when kept[i]: confidence 1.0 is kept by every tier, -1.0 by none but the top one."""
    cascade = Cascade(Policy(0.0, 1.0, {t: 0.5 for t in TIERS}), TIERS[start])
    while (tier := cascade.next_tier()) is not None:
        ok = kept[TIERS.index(tier)]
        cascade.answered(tier, pb.InferResponse(tier=tier, confidence=1.0 if ok else -1.0))
    decision = cascade.decision()
    ran = {a.tier for a in decision.path if a.outcome in RAN_A_MODEL}
    return tuple(t in ran for t in TIERS), TIERS.index(decision.answer.tier)


@functools.cache
def _cascade_table() -> tuple[np.ndarray, np.ndarray]:
    """The live Cascade's path for every (start, kept answers), indexed by `_key`: (attempted (K, 3), final (K,)).
    The path depends on the policy only through which answers it keeps, so one table serves every threshold."""
    k = len(TIERS)
    attempted = np.zeros((k << k, k), dtype=bool)
    final = np.zeros(k << k, dtype=np.int64)
    for start in range(k):
        for bits in range(1 << k):
            kept = tuple(bool(bits >> i & 1) for i in range(k))
            attempted[start << k | bits], final[start << k | bits] = _replayed(start, kept)
    return attempted, final


def cascade_routing(outcomes: Outcomes, start: np.ndarray, policy: Policy) -> Routing:
    """Start at `start` (tier index per problem) and escalate as the router does: whether each tier's answer is
    kept is `policy.accept` of its recorded confidence, and the path that follows is the live Cascade's
    (`_cascade_table`, the Cascade replayed once for every start and set of kept answers)."""
    n, k = outcomes.n, len(TIERS)
    key = np.broadcast_to(np.asarray(start, dtype=np.int64), (n,)) << k
    for i, t in enumerate(TIERS):
        key = key | (np.asarray(policy.accept(t, outcomes.confidence[:, i]), dtype=np.int64) << i)
    attempted, final = _cascade_table()
    return Routing(attempted[key], final[key])


def oracle_routing(outcomes: Outcomes) -> Routing:
    """The cheapest tier that answers correctly, else the cloud; pays only for that tier."""
    any_right = outcomes.correct.any(axis=1)
    final = np.where(any_right, np.argmax(outcomes.correct, axis=1), CLOUD).astype(np.int64)
    attempted = np.zeros((outcomes.n, len(TIERS)), dtype=bool)
    attempted[np.arange(outcomes.n), final] = True
    return Routing(attempted, final)


def tierline_routing(
    outcomes: Outcomes,
    cloud_scores: np.ndarray,
    device_scores: np.ndarray,
    t_cloud: float,
    t_device: float = DEFAULTS.device_complexity,
    thresholds: Mapping[str, float] | None = None,
) -> Routing:
    """The router's policy with these thresholds over precomputed scores: its first tier (`Policy.start`:
    cloud_score = 1 - p_edge, device_score = 1 - p_device), then its cascade."""
    policy = Policy(t_device, t_cloud, dict(DEFAULTS.confidence_threshold if thresholds is None else thresholds))
    return cascade_routing(outcomes, policy.start(cloud_scores, device_scores), policy)


def summarize(outcomes: Outcomes, routing: Routing, costs: Mapping[str, float]) -> dict[str, Any]:
    """accuracy, share of answers per tier, cost relative to sending everything to the cloud."""
    missing = [t for t in TIERS if t not in costs]
    if missing:
        raise ValueError(f"costs missing for tier(s) {', '.join(missing)}")
    n = outcomes.n
    acc = float(outcomes.correct[np.arange(n), routing.final].mean())
    counts = np.bincount(routing.final, minlength=len(TIERS))
    spent = float(cost({t: routing.attempted[:, i] * outcomes.tokens[:, i] for i, t in enumerate(TIERS)}, costs).sum())
    cloud = float(cost({"cloud": outcomes.tokens[:, CLOUD]}, costs).sum())
    return {
        "accuracy": acc,
        "share": {t: float(c) / n for t, c in zip(TIERS, counts)},
        "cost_vs_cloud": float(spent / cloud) if cloud > 0 else float("nan"),
    }


# ------------------------------------------------------------------ curves and metrics
@dataclass(frozen=True)
class Curve:
    """Sweep points of one router, sorted by cloud share."""

    cloud_share: np.ndarray
    accuracy: np.ndarray
    cost_vs_cloud: np.ndarray


def sweep(outcomes: Outcomes, scores: np.ndarray, route, costs: Mapping[str, float]) -> Curve:
    """One point per distinct threshold (every distinct score, and +inf: nothing sent by score)."""
    thresholds = np.concatenate([np.unique(np.asarray(scores, dtype=np.float64)), [math.inf]])
    pts = []
    for t in thresholds:
        s = summarize(outcomes, route(t), costs)
        pts.append((s["share"]["cloud"], s["accuracy"], s["cost_vs_cloud"]))
    pts.sort()
    arr = np.asarray(pts, dtype=np.float64)
    return Curve(arr[:, 0], arr[:, 1], arr[:, 2])


def _monotone_curve(share: np.ndarray, acc: np.ndarray, weak: float, strong: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique shares in [0, 1] with anchors and the running-maximum accuracy."""
    share = np.clip(np.asarray(share, dtype=np.float64), 0.0, 1.0)
    acc = np.asarray(acc, dtype=np.float64)
    if not np.any(share <= 0.0):
        share, acc = np.append(share, 0.0), np.append(acc, weak)
    if not np.any(share >= 1.0):
        share, acc = np.append(share, 1.0), np.append(acc, strong)
    xs = np.unique(share)
    ys = np.asarray([acc[share == x].max() for x in xs])
    return xs, np.maximum.accumulate(ys)


def curve_metrics(share: np.ndarray, accuracy: np.ndarray, weak: float, strong: float) -> dict[str, float | None]:
    """RouteLLM's APGR, CPT(50%), CPT(80%), plus the accuracy at 10% cloud share (90% answered below it).

    APGR/CPT are None when strong == weak (the performance gap is zero)."""
    xs, ys = _monotone_curve(share, accuracy, weak, strong)
    out: dict[str, float | None] = {"accuracy_at_90": float(np.interp(0.1, xs, ys))}
    gap = strong - weak
    if abs(gap) < 1e-12:
        return {"apgr": None, "cpt50": None, "cpt80": None, **out}
    pgr = (ys - weak) / gap
    apgr = float(np.sum((xs[1:] - xs[:-1]) * (pgr[1:] + pgr[:-1]) / 2.0))
    return {"apgr": apgr, "cpt50": _cpt(xs, pgr, 0.5), "cpt80": _cpt(xs, pgr, 0.8), **out}


def _cpt(xs: np.ndarray, pgr: np.ndarray, target: float) -> float | None:
    """Smallest cloud share at which the (interpolated) PGR reaches target; None if it never does."""
    if pgr[0] >= target:
        return float(xs[0])
    for i in range(1, len(xs)):
        if pgr[i] >= target:
            x0, x1, y0, y1 = xs[i - 1], xs[i], pgr[i - 1], pgr[i]
            return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))
    return None


def calibrate(scores_calib: Sequence[float] | np.ndarray, target_edge_share: float) -> float:
    """Threshold such that `target_edge_share` of the calibration scores fall below it (RouteLLM: the
    (1 - strong share) quantile of the calibration scores); requests scoring >= it go to the cloud."""
    try:
        share = float(target_edge_share)
    except (TypeError, ValueError):
        raise ValueError(f"--target-edge-share must be a number in (0, 1), got {target_edge_share!r}") from None
    if not (0.0 < share < 1.0):
        raise ValueError(f"--target-edge-share must be in (0, 1) (exclusive), got {target_edge_share!r}")
    scores = np.asarray(scores_calib, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no calibration scores")
    return float(np.quantile(scores, share))


@dataclass(frozen=True)
class PolicyPoint:
    """One operating point of the tierline policy, in the manifest's terms (router.*)."""

    cloud_complexity: float  # 1 - p_edge at or above: straight to the cloud
    device_complexity: float  # 1 - p_device below: start on the device
    confidence_threshold: dict  # tier -> minimum confidence to keep its answer
    share_below_cloud: float  # on the calibration outcomes
    accuracy: float
    cost_vs_cloud: float

    def routing(self, outcomes: Outcomes, cloud_scores: np.ndarray, device_scores: np.ndarray) -> Routing:
        return tierline_routing(outcomes, cloud_scores, device_scores, self.cloud_complexity,
                                self.device_complexity, self.confidence_threshold)

    def manifest_fields(self) -> dict[str, Any]:
        return {"cloud_complexity": self.cloud_complexity, "device_complexity": self.device_complexity,
                "confidence_threshold": dict(self.confidence_threshold)}


# Quantile levels searched by `calibrate_policy`. Confidence thresholds are dense at the low end: with a
# cloud budget of about 10%, the useful escalation thresholds sit among the lowest few percent of
# confidences, which an evenly spaced grid (0, 12.5%, ...) steps over.
CONFIDENCE_LEVELS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.12, 0.14, 0.16, 0.18,
                     0.20, 0.25, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90)
DEVICE_SCORE_LEVELS = tuple(round(float(q), 4) for q in np.linspace(0.05, 0.95, 13))
CLOUD_SCORE_LEVELS = tuple(round(float(q), 4) for q in np.linspace(0.80, 0.99, 20))  # with a quality floor


def _grid(values: np.ndarray, levels: Sequence[float], low: float | None = None) -> list[float]:
    """The quantiles of `values` at `levels` (distinct, rounded), plus `low` (a value that disables the rule)."""
    qs = np.quantile(np.asarray(values, dtype=np.float64), np.asarray(levels, dtype=np.float64))
    return sorted({round(float(q), 6) for q in qs} | ({low} if low is not None else set()))


def calibrate_policy(
    outcomes: Outcomes,
    cloud_scores: np.ndarray,
    device_scores: np.ndarray,
    target_edge_share: float,
    costs: Mapping[str, float],
    min_quality: float | None = None,
) -> PolicyPoint:
    """All four thresholds of the tierline policy from calibration outcomes.

    For every (device_complexity, device confidence, edge confidence) on a grid of quantiles of the
    calibration values (DEVICE_SCORE_LEVELS, CONFIDENCE_LEVELS), the cloud threshold is the lowest score
    that still answers at least `target_edge_share` of the requests below the cloud, escalations included.
    Among those points the most accurate wins (then the cheapest). This is RouteLLM's quantile calibration
    extended to the cascade: the share is a constraint and accuracy the objective, both measured on the
    calibration split.

    With `min_quality` (a fraction of the cloud-only accuracy on the same outcomes), quality becomes a
    constraint too and cost the objective: higher cloud thresholds (CLOUD_SCORE_LEVELS, fewer requests
    straight to the cloud) are tried as well, and the cheapest point whose accuracy reaches
    `min_quality * cloud-only accuracy` wins; when none does, the most accurate point is returned."""
    calibrate([0.0], target_edge_share)  # the same range check and message as the quantile calibration
    if min_quality is not None and not 0.0 < float(min_quality) <= 1.0:
        raise ValueError(f"--min-quality must be in (0, 1], got {min_quality!r}")
    cloud_scores, device_scores = np.asarray(cloud_scores, float), np.asarray(device_scores, float)
    if len(cloud_scores) != outcomes.n or len(device_scores) != outcomes.n:
        raise ValueError(f"scores for {len(cloud_scores)}/{len(device_scores)} prompts, outcomes for {outcomes.n}")
    t_devices = _grid(device_scores, DEVICE_SCORE_LEVELS, low=0.0)  # 0.0: nothing starts on the device
    conf_device = _grid(outcomes.confidence[:, DEVICE], CONFIDENCE_LEVELS, low=0.0)  # 0.0: never escalate
    conf_edge = _grid(outcomes.confidence[:, EDGE], CONFIDENCE_LEVELS, low=0.0)
    t_clouds = sorted(set(np.unique(cloud_scores).tolist()) | {1.0})  # 1.0: the highest the manifest allows
    higher = _grid(cloud_scores, CLOUD_SCORE_LEVELS, low=1.0) if min_quality is not None else []
    points: list[PolicyPoint] = []
    for t_dev in t_devices:
        for c_dev in conf_device:
            for c_edge in conf_edge:
                thresholds = {"device": c_dev, "edge": c_edge}
                # the share below the cloud grows with t_cloud: bisect for the lowest t_cloud that reaches it
                lo, hi = 0, len(t_clouds) - 1
                top = tierline_routing(outcomes, cloud_scores, device_scores, t_clouds[hi], t_dev, thresholds)
                if float((top.final != CLOUD).mean()) < target_edge_share:
                    continue  # escalations alone send too much to the cloud
                while lo < hi:
                    mid = (lo + hi) // 2
                    r = tierline_routing(outcomes, cloud_scores, device_scores, t_clouds[mid], t_dev, thresholds)
                    if float((r.final != CLOUD).mean()) >= target_edge_share:
                        hi = mid
                    else:
                        lo = mid + 1
                for t_cloud in [t_clouds[lo]] + [t for t in higher if t > t_clouds[lo]]:
                    r = tierline_routing(outcomes, cloud_scores, device_scores, t_cloud, t_dev, thresholds)
                    s = summarize(outcomes, r, costs)
                    points.append(PolicyPoint(
                        cloud_complexity=float(t_cloud), device_complexity=t_dev, confidence_threshold=thresholds,
                        share_below_cloud=1.0 - s["share"]["cloud"], accuracy=s["accuracy"],
                        cost_vs_cloud=s["cost_vs_cloud"]))
    if not points:
        raise ValueError(f"no thresholds keep {target_edge_share:.0%} of the calibration requests below the cloud")
    if min_quality is not None:
        floor = float(min_quality) * outcomes.accuracy("cloud")
        good = [p for p in points if p.accuracy >= floor - 1e-12]
        if good:
            return min(good, key=lambda p: (p.cost_vs_cloud, -p.accuracy))
    return max(points, key=lambda p: (p.accuracy, -p.cost_vs_cloud))


# ------------------------------------------------------------------ the routers over one outcome set
def router_scores(problems: list, scorer: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Per problem: random (uniform), length (prompt characters), tierline (1 - p_edge) and
    tierline_device (1 - p_device)."""
    p = [scorer.p_correct(pr.prompt) for pr in problems]
    return {
        "random": np.random.default_rng(seed).random(len(problems)),
        "length": np.asarray([len(pr.prompt) for pr in problems], dtype=np.float64),
        "tierline": np.asarray([1.0 - d["edge"] for d in p], dtype=np.float64),
        "tierline_device": np.asarray([1.0 - d["device"] for d in p], dtype=np.float64),
    }


def router_curves(
    outcomes: Outcomes,
    scores: Mapping[str, np.ndarray],
    costs: Mapping[str, float],
    t_device: float = DEFAULTS.device_complexity,
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, Curve]:
    """Threshold sweeps of random, length (cloud when score >= t, else edge) and tierline (t = t_cloud)."""
    curves = {
        name: sweep(outcomes, scores[name], lambda t, s=scores[name]: two_way_routing(s, t), costs)
        for name in ("random", "length")
    }
    curves["tierline"] = sweep(
        outcomes, scores["tierline"],
        lambda t: tierline_routing(outcomes, scores["tierline"], scores["tierline_device"], t, t_device, thresholds),
        costs,
    )
    return curves


def evaluate_routers(
    outcomes: Outcomes,
    problems: list,
    scorer: Any,
    costs: Mapping[str, float],
    *,
    calib_prompts: list[str] | None = None,
    target_edge_share: float = 0.8,
    t_device: float = DEFAULTS.device_complexity,
    thresholds: Mapping[str, float] | None = None,
    policy: Mapping[str, Any] | None = None,
    seed: int = 0,
    curves_out: dict[str, Curve] | None = None,
) -> dict[str, Any]:
    """{"n", "routers": {name: {accuracy, share, cost_vs_cloud[, apgr, cpt50, cpt80, accuracy_at_90]}}}.

    The reported operating point of random/length sends `1 - target_edge_share` of traffic to the cloud by
    score, with thresholds calibrated on `calib_prompts` (the evaluated prompts themselves when None).
    Tierline's operating point is `policy` (the manifest's router.cloud_complexity, device_complexity and
    confidence_threshold, as the running router reads them) when given; else its cloud threshold is
    calibrated like the others and the escalations come on top. `curves_out`, if given, receives the sweeps."""
    if len(problems) != outcomes.n:
        raise ValueError(f"{len(problems)} problems but outcomes for {outcomes.n}")
    n = outcomes.n
    if policy is not None:
        t_device, thresholds = float(policy["device_complexity"]), dict(policy["confidence_threshold"])
    scores = router_scores(problems, scorer, seed=seed)
    curves = router_curves(outcomes, scores, costs, t_device=t_device, thresholds=thresholds)
    if curves_out is not None:
        curves_out.update(curves)

    if calib_prompts:
        calib_length = np.asarray([len(p) for p in calib_prompts], dtype=np.float64)
        calib_tier = np.asarray([scorer.complexity(p) for p in calib_prompts], dtype=np.float64)
    else:
        calib_length, calib_tier = scores["length"], scores["tierline"]
    t_length = calibrate(calib_length, target_edge_share)
    t_tier = calibrate(calib_tier, target_edge_share)
    t_random = calibrate(np.linspace(0.0, 1.0, 10001), target_edge_share)  # uniform scores: t = edge share

    if policy is not None:
        t_tier = float(policy["cloud_complexity"])
    routings = {
        "tierline": tierline_routing(outcomes, scores["tierline"], scores["tierline_device"], t_tier, t_device,
                                     thresholds),
        "device_only": fixed_routing(n, "device"),
        "edge_only": fixed_routing(n, "edge"),
        "cloud_only": fixed_routing(n, "cloud"),
        "random": two_way_routing(scores["random"], t_random),
        "length": two_way_routing(scores["length"], t_length),
        "oracle": oracle_routing(outcomes),
    }
    weak, strong = outcomes.accuracy("edge"), outcomes.accuracy("cloud")
    routers: dict[str, dict[str, Any]] = {}
    for name in ROUTERS:
        r = summarize(outcomes, routings[name], costs)
        if name in SCORE_ROUTERS:
            r.update(curve_metrics(curves[name].cloud_share, curves[name].accuracy, weak, strong))
        routers[name] = r
    return {"n": n, "routers": routers}


# ------------------------------------------------------------------ output
def write_curve(result_curves: Mapping[str, Any], png_path: str | Path | None, csv_path: str | Path) -> bool:
    """CSV rows (router, cloud_share, accuracy, cost_vs_cloud) and, when matplotlib is importable, a PNG of
    accuracy against cloud share. Returns whether the PNG was written (matplotlib==3.11.2 is not a
    dependency of this project)."""
    rows = []
    for name, c in result_curves.items():
        share, acc, cost = (_field(c, k) for k in ("cloud_share", "accuracy", "cost_vs_cloud"))
        rows.extend((name, float(s), float(a), float(k)) for s, a, k in zip(share, acc, cost))
    csv_path = Path(csv_path)
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["router", "cloud_share", "accuracy", "cost_vs_cloud"])
        for name, s, a, k in rows:
            w.writerow([name, f"{s:.6f}", f"{a:.6f}", f"{k:.6f}"])
    if png_path is None:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, c in result_curves.items():
        share, acc = np.asarray(_field(c, "cloud_share")), np.asarray(_field(c, "accuracy"))
        if len(share) > 1:
            ax.plot(share, acc, label=name)
        else:
            ax.scatter(share, acc, label=name, marker="x")
    ax.set_xlabel("share of requests answered by the cloud")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(Path(png_path), dpi=120)
    plt.close(fig)
    return True


def _field(c: Any, key: str) -> Any:
    return c[key] if isinstance(c, Mapping) else getattr(c, key)
