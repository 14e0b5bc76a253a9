"""`tierline bench --quick`: the report is complete and well-formed. Never a speed: only its shape."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from tests.conftest import processes_with, run_cli
from tierline_bench.load import LoadRun, Outcome
from tierline_bench.peer import available
from tierline_bench.scenarios import IDLE_MS, bare_occupancy
from tierline_bench.transformers_peer import available as transformers_available

SECTIONS = ("edge_vs_cloud", "tiered_vs_cloud", "batching", "cache", "platform_overhead", "peer_litserve",
            "router_and_nats", "device_profile", "peer_transformers", "batch_api")
METHOD_KEYS = ("load_generator", "concurrency", "requests", "warmup", "repeats")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _leaves(node, path: str = ""):
    """(dotted path, value) of every metric: a number, or a {"not_measured": reason} entry."""
    if isinstance(node, dict) and "not_measured" in node:
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, node


def _refuse_nan(name: str):
    raise ValueError(f"results.json contains {name}")


@pytest.fixture(scope="module")
def report(tiny_family, tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("bench")
    proc = run_cli("bench", "--quick", "--models", str(tiny_family), "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    results = json.loads((out / "bench" / "results.json").read_text(), parse_constant=_refuse_nan)
    return out, summary, results


def test_every_section_is_there_and_says_how_it_was_measured(report):
    out, summary, results = report
    assert summary["quick"] is True and Path(summary["results"]) == out / "bench" / "results.json"
    assert tuple(results["sections"]) == SECTIONS
    for name, section in results["sections"].items():
        assert section["title"], name
        missing = [k for k in METHOD_KEYS if k not in section["method"]]
        assert not missing, (name, missing)
        assert isinstance(section["method"]["repeats"], int) and section["method"]["repeats"] >= 1
    meta = results["meta"]
    assert meta["quick"] is True and meta["family"] == "tiny" and meta["machine"]["cpus"] >= 1
    assert set(meta["phase_seconds"]) == {"A", "B", "C", "D", "E"}


def test_every_metric_is_a_number_or_an_explicit_reason(report):
    _, _, results = report
    not_measured = []
    for name, section in results["sections"].items():
        leaves = list(_leaves(section["metrics"]))
        assert leaves, name
        for path, value in leaves:
            if isinstance(value, dict):
                assert set(value) == {"not_measured"} and value["not_measured"].strip(), (name, path, value)
                not_measured.append(f"{name}.{path}")
            else:
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, path, value)
                assert math.isfinite(value), (name, path, value)
    # only what does not exist is left unmeasured: a peer whose server is missing
    allowed = set()
    if available() is not None:
        allowed |= {p for p in not_measured if p.startswith("peer_litserve.")}
    if transformers_available(results["meta"]["models_dir"]) is not None:
        allowed |= {p for p in not_measured if p.startswith("peer_transformers.")}
    # a tier no escalation reached in the run verified no draft (the quick run's few requests may escalate none)
    drafts = results["sections"]["tiered_vs_cloud"]["metrics"]["tiered"]["drafts"]
    allowed |= {f"tiered_vs_cloud.tiered.drafts.{t}.acceptance" for t, d in drafts.items() if d["draft_tokens"] == 0}
    assert set(not_measured) == allowed
    # multi-turn prefix KV reuse, in counts (not speeds): fewer prefill tokens computed, the same answers
    cache = results["sections"]["cache"]["metrics"]
    for key, concurrency in (("multi_turn", 1), ("multi_turn_concurrent", 4)):  # one dialogue at a time, then 4
        turns = cache[key]
        assert turns["concurrency"] == concurrency and turns["cached_tokens_disagree_with_metrics"] == 0
        assert turns["identical_answer_share"] == 1.0 and turns["errors"] == 0
        assert turns["prefill_tokens_computed_on"] < turns["prefill_tokens_computed_off"]
    idle = cache["prefill_after_idle"]  # a prefill after each idle length, beside one back to back
    assert idle["prompts"] > 0 and set(idle["after_idle"]) == {str(ms) for ms in IDLE_MS}


def test_the_markdown_has_every_section_and_its_plots(report):
    out, _, results = report
    text = (out / "BENCHMARKS.md").read_text()
    for i, section in enumerate(results["sections"].values(), start=1):
        assert f"## {i}. {section['title']}" in text
    assert text.count("*How measured:*") == len(SECTIONS)
    assert "prefill tokens computed, on / off" in text  # the multi-turn rows: prefix KV reuse on vs off
    edge_over_cloud = results["sections"]["edge_vs_cloud"]["metrics"]["ratio"]["qps_edge_over_cloud"]
    assert f"served {edge_over_cloud}x the cloud tier alone (section 1)" in text  # the tiered section's scale
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    images = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(images) >= 4
    for rel in images:
        assert (out / rel).read_bytes()[:8] == PNG_MAGIC, rel


def test_the_pi_class_device_profile_is_measured_on_one_core(report, tiny_family):
    out, _, results = report
    section = results["sections"]["device_profile"]
    how, m = section["method"], section["metrics"]
    assert how["cores"] == 1 and how["threads"] == 1 and how["concurrency"] == 1
    assert len(how["cpus_pinned"]) == 1  # the measuring process really was pinned to one core
    assert how["requests"] == results["meta"]["config"]["requests"]
    for key in ("decode_tokens_per_s", "tokens_per_s", "first_token_ms_p50", "first_token_ms_p95", "peak_rss_mib"):
        assert isinstance(m[key], float) and m[key] > 0, key
    assert m["first_token_ms_p95"] >= m["first_token_ms_p50"]
    assert len(m["decode_tokens_per_s_runs"]) == how["repeats"]
    assert m["model"]["bytes"] == (tiny_family / "device" / "model.tflite").stat().st_size
    text = (out / "BENCHMARKS.md").read_text()
    number = SECTIONS.index("device_profile") + 1
    body = text.split(f"## {number}. Pi-class device profile", 1)[1].split("\n## ", 1)[0]
    for row in ("decode tokens/s", "first token p50", "first token p95", "peak RSS"):
        assert row in body, row


def test_the_batch_api_section_runs_every_line(report):
    """Counts, not speeds: every line of the batch was answered, and the section says how it compares."""
    _, _, results = report
    m = results["sections"]["batch_api"]["metrics"]
    assert m["lines"] == results["meta"]["config"]["batch_lines"] == m["completed"] + m["failed"]
    assert m["failed"] == 0 and m["lines_per_s"] > 0 and m["article_lines_per_day"] == 12_000_000
    assert abs(sum(m["share"].values()) - 1) < 1e-3
    assert m["interactive"]["alone"]["errors"] == m["interactive"]["beside_batch"]["errors"] == 0


def test_the_bare_engine_is_given_only_batches_its_load_can_form(report):
    """The limit the edge is held to: the bare engine's best batch among those the row's concurrency can form
    (16 requests in flight never make a batch of 32), every size tried still reported."""
    _, _, results = report
    section = results["sections"]["platform_overhead"]
    m, concurrency = section["metrics"], section["method"]["concurrency"]
    tried = {int(b): q for b, q in m["bare_qps_by_batch"].items()}
    assert any(b > concurrency for b in tried)  # tried, and left out
    allowed = {b: q for b, q in tried.items() if b <= concurrency}
    assert m["bare_batch"] == max(allowed, key=allowed.get)


def test_the_serving_rows_say_how_full_the_engines_steps_were(report):
    """Sequences per step, read from the edge's own histogram over each run (the bare engine's from its answers):
    at least one and never more than the requests in flight."""
    _, _, results = report
    section = results["sections"]["platform_overhead"]
    for k in ("bare", "edge_node", "platform"):
        seqs = section["metrics"][k]["seqs_per_step"]
        assert 1 <= seqs <= section["method"]["concurrency"], (k, seqs)


def test_the_bare_engines_rows_per_step_count_each_batch_until_its_longest_answer():
    """Two batches of two: answers of 4 and 2 tokens decode 4 steps holding 6 rows in all; 3 and 3, 3 steps and
    6 rows: 12 rows over 7 steps."""
    run = LoadRun([Outcome(0.1, completion_tokens=n) for n in (4, 2, 3, 3)], wall_s=1.0, concurrency=2)
    assert bare_occupancy(run) == pytest.approx(12 / 7)


def test_no_peer_process_is_left_behind(report):
    leftover = processes_with(lambda args: any(b"tierline_bench.peer" in a for a in args)
                              or (any(a.endswith(b"/transformers") for a in args) and b"serve" in args))
    assert not leftover


def test_transformers_serve_gives_the_cloud_tiers_greedy_answers(report):
    """The cloud's peer serves the same checkpoint: its greedy answers equal the cloud tier's, prompt by prompt,
    with and without its continuous batching."""
    _, _, results = report
    m = results["sections"]["peer_transformers"]["metrics"]
    for peer in ("transformers_serve", "transformers_serve_cb"):
        assert m[peer]["compared"] == results["meta"]["config"]["requests"] and m[peer]["errors"] == 0, peer
        assert m[peer]["same_greedy_text"] == 1.0, peer


def test_a_missing_model_family_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("bench", "--quick", "--models", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "manifest.json" in proc.stderr


def test_a_short_soak_reports_every_processs_memory(tiny_family):
    """`tierline bench --soak`: the platform under load, each process's RSS after the warm-up and at the end."""
    from tierline_bench.reliability import soak

    result = soak(tiny_family, minutes=0.1, warmup_minutes=0.1, concurrency=2, log=lambda _: None)
    assert result["requests"] > 0 and result["errors"] == 0
    assert set(result["processes"]) == {"device-0", "edge-0", "cloud-0", "router"}
    for name, p in result["processes"].items():
        assert 10 < p["rss_after_warmup_mib"] < 4096 and 10 < p["rss_end_mib"] < 4096, (name, p)
        assert p["growth_mib"] == pytest.approx(p["rss_end_mib"] - p["rss_after_warmup_mib"], abs=0.11)
    assert len(result["samples"]) >= 2


