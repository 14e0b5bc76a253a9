"""`tierline models build|eval` on the tiny family: the contract other tools read."""

import json
import shutil

import pytest

from tests.conftest import run_cli
from tierline.build.engines import load_engine
from tierline_shared.models.artifacts import ArtifactError, load_index, sha256_of


def test_build_writes_every_artifact_with_cards(tiny_family):
    manifest = load_index(tiny_family)
    arts = manifest["artifacts"]
    assert set(arts) == {"tokenizer", "cloud", "edge", "device", "router_scorer"}
    for tier in ("cloud", "edge", "device"):
        entry = arts[tier]
        assert sha256_of(tiny_family / entry["weights"]["path"]) == entry["weights"]["sha256"]
        card = json.loads((tiny_family / tier / "card.json").read_text())
        assert card["sha256"] == entry["weights"]["sha256"]
        assert set(card["accuracy"]["by_level"]) == {"1", "2", "3", "4", "5"}
        assert (tiny_family / tier / "card.md").read_text().startswith("# Model card")
    assert arts["edge"]["weights"]["path"].endswith(".onnx")
    assert arts["device"]["weights"]["path"].endswith(".tflite")
    report = json.loads((tiny_family / "report.json").read_text())
    # the distillation baseline is measured, not assumed
    assert "student_no_distill" in report["accuracy"] and "student_fp32_torch" in report["accuracy"]
    assert report["params"]["edge"] <= report["params"]["cloud"] / 3
    assert report["params"]["device"] <= 0.35 * report["params"]["edge"]
    assert 0.0 <= report["int8_kv_cache_agreement"] <= 1.0


def test_build_log_shows_progress_within_a_stage(tiny_family):
    """Without a terminal (a CI log) each training stage still reports every tenth of its steps."""
    log = (tiny_family.parent / "build.log").read_text()
    assert "teacher (cloud): 4/40 loss" in log and "teacher (cloud): 36/40 loss" in log
    assert "teacher (cloud): done in" in log


