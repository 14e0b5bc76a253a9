"""Offline router evaluation: tier outcomes on the committed models, simulated routers, RouteLLM metrics."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tierline.build.routing import (
    CLOUD,
    ROUTERS,
    Outcomes,
    calibrate,
    calibrate_policy,
    curve_metrics,
    evaluate_routers,
    run_tiers,
    summarize,
    sweep,
    tierline_routing,
    two_way_routing,
    write_curve,
)
from tierline.build.scorer import fit_scorer
from tierline_shared.tasks.problems import generate

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
COSTS = {"device": 0.01, "edge": 0.1, "cloud": 1.0}
N = 200

needs_models = pytest.mark.skipif(not (MODELS / "manifest.json").is_file(), reason="committed models not present")


@pytest.fixture(scope="module")
def problems():
    return generate("test", N, seed=0)


@pytest.fixture(scope="module")
def outcomes(problems):
    return run_tiers(MODELS, problems)


@pytest.fixture(scope="module")
def result(outcomes, problems, committed_calib_labels):
    prompts, labels = committed_calib_labels
    scorer = fit_scorer(prompts, labels)
    curves: dict = {}
    res = evaluate_routers(outcomes, problems, scorer, COSTS, calib_prompts=prompts, curves_out=curves)
    return res, curves


@needs_models
def test_result_shape_and_shares_sum_to_one(result):
    res, _ = result
    json.dumps(res)  # plain JSON types only
    assert res["n"] == N and set(res) == {"n", "routers"} and set(res["routers"]) == set(ROUTERS)
    for name, r in res["routers"].items():
        assert set(r["share"]) == {"device", "edge", "cloud"}
        assert sum(r["share"].values()) == pytest.approx(1.0, abs=1e-9), name
        assert 0.0 <= r["accuracy"] <= 1.0 and r["cost_vs_cloud"] >= 0.0
        has_curve = {"apgr", "cpt50", "cpt80", "accuracy_at_90"} <= set(r)
        assert has_curve == (name in ("random", "length", "tierline")), name


@needs_models
def test_cloud_only_costs_one_and_matches_the_measured_cloud_accuracy(result, outcomes, problems):
    from tierline.build.engines import load_engine
    from tierline.build.evaluate import evaluate

    cloud = result[0]["routers"]["cloud_only"]
    assert cloud["cost_vs_cloud"] == pytest.approx(1.0)
    assert cloud["share"]["cloud"] == 1.0
    assert cloud["accuracy"] == pytest.approx(outcomes.accuracy("cloud"))
    measured = evaluate(load_engine(MODELS, "cloud", threads=1), problems)["accuracy"]
    assert cloud["accuracy"] == pytest.approx(measured, abs=1e-4)


@needs_models
def test_oracle_is_at_least_as_accurate_as_every_router(result):
    routers = result[0]["routers"]
    for name, r in routers.items():
        assert routers["oracle"]["accuracy"] >= r["accuracy"] - 1e-12, name


@needs_models
def test_curves_are_written_as_csv(result, tmp_path):
    _, curves = result
    png = write_curve(curves, tmp_path / "curve.png", tmp_path / "curve.csv")
    with (tmp_path / "curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["router"] for r in rows} == {"random", "length", "tierline"}
    assert all(0.0 <= float(r["cloud_share"]) <= 1.0 for r in rows)
    assert png == (tmp_path / "curve.png").is_file()


def _synthetic(n: int, p_edge: float, p_cloud: float, seed: int) -> Outcomes:
    rng = np.random.default_rng(seed)
    correct = np.stack([rng.random(n) < p_edge, rng.random(n) < p_edge, rng.random(n) < p_cloud], axis=1)
    return Outcomes(correct, rng.random((n, 3)), np.full((n, 3), 50, dtype=np.int64))


def test_random_router_recovers_about_half_the_gap():
    out = _synthetic(2000, 0.4, 0.7, seed=1)
    scores = np.random.default_rng(2).random(out.n)
    c = sweep(out, scores, lambda t: two_way_routing(scores, t), COSTS)
    m = curve_metrics(c.cloud_share, c.accuracy, out.accuracy("edge"), out.accuracy("cloud"))
    assert 0.3 < m["apgr"] < 0.7
    assert c.cost_vs_cloud[-1] == pytest.approx(1.0) and c.cloud_share[0] == 0.0


def test_perfect_router_on_hand_made_outcomes():
    # the edge is wrong on 2% of problems, the cloud always right; the score is 1 exactly on those
    n = 100
    correct = np.ones((n, 3), dtype=bool)
    correct[:2, :2] = False
    out = Outcomes(correct, np.ones((n, 3)), np.full((n, 3), 10, dtype=np.int64))
    scores = (~correct[:, 1]).astype(float)
    c = sweep(out, scores, lambda t: two_way_routing(scores, t), COSTS)
    m = curve_metrics(c.cloud_share, c.accuracy, out.accuracy("edge"), out.accuracy("cloud"))
    assert m["apgr"] == pytest.approx(0.99)  # PGR rises 0 -> 1 over the first 2% of cloud share
    assert m["cpt50"] == pytest.approx(0.01) and m["cpt80"] == pytest.approx(0.016)


def test_curve_metrics_known_answer_and_monotone_envelope():
    # weak 0.5, strong 1.0; the router reaches 1.0 at half the traffic; a dip at 0.75 is ignored (running max)
    m = curve_metrics(np.array([0.5, 0.75]), np.array([1.0, 0.8]), weak=0.5, strong=1.0)
    assert m["apgr"] == pytest.approx(0.75)
    assert m["cpt50"] == pytest.approx(0.25) and m["cpt80"] == pytest.approx(0.4)
    assert m["accuracy_at_90"] == pytest.approx(0.6)
    assert curve_metrics(np.array([0.3]), np.array([0.5]), 0.5, 0.5)["apgr"] is None


def test_calibrate_gives_the_asked_edge_share_and_rejects_the_ends():
    scores = np.random.default_rng(3).random(500)
    for share in (0.05, 0.25, 0.5, 0.8, 0.95):
        t = calibrate(scores, share)
        assert abs(float(np.mean(scores < t)) - share) <= 1.0 / len(scores)
    for bad in (0, 1, 0.0, 1.0, -0.2, 1.5, math.nan):
        with pytest.raises(ValueError, match="--target-edge-share"):
            calibrate(scores, bad)


def test_outcomes_round_trip(tmp_path):
    out = _synthetic(20, 0.5, 0.8, seed=4)
    out.save(tmp_path / "o.npz")
    back = Outcomes.load(tmp_path / "o.npz")
    for name in ("correct", "confidence", "tokens"):
        assert np.array_equal(getattr(out, name), getattr(back, name))


def _graded(n: int, seed: int) -> tuple[Outcomes, np.ndarray]:
    """Problems of growing difficulty: the device solves the easiest 40%, the edge 70%, the cloud 95%; each
    tier is confident when right and unsure when wrong; the prompt-only score is difficulty plus noise."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)
    correct = np.stack([difficulty < 0.4, difficulty < 0.7, difficulty < 0.95], axis=1)
    confidence = np.where(correct, 0.6 + 0.4 * rng.random((n, 3)), 0.5 * rng.random((n, 3)))
    scores = np.clip(difficulty + 0.25 * rng.standard_normal(n), 0.0, 1.0)
    return Outcomes(correct, confidence, np.full((n, 3), 40, dtype=np.int64)), scores