def test_the_serving_rows_say_where_the_engines_ran(report):
    """Phase B binds the edge's engine core and LitServe's worker to one CPU (the last), the rest elsewhere; on
    a one-CPU machine nothing is bound. The report says which."""
    _, _, results = report
    have = sorted(os.sched_getaffinity(0))
    expected = have[-1:] if len(have) > 1 else []
    for name in ("platform_overhead", "batching", "cache"):
        assert results["sections"][name]["method"]["engine_cpus"] == expected, name


def test_the_tiered_section_says_where_the_cpu_went(report):
    """CPU per answered request for every process of the stack (a tier's engine core apart) and the load generator,
    for both targets: numbers, never negative; the router works only for the tiered system, the cloud's engine core
    for both."""
    _, _, results = report
    m = results["sections"]["tiered_vs_cloud"]["metrics"]
    tiered, cloud = m["tiered"]["cpu_ms_per_request"], m["cloud_only"]["cpu_ms_per_request"]
    assert tiered.keys() == cloud.keys() >= {"router", "nats-server", "edge-0", "edge-0 core", "cloud-0",
                                             "cloud-0 core", "device-0", "load generator"}, tiered.keys()
    assert all(isinstance(v, (int, float)) and v >= 0 for v in [*tiered.values(), *cloud.values()])
    # /proc counts CPU in clock ticks (10 ms): over the quick run's few requests one tick is a large share, and the
    # idle router's heartbeats in the cloud-only run can take one too, so the comparison allows one tick; and the
    # router's own CPU over those few requests may stay under one tick (a clean clone read 0.0 on a fast machine)
    tick = 1000 / os.sysconf("SC_CLK_TCK") / results["sections"]["tiered_vs_cloud"]["method"]["requests"]
    assert cloud["cloud-0 core"] > 0 and cloud["router"] <= tiered["router"] + tick
    assert m["tiered"]["cores_busy"] > 0 and m["cloud_only"]["cores_busy"] > 0
    # escalations' drafts, counted by the tiers themselves (the quick run may escalate none)
    drafts = m["tiered"]["drafts"]
    assert drafts.keys() == {"edge", "cloud"}
    assert all(d["draft_tokens"] >= d["accepted_tokens"] >= 0 for d in drafts.values()), drafts
