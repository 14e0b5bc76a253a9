"""The learned complexity scorer: trained on the committed models' calib labels, it ranks held-out prompts
well, survives a save/load round trip exactly and refuses files that are malformed or made for other models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tierline.build.scorer import artifact_digests, decision_latency, fit_scorer
from tierline_router.scorer import FEATURE_NAMES, LOWER_TIERS, Scorer, detect_family, prompt_features
from tierline_shared.tasks.problems import generate

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
N = 600  # calib problems labelled per tier (about 10 s for both lower tiers; conftest)

pytestmark = pytest.mark.skipif(not (MODELS / "manifest.json").is_file(), reason="committed models not present")


@pytest.fixture(scope="module")
def labelled(committed_calib_labels) -> tuple[list[str], dict[str, list[bool]]]:
    return committed_calib_labels  # N calib problems, labelled once per session


@pytest.fixture(scope="module")
def digests() -> dict[str, str]:
    return artifact_digests(MODELS)


@pytest.fixture(scope="module")
def scorer(labelled, digests) -> Scorer:
    prompts, labels = labelled
    return fit_scorer(prompts, labels, artifacts=digests)


def test_features_are_a_fixed_float32_vector_and_family_is_read_off_the_prompt():
    for p in generate("calib", 40, seed=5):
        x = prompt_features(p.prompt)
        assert x.dtype == np.float32 and x.shape == (len(FEATURE_NAMES),)
        assert np.all(np.isfinite(x)) and x[-1] == 1.0
        assert detect_family(p.prompt) == p.family, p.prompt


def test_labels_cover_both_lower_tiers(labelled):
    prompts, labels = labelled
    assert len(prompts) == N
    for tier in LOWER_TIERS:
        assert len(labels[tier]) == N and all(isinstance(c, bool) for c in labels[tier])
        assert 0 < sum(labels[tier]) < N  # both outcomes occur, so there is something to learn


def test_heldout_auc_clearly_above_chance(scorer):
    for tier in LOWER_TIERS:
        m = scorer.heldout[tier]
        print(f"{tier}: held-out AUC {m['auc']}, accuracy {m['accuracy']} (base rate {m['base_rate']})")
    assert scorer.n_train + scorer.n_heldout == N and scorer.n_heldout > 0
    assert scorer.heldout["edge"]["auc"] > 0.7
    assert scorer.heldout["device"]["auc"] > 0.7


def test_scores_are_probabilities_and_complexity_is_edge_failure(scorer, labelled):
    prompts, _ = labelled
    for prompt in prompts[:50]:
        p = scorer.p_correct(prompt)
        assert set(p) == set(LOWER_TIERS) and all(0.0 <= v <= 1.0 for v in p.values())
        assert scorer.complexity(prompt) == pytest.approx(1.0 - p["edge"], abs=1e-12)


def test_save_load_round_trip_gives_identical_scores(scorer, labelled, digests, tmp_path):
    prompts, _ = labelled
    path = tmp_path / "scorer.json"
    scorer.save(path)
    loaded = Scorer.load(path, expected_artifacts=digests)
    assert loaded.to_dict() == scorer.to_dict()
    for prompt in prompts:
        assert loaded.p_correct(prompt) == scorer.p_correct(prompt)
        assert loaded.complexity(prompt) == scorer.complexity(prompt)
    saved = json.loads(path.read_text())
    assert saved["artifacts"] == digests and saved["n_train"] == scorer.n_train


def test_load_refuses_other_artifacts(scorer, digests, tmp_path):
    path = tmp_path / "scorer.json"
    scorer.save(path)
    other = dict(digests, edge="0" * 64)
    with pytest.raises(ValueError) as err:
        Scorer.load(path, expected_artifacts=other)
    msg = str(err.value)
    assert str(path) in msg and "edge" in msg and digests["edge"] in msg and "0" * 64 in msg


@pytest.mark.parametrize("text", ['{"format": "tierline-scorer", "weights": ', "[]", '{"format": "something-else"}'])
def test_load_refuses_malformed_json(text, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="broken.json"):
        Scorer.load(path)


def test_load_refuses_wrong_shaped_weights(scorer, tmp_path):
    data = scorer.to_dict()
    data["weights"]["edge"] = data["weights"]["edge"][:-1]
    path = tmp_path / "short.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="short.json"):
        Scorer.load(path)


def test_decision_latency_is_measured(scorer, labelled):
    prompts, _ = labelled
    lat = decision_latency(scorer, prompts)
    print(f"decision latency over {lat['n']} prompts: p50 {lat['p50_ms']:.4f} ms, p99 {lat['p99_ms']:.4f} ms")
    assert lat["n"] == len(prompts)
    assert lat["p50_ms"] > 0 and lat["p99_ms"] > 0 and lat["p99_ms"] >= lat["p50_ms"]


def test_a_board_decides_where_a_request_starts_as_the_router_does(tiny_family, tmp_path):
    """Found by a fault hunt: a board's own front door built its policy without the manifest's learned scorer
    (router.scorer), so with thresholds calibrated for the scorer it started 36 of 60 prompts on its own model that
    the router started on the edge. ROUTING.md: the router and the board decide with one policy. Both build it with
    `Policy.of_manifest` now; the board's is compared here with one made from the scorer independently."""
    import yaml

    from tierline_device_agent.process import DeviceProcess
    from tierline_router.policy import Policy
    from tierline_router.scorer import load_scorer
    from tierline_shared.config.manifest import load_manifest
    from tierline_shared.models.artifacts import load_index
    from tierline_shared.serving.metrics import Metrics

    artifacts = load_index(tiny_family)["artifacts"]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({
        "model_name": "tierline-reasoner", "models_dir": str(tiny_family),
        "nats": {"url": "nats://127.0.0.1:4222"},
        "router": {"scorer": artifacts["router_scorer"]["path"], "device_complexity": 0.38, "cloud_complexity": 1.0},
        "tiers": {t: {"artifact": artifacts[t]["weights"]["path"], "sha256": artifacts[t]["weights"]["sha256"]}
                  for t in ("device", "edge", "cloud")}}))
    manifest = load_manifest(path)
    process = DeviceProcess(manifest, use_nats=False)
    board = process.make_servicer(process.load_engine(), Metrics("device", "tierline-reasoner")).policy
    router = Policy.from_config(manifest.router, load_scorer(manifest))
    heuristic = Policy.from_config(manifest.router)
    tiers = ("device", "edge", "cloud")
    prompts = [p.prompt for p in generate("test", 60, seed=11)]
    assert any(heuristic.decide(p, tiers)[0] != router.decide(p, tiers)[0] for p in prompts)  # the scorer matters
    assert [board.decide(p, tiers)[0] for p in prompts] == [router.decide(p, tiers)[0] for p in prompts]
