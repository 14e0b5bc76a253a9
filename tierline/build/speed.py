"""`tierline models bench`: decode speed and first-token latency of every tier, one run.

Same prompts, same thread count, tiers interleaved round by round so that machine
drift affects them alike; medians over the rounds are reported.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from tierline.build.engines import load_engine
from tierline_shared.runtime.engine import Engine, GenerationParams
from tierline_shared.tasks.problems import generate
from tierline_shared.wire import TIERS

BENCH_MAX_TOKENS = 48  # completion tokens per request
WARMUP_ROUNDS = 1


def _run(engine: Engine, prompts: list[str], batch: int) -> tuple[float, float]:
    """(completion tokens per second, median first-token seconds) over the prompts."""
    tokens, first, t0 = 0, [], time.perf_counter()
    params = GenerationParams(max_tokens=BENCH_MAX_TOKENS)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        results = engine.generate_batch(chunk, [params] * len(chunk))
        tokens += sum(r.completion_tokens for r in results)
        first.append(results[0].first_token_s)
    return tokens / (time.perf_counter() - t0), statistics.median(first)


def bench(models_dir: Path, rounds: int = 3, n_prompts: int = 16, threads: int = 2) -> dict:
    engines = {tier: load_engine(models_dir, tier, threads=threads) for tier in TIERS}
    prompts = [p.prompt for p in generate("test", n_prompts, seed=12345)]
    samples: dict[str, dict[str, list[float]]] = {t: {} for t in TIERS}
    for r in range(WARMUP_ROUNDS + rounds):
        for batch in (1, 8):
            for tier, engine in engines.items():
                tps, ftl = _run(engine, prompts, batch)
                if r >= WARMUP_ROUNDS:
                    samples[tier].setdefault(f"b{batch}_tps", []).append(tps)
                    samples[tier].setdefault(f"b{batch}_ftl", []).append(ftl)
    out: dict = {"threads": threads, "rounds": rounds, "prompts": n_prompts, "max_tokens": BENCH_MAX_TOKENS,
                 "tiers": {}}
    for tier, s in samples.items():
        e = engines[tier]
        out["tiers"][tier] = {
            "params": e.info.params, "bytes": e.info.bytes,
            "batch1": {"tokens_per_s": round(statistics.median(s["b1_tps"]), 1),
                       "first_token_ms": round(1000 * statistics.median(s["b1_ftl"]), 2)},
            "batch8": {"tokens_per_s": round(statistics.median(s["b8_tps"]), 1),
                       "first_token_ms": round(1000 * statistics.median(s["b8_ftl"]), 2)},
        }
    t = out["tiers"]
    out["edge_over_cloud_batch1"] = round(t["edge"]["batch1"]["tokens_per_s"] / t["cloud"]["batch1"]["tokens_per_s"], 2)
    out["edge_over_cloud_batch8"] = round(t["edge"]["batch8"]["tokens_per_s"] / t["cloud"]["batch8"]["tokens_per_s"], 2)
    return out


def render(result: dict) -> str:
    rows = ["| tier | params | bytes | b1 tokens/s | b1 first token (ms) | b8 tokens/s | b8 first token (ms) |",
            "|---|---|---|---|---|---|---|"]
    for tier, r in result["tiers"].items():
        b1, b8 = r["batch1"], r["batch8"]
        rows.append(f"| {tier} | {r['params']:,} | {r['bytes']:,} | {b1['tokens_per_s']} | {b1['first_token_ms']} | "
                    f"{b8['tokens_per_s']} | {b8['first_token_ms']} |")
    rows.append("")
    rows.append(f"Edge over cloud, decode tokens/s: batch 1 x{result['edge_over_cloud_batch1']}, "
                f"batch 8 x{result['edge_over_cloud_batch8']} ({result['threads']} threads, "
                f"{result['prompts']} prompts x {result['max_tokens']} tokens, median of {result['rounds']} rounds).")
    return "\n".join(rows) + "\n"
