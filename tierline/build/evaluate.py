"""Exact-match evaluation of any engine on the reasoning benchmark: the one loop every offline tool runs
(`tierline models eval`, the build's report, the router scorer's labels, the offline router evaluation)."""

from __future__ import annotations

import time
from typing import Callable

from tierline_shared.runtime.engine import Engine, GenerationParams
from tierline_shared.tasks.problems import LEVELS, Problem, is_correct

EVAL_MAX_TOKENS = 96  # the longest worked answer (level 5 variables) is 94 tokens


def answer(
    engine: Engine,
    prompts: list[str],
    max_tokens: int = EVAL_MAX_TOKENS,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    order: list[int] | None = None,
) -> dict:
    """Each prompt's greedy answer (at most max_tokens tokens): per prompt, in the given order, text,
    confidence (the answer's lowest chosen-token probability) and tokens (prompt + completion); plus
    completion tokens/s over the wall time. `order` batches similar prompts together."""
    order = order if order is not None else sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts, confidence, spent = [""] * len(prompts), [0.0] * len(prompts), [0] * len(prompts)
    tokens, t0 = 0, time.perf_counter()
    step = batch_size if engine.supports_batch_prefill else 1
    for start in range(0, len(order), step):
        idx = order[start:start + step]
        params = [GenerationParams(max_tokens=_budget(engine, prompts[i], max_tokens)) for i in idx]
        for i, r in zip(idx, engine.generate_batch([prompts[i] for i in idx], params)):
            texts[i], confidence[i] = r.text, float(r.confidence)
            spent[i] = r.prompt_tokens + r.completion_tokens
            tokens += r.completion_tokens
        if progress:
            progress(len(idx))
    seconds = time.perf_counter() - t0
    return {"texts": texts, "confidence": confidence, "tokens": spent, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0}


def evaluate(
    engine: Engine,
    problems: list[Problem],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """accuracy, by_level, n, tokens_per_s (completion tokens over wall time), and per problem (in the given
    order): correct, confidence (the answer's lowest chosen-token probability), tokens (prompt + completion)."""
    # batch problems of one level together: similar lengths, little padding
    order = sorted(range(len(problems)), key=lambda i: (problems[i].level, len(problems[i].prompt)))
    r = answer(engine, [p.prompt for p in problems], EVAL_MAX_TOKENS, batch_size, progress, order)
    correct = [is_correct(p, text) for p, text in zip(problems, r["texts"])]
    by_level = {}
    for level in LEVELS:
        hits = [c for p, c in zip(problems, correct) if p.level == level]
        if hits:
            by_level[str(level)] = round(sum(hits) / len(hits), 4)
    return {
        "accuracy": round(sum(correct) / len(problems), 4),
        "by_level": by_level,
        "n": len(problems),
        "tokens_per_s": r["tokens_per_s"],
        "seconds": r["seconds"],
        "correct": correct,
        "confidence": r["confidence"],
        "tokens": r["tokens"],
        "texts": r["texts"],
    }


PER_PROBLEM = ("correct", "confidence", "tokens", "texts")  # the lists in evaluate's result, one entry per problem


def summary(result: dict) -> dict:
    """evaluate's result without its per-problem lists: what reports and the CLI print."""
    return {k: v for k, v in result.items() if k not in PER_PROBLEM}


def _budget(engine: Engine, prompt: str, max_tokens: int = EVAL_MAX_TOKENS) -> int:
    n = len(engine.tokenizer.encode(prompt))
    return max(1, min(max_tokens, engine.info.max_context - n))


def kv_agreement(engine: Engine, problems: list[Problem], progress: Callable[[int], None] | None = None) -> float:
    """Share of problems whose greedy text is identical with and without the KV cache."""
    same = 0
    for p in problems:
        budget = _budget(engine, p.prompt)
        cached = engine.generate(p.prompt, GenerationParams(max_tokens=budget)).text
        same += cached == engine.generate_uncached(p.prompt, max_tokens=budget)
        if progress:
            progress(1)
    return same / len(problems)


def continuations(engine: Engine, prompts: list[str], max_tokens: int = 16,
                  progress: Callable[[int], None] | None = None) -> list[str]:
    """Each prompt's greedy continuation (at most max_tokens tokens), in order."""
    return answer(engine, prompts, max_tokens, progress=progress)["texts"]


def agreement(texts: list[str], reference: list[str]) -> dict:
    """How often `texts` say what `reference` says (greedy continuations of the same prompts): the share
    identical, and the mean share of each reference's characters matched before the first difference."""
    if len(texts) != len(reference) or not texts:
        raise ValueError(f"agreement needs as many texts as references (and some): {len(texts)}, {len(reference)}")
    prefix = []
    for a, b in zip(texts, reference):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / len(b) if b else float(a == b))
    return {"identical": round(sum(a == b for a, b in zip(texts, reference)) / len(texts), 4),
            "prefix_share": round(sum(prefix) / len(prefix), 4), "n": len(texts)}
