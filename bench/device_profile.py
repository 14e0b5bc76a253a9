"""Section 8 of `make bench`: the device model on a Pi-class profile (one core, one thread).

Measured by device_agent/profile.py, the code `tierline devices bench --profile pi`
runs: a fresh process pinned to one core loads the LiteRT model as the device agent
does, with one interpreter thread, and answers the bench's requests one at a time.
It runs alone (phase D, nothing else of the platform up), so the figures are those of
the model on one core, and the peak RSS is that process's VmHWM.
"""

from __future__ import annotations

from pathlib import Path

from tierline_bench.scenarios import BenchConfig, not_measured, num
from tierline_device_agent.profile import PROFILES, measure_pinned

PROFILE = "pi"
METRICS = ("decode_tokens_per_s", "tokens_per_s", "first_token_ms_p50", "first_token_ms_p95", "peak_rss_mib",
           "load_s")


def pi_profile(models_dir: Path, cfg: BenchConfig) -> dict:
    """The section: decode tokens/s, first-token latency p50/p95 and peak RSS of the device model on one core."""
    p = PROFILES[PROFILE]
    try:
        r = measure_pinned(models_dir, PROFILE, prompts=cfg.requests, warmup=cfg.warmup, repeats=cfg.repeats,
                           max_tokens=cfg.max_tokens)
    except (RuntimeError, OSError, ValueError) as exc:  # the section says why instead of a number
        reason = f"the pinned process failed: {exc}"
        r = None
        metrics = {k: not_measured(reason) for k in METRICS}
    else:
        metrics = {k: num(r[k], 3 if k.startswith("first_token") or k == "load_s" else 1) for k in METRICS}
        metrics["decode_tokens_per_s_runs"] = r["decode_tokens_per_s_runs"]
        metrics["model"] = {"params": r["params"], "bytes": r["bytes"]}
    return {
        "title": "Pi-class device profile",
        "method": {"load_generator": "sequential (device_agent/profile.py): one request at a time, the next when the "
                                     "last is answered, on the bare LiteRT engine in a process of its own",
                   "concurrency": 1, "requests": cfg.requests, "warmup": cfg.warmup, "repeats": cfg.repeats,
                   "statistic": "median over repeats of each repeat's value",
                   "cores": p.cores, "threads": p.threads, "cpus_pinned": r["cpus"] if r else [],
                   "max_tokens": cfg.max_tokens, "target": "the device model, loaded as the device agent loads it"},
        "metrics": metrics,
        "article": {"profile": "Raspberry Pi-class board: one core (issue 6 asks for tokens/s, first-token latency "
                               "and RSS)"},
        "notes": ["One core of this machine's x86 CPU stands in for a Pi-class board: the process is pinned with "
                  "sched_setaffinity and LiteRT runs one thread. An ARM Cortex-A core is slower; read the figures "
                  "as the model's cost per core, not as a Pi's speed.",
                  "Decode tokens/s counts the tokens after the first over the time after the first token (the "
                  "KV-cached decode loop); tokens/s counts every completion token over the wall time, prefill "
                  "included.",
                  "Peak RSS is VmHWM of the pinned process (Python, numpy, LiteRT, tokenizer and model; no gRPC or "
                  "NATS), read after the runs; the device agent's own process adds its servers to this.",
                  "Same measurement, by hand: `tierline devices bench --profile pi`."],
    }