def test_calibrate_policy_keeps_the_share_and_beats_the_score_quantile_alone():
    out, scores = _graded(800, seed=5)
    point = calibrate_policy(out, scores, scores, 0.9, COSTS)
    routing = point.routing(out, scores, scores)
    below = float((routing.final != CLOUD).mean())
    assert below >= 0.9 and below == pytest.approx(point.share_below_cloud)
    assert summarize(out, routing, COSTS)["accuracy"] == pytest.approx(point.accuracy)
    # the same share by the cloud threshold alone (no device start, no escalation), as RouteLLM calibrates
    alone = tierline_routing(out, scores, scores, calibrate(scores, 0.9), 0.0, {"device": 0.0, "edge": 0.0})
    assert point.accuracy > summarize(out, alone, COSTS)["accuracy"]
    # informative confidences are used: some answers are escalated on low confidence
    assert max(point.confidence_threshold.values()) > 0.0
    fields = point.manifest_fields()
    assert set(fields) == {"cloud_complexity", "device_complexity", "confidence_threshold"}
    assert 0.0 <= fields["cloud_complexity"] <= 1.0 and 0.0 <= fields["device_complexity"] <= 1.0


def test_calibrate_policy_finds_an_escalation_threshold_in_the_lowest_confidences():
    # The edge is wrong on 8% of requests, always with a confidence below any right answer's; the prompt
    # score knows nothing. With 10% allowed at the cloud, the only good policy escalates exactly that tail,
    # a threshold near the 8% quantile of the edge's confidences (an even grid steps from 0% to 12.5%).
    rng = np.random.default_rng(11)
    n = 1000
    edge_right = rng.random(n) >= 0.08
    correct = np.stack([np.zeros(n, bool), edge_right, np.ones(n, bool)], axis=1)
    confidence = np.stack([rng.random(n), np.where(edge_right, 0.5 + 0.5 * rng.random(n), 0.3 * rng.random(n)),
                           np.ones(n)], axis=1)
    out = Outcomes(correct, confidence, np.full((n, 3), 40, dtype=np.int64))
    scores = rng.random(n)
    point = calibrate_policy(out, scores, np.ones(n), 0.9, COSTS)
    assert point.share_below_cloud >= 0.9
    assert point.confidence_threshold["edge"] > 0.0
    assert point.accuracy >= 0.97 > float(edge_right.mean())