@pytest.mark.parametrize("tier", ["cloud", "edge", "device"])
def test_eval_json_contract(tiny_family, tier):
    proc = run_cli("models", "eval", "--tier", tier, "--n", "10", "--seed", "3", "--models", str(tiny_family),
                   "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("accuracy", "by_level", "n", "params", "bytes", "tokens_per_s"):
        assert key in out
    assert out["n"] == 10 and 0.0 <= out["accuracy"] <= 1.0
    assert set(out["by_level"]) == {"1", "2", "3", "4", "5"}
    assert out["params"] > 0 and out["bytes"] > 0 and out["tokens_per_s"] > 0


def _copy(src, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("args,needle", [
    (["--tier", "fog"], "--tier"),
    (["--tier", "edge", "--n", "0"], "--n"),
    (["--tier", "edge", "--seed", "-1"], "--seed"),
    (["--tier", "edge", "--split", "dev"], "--split"),
])
def test_bad_flags(tiny_family, args, needle):
    _one_line_error(run_cli("models", "eval", "--models", str(tiny_family), *args), needle)


def test_wrong_sha256_is_refused(tiny_family, tmp_path):
    m = _copy(tiny_family, tmp_path)
    path = m / "edge" / "model.int8.onnx"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    _one_line_error(run_cli("models", "eval", "--tier", "edge", "--models", str(m)), "model.int8.onnx", "sha256")


def test_a_changed_generation_config_is_refused(tiny_family, tmp_path):
    """generation_config.json decides which tokens end an answer (its eos_token_id): listed with its sha256 as the
    weights are, so a changed one is refused as a changed weight is."""
    m = _copy(tiny_family, tmp_path)
    path = m / "cloud" / "generation_config.json"
    path.write_text(path.read_text().replace('"do_sample"', '"eos_token_id_extra": 7, "do_sample"'))
    _one_line_error(run_cli("models", "eval", "--tier", "cloud", "--models", str(m)), "generation_config.json",
                    "sha256")


def test_missing_artifact(tiny_family, tmp_path):
    m = _copy(tiny_family, tmp_path)
    (m / "device" / "model.tflite").unlink()
    _one_line_error(run_cli("models", "eval", "--tier", "device", "--models", str(m)), "model.tflite", "missing")
    _one_line_error(run_cli("models", "eval", "--tier", "cloud", "--models", str(tmp_path / "nowhere")),
                    "manifest.json")


def test_corrupt_artifact_with_matching_manifest(tiny_family, tmp_path):
    """A file that is broken yet listed with its own sha256: the runtime's error, still one line."""
    m = _copy(tiny_family, tmp_path)
    path = m / "device" / "model.tflite"
    path.write_bytes(b"not a flatbuffer")
    manifest = json.loads((m / "manifest.json").read_text())
    manifest["artifacts"]["device"]["weights"]["sha256"] = sha256_of(path)
    (m / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(run_cli("models", "eval", "--tier", "device", "--models", str(m)), "model.tflite")


def test_tokenizer_that_does_not_match_the_model(tiny_family, tmp_path):
    from tierline_shared.models.tokenizer import TextTokenizer, build_tokenizer

    m = _copy(tiny_family, tmp_path)
    TextTokenizer(build_tokenizer("0123456789+-=")).save(m / "tokenizer.json")
    manifest = json.loads((m / "manifest.json").read_text())
    manifest["artifacts"]["tokenizer"]["sha256"] = sha256_of(m / "tokenizer.json")
    (m / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="vocabulary"):
        load_engine(m, "cloud")
    _one_line_error(run_cli("models", "eval", "--tier", "edge", "--models", str(m)), "vocabulary")


def test_bench_json_is_complete(tiny_family):
    proc = run_cli("models", "bench", "--models", str(tiny_family), "--rounds", "1", "--prompts", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["tiers"]) == {"cloud", "edge", "device"}
    for tier in out["tiers"].values():
        for batch in ("batch1", "batch8"):
            assert tier[batch]["tokens_per_s"] > 0 and tier[batch]["first_token_ms"] > 0
    assert out["edge_over_cloud_batch1"] > 0


def test_router_scorer_is_built_for_these_models(tiny_family):
    from tierline.build.scorer import artifact_digests
    from tierline_router.scorer import Scorer

    scorer_path = tiny_family / load_index(tiny_family)["artifacts"]["router_scorer"]["path"]
    scorer = Scorer.load(scorer_path, expected_artifacts=artifact_digests(tiny_family))
    assert 0.0 <= scorer.complexity("Q:1+2=?\nA:") <= 1.0
    with pytest.raises(ValueError, match="edge"):
        Scorer.load(scorer_path, expected_artifacts={**artifact_digests(tiny_family), "edge": "0" * 64})


def test_route_eval_json_and_curve(tiny_family, tmp_path):
    proc = run_cli("route", "eval", "--models", str(tiny_family), "--n", "20", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == 20
    assert set(out["routers"]) == {"tierline", "device_only", "edge_only", "cloud_only", "random", "length", "oracle"}
    for r in out["routers"].values():
        assert abs(sum(r["share"].values()) - 1.0) < 1e-9
    assert (tmp_path / "cost_quality.csv").read_text().startswith("router")
    assert (tmp_path / "cost_quality.png").stat().st_size > 1000


@pytest.mark.parametrize("share", ["0", "1", "1.5", "x"])
def test_route_eval_rejects_a_share_outside_0_1(share):
    _one_line_error(run_cli("route", "eval", "--target-edge-share", share), "--target-edge-share")


def test_route_calibrate_writes_the_thresholds(tiny_family, tmp_path):
    import yaml

    from tierline_infra.supervisor import write_manifest
    from tierline_shared.config.manifest import load_manifest as load_tier_manifest

    class _Nats:  # only its address and credentials go into the manifest
        url, user, password, credentials = "nats://127.0.0.1:4222", "u", "p", None

    path = write_manifest(tmp_path / "m.yaml", tiny_family, _Nats())
    # an operator's notes in the manifest: calibrating rewrites the router's thresholds, not the file
    notes = ["# staging fleet\n", "# the router's front door\n", "  scorer: router/scorer.json  # make models\n",
             "  retries_per_tier: 1  # ask a tier again once\n", "    threads: 1  # one core each\n"]
    text = notes[0] + path.read_text().replace("    threads: 1\n", notes[4], 1)
    section = "router:\n  scorer: router/scorer.json\n"
    path.write_text(text.replace(section, "".join([notes[1], "router:\n", *notes[2:4]])))
    proc = run_cli("route", "calibrate", "--target-edge-share", "0.9", "--manifest", str(path), "--n", "50")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["calib"]["share_below_cloud"] >= 0.9
    after = path.read_text()
    for note in notes:
        assert note in after, (note, after)
    written = yaml.safe_load(path.read_text())["router"]
    router = load_tier_manifest(path).router
    for name, value in out["router"].items():
        assert written[name] == value and getattr(router, name) == value, name
    # route eval reads the same policy from the manifest and reports it
    proc = run_cli("route", "eval", "--models", str(tiny_family), "--manifest", str(path), "--n", "20",
                   "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {k: v for k, v in json.loads(proc.stdout.strip().splitlines()[-1])["policy"].items()
            if k != "manifest"} == out["router"]
    _one_line_error(run_cli("route", "calibrate", "--target-edge-share", "1", "--manifest", str(path)),
                    "--target-edge-share")
    for bad in ("0", "1.2", "x"):
        _one_line_error(run_cli("route", "calibrate", "--target-edge-share", "0.9", "--min-quality", bad,
                                "--manifest", str(path)), "--min-quality")


def test_calibrated_thresholds_are_floats_the_manifest_loader_reads(tmp_path):
    """ruamel.yaml writes 1e-07 where PyYAML (load_manifest) needs a dot in the mantissa (1.0e-07): a small
    calibrated threshold must not turn the manifest's float into a string."""
    import yaml

    from tierline.cli import _update_router

    path = tmp_path / "m.yaml"
    path.write_text("router:\n  confidence_threshold:  # calibrated\n    edge: 0.5\n  retries_per_tier: 1\n")
    _update_router(path, {"device_complexity": 1e-07, "cloud_complexity": 5e-05,
                          "confidence_threshold": {"edge": 1.2e-05, "device": 0.25}})
    router = yaml.safe_load(path.read_text())["router"]
    assert router == {"confidence_threshold": {"edge": 1.2e-05, "device": 0.25}, "retries_per_tier": 1,
                      "device_complexity": 1e-07, "cloud_complexity": 5e-05}, path.read_text()
    assert "# calibrated" in path.read_text()