def test_calibrate_policy_with_a_quality_floor_is_the_cheapest_point_above_it():
    out, scores = _graded(800, seed=5)
    best = calibrate_policy(out, scores, scores, 0.9, COSTS)
    floor = 0.75 * out.accuracy("cloud")
    assert best.accuracy > floor  # room to trade accuracy for cost
    cheap = calibrate_policy(out, scores, scores, 0.9, COSTS, min_quality=0.75)
    assert cheap.accuracy >= floor and cheap.share_below_cloud >= 0.9
    assert cheap.cost_vs_cloud < best.cost_vs_cloud
    routing = cheap.routing(out, scores, scores)
    assert summarize(out, routing, COSTS)["cost_vs_cloud"] == pytest.approx(cheap.cost_vs_cloud)
    # a floor no point reaches: the most accurate point, as without one
    assert calibrate_policy(out, scores, scores, 0.9, COSTS, min_quality=1.0) == best
    with pytest.raises(ValueError, match="--min-quality"):
        calibrate_policy(out, scores, scores, 0.9, COSTS, min_quality=1.5)


@pytest.mark.parametrize("bad", [0, 1, -0.5, 2])
def test_calibrate_policy_rejects_a_share_outside_0_1(bad):
    out, scores = _graded(50, seed=1)
    with pytest.raises(ValueError, match="--target-edge-share"):
        calibrate_policy(out, scores, scores, bad, COSTS)


def test_route_eval_replays_the_live_router_exactly(tmp_path):
    """The same prompts and per-tier confidences through the running router (real nats-server, a responder per
    tier answering with the recorded confidence) and through the offline evaluation: the same first tier, the
    same escalations, the same answering tier and the same cost, problem by problem."""
    import asyncio
    import itertools

    from tierline_api.v1 import inference_pb2 as pb
    from tierline_infra.supervisor import NatsServer
    from tierline_router.cascade import cost, paid_tokens
    from tierline_router.policy import Policy, complexity
    from tierline_router.service import RouterServicer
    from tierline_shared.transport.messaging import NatsOptions, connect, subject
    from tierline_shared.wire import TIERS

    # prompts of 1..12 steps: heuristic scores from 1/12 to 1 cross both complexity thresholds
    prompts = ["Q:" + "+".join(["1"] * (k + 1)) + "=?\nA:" for k in range(1, 13)]
    # every kept / not kept pattern, and an edge answer kept with less confidence than the device's it replaces
    grid = list(itertools.product((0.05, 0.15, 0.3, 0.9), repeat=len(TIERS)))
    cases = [(p, c) for p in prompts for c in grid[::4]] + [(prompts[i % 12], c) for i, c in enumerate(grid)]
    thresholds = {"device": 0.5, "edge": 0.1}
    policy = Policy(device_complexity=0.3, cloud_complexity=0.7, thresholds=thresholds)
    tokens = {"device": 11, "edge": 23, "cloud": 37}

    async def live() -> list[pb.InferResponse]:
        server = NatsServer(tmp_path).start()
        opts = NatsOptions(server.url, server.user, server.password)
        tiers_nc, router_nc = await connect(opts, "tiers"), await connect(opts, "router")
        try:
            for col, tier in enumerate(TIERS):
                async def answer(msg, tier=tier, col=col):
                    request = pb.InferRequest.FromString(msg.data)
                    conf = cases[int(request.request_id)][1][col]
                    await msg.respond(pb.InferResponse(
                        tier=tier, confidence=conf, choices=[pb.Choice(text="7", finish_reason="stop")],
                        usage=pb.Usage(prompt_tokens=tokens[tier] - 1, completion_tokens=1)).SerializeToString())
                await tiers_nc.subscribe(subject(tier), queue="q", cb=answer)
            await tiers_nc.flush()
            router = RouterServicer(router_nc, policy, "tierline-reasoner", TIERS, request_timeout_s=10.0)
            return [await router.route(pb.InferRequest(prompt=p, request_id=str(i)), deadline=None)
                    for i, (p, _) in enumerate(cases)]
        finally:
            await router_nc.close()
            await tiers_nc.close()
            server.stop()

    answers = asyncio.run(live())
    n = len(cases)
    outcomes = Outcomes(np.ones((n, 3), dtype=bool), np.array([c for _, c in cases], dtype=np.float64),
                        np.tile([tokens[t] for t in TIERS], (n, 1)))
    scores = np.array([complexity(p) for p, _ in cases])
    offline = tierline_routing(outcomes, scores, scores, 0.7, 0.3, thresholds)
    costs = {"device": 0.01, "edge": 0.1, "cloud": 1.0}
    assert {a.escalation_path[0].tier for a in answers} == set(TIERS)  # every first tier is exercised
    assert len({tuple(x.tier for x in a.escalation_path) for a in answers}) >= 5  # and many paths
    for i, resp in enumerate(answers):
        ran = {a.tier for a in resp.escalation_path}
        assert ran == {t for t, hit in zip(TIERS, offline.attempted[i]) if hit}, (cases[i], resp.escalation_path)
        assert resp.tier == TIERS[offline.final[i]] and not resp.degraded
        assert cost(paid_tokens(resp.escalation_path), costs) == pytest.approx(
            cost({t: offline.attempted[i, k] * outcomes.tokens[i, k] for k, t in enumerate(TIERS)}, costs))
