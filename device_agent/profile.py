"""Device profiles: the device model measured as a small board would run it, in a process of its own.

`tierline devices bench --profile pi` and `make bench`'s "Pi-class device profile"
section both call `measure_pinned`, which starts `python -m tierline_device_agent.profile`
pinned to the profile's cores (`os.sched_setaffinity`, before anything is loaded).
That process loads the device model as the agent does (`tierline_device_agent.engine.load_engine(models_dir,
threads=...)`, sha256-checked), sends `warmup` requests that are not
counted, then the same `prompts` one request at a time, `repeats` times, and
prints one JSON line. Its peak RSS (VmHWM) is the device model's own process:
runtime, tokenizer and model, not the caller's (nor gRPC or NATS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    cores: int  # CPU cores the measuring process may run on
    threads: int  # LiteRT interpreter threads


PROFILES = {"pi": Profile(cores=1, threads=1)}  # a Raspberry Pi-class board: what one core does
MAX_TOKENS = 48  # completion tokens per request at most
PROMPT_SEED = 12345  # test-split prompts, the same for every run
WARMUP_SEED = PROMPT_SEED + 1000  # warm-up prompts, never measured
MEASURE_TIMEOUT_S = 600.0  # one pinned measuring process, at most


def proc_status_mib(key: str, pid: int | str = "self") -> float | None:
    """One memory line of /proc/<pid>/status in MiB (VmRSS: now, VmHWM: peak); None where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (as numpy's default), without importing numpy here."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def pin(cores: int) -> list[int]:
    """Restrict this process to its first `cores` allowed CPUs (no-op where the OS has no affinity call)."""
    from tierline_shared.runtime.affinity import allowed, supported
    from tierline_shared.runtime.affinity import pin as pin_cpus

    if not supported():
        return []
    chosen = sorted(allowed())[:cores]
    pin_cpus(chosen)
    return chosen


def measure(models_dir: Path, profile: str = "pi", prompts: int = 16, warmup: int = 2, repeats: int = 1,
            max_tokens: int = MAX_TOKENS) -> dict:
    """Pin this process, load the device model, decode; medians over repeats. Run it in a process of its own."""
    from tierline_device_agent.engine import load_engine
    from tierline_shared.runtime.engine import GenerationParams
    from tierline_shared.tasks.problems import generate

    p = PROFILES[profile]
    cpus = pin(p.cores)
    t0 = time.perf_counter()
    engine = load_engine(models_dir, threads=p.threads)
    load_s = time.perf_counter() - t0
    params = GenerationParams(max_tokens=max_tokens)
    for q in generate("test", warmup, seed=WARMUP_SEED):
        engine.generate(q.prompt, params)
    work = [q.prompt for q in generate("test", prompts, seed=PROMPT_SEED)]
    runs = []
    for _ in range(repeats):
        results, t0 = [], time.perf_counter()
        for prompt in work:  # one request at a time: an app on the board asking its agent
            results.append(engine.generate(prompt, params))
        wall = time.perf_counter() - t0
        after_first = [(r.completion_tokens - 1, r.total_s - r.first_token_s) for r in results
                       if r.completion_tokens > 1]
        first = [r.first_token_s * 1000 for r in results]
        runs.append({
            # tokens after the first over the time after the first token: decoding alone
            "decode_tokens_per_s": sum(n for n, _ in after_first) / max(sum(s for _, s in after_first), 1e-9),
            "tokens_per_s": sum(r.completion_tokens for r in results) / wall,  # prefill included
            "first_token_ms_p50": _percentile(first, 50), "first_token_ms_p95": _percentile(first, 95),
            "completion_tokens": sum(r.completion_tokens for r in results)})

    def med(key: str, digits: int) -> float:
        return round(statistics.median(r[key] for r in runs), digits)

    return {"profile": profile, **asdict(p), "cpus": cpus, "prompts": prompts, "warmup": warmup,
            "repeats": repeats, "max_tokens": max_tokens, "params": engine.info.params, "bytes": engine.info.bytes,
            "model_version": engine.info.version, "load_s": round(load_s, 3),
            "decode_tokens_per_s": med("decode_tokens_per_s", 1), "tokens_per_s": med("tokens_per_s", 1),
            "first_token_ms_p50": med("first_token_ms_p50", 3), "first_token_ms_p95": med("first_token_ms_p95", 3),
            "completion_tokens": med("completion_tokens", 1),
            "decode_tokens_per_s_runs": [round(r["decode_tokens_per_s"], 1) for r in runs],
            "rss_mib": proc_status_mib("VmRSS"), "peak_rss_mib": proc_status_mib("VmHWM")}


def measure_pinned(models_dir: Path, profile: str = "pi", prompts: int = 16, warmup: int = 2, repeats: int = 1,
                   max_tokens: int = MAX_TOKENS, timeout_s: float = MEASURE_TIMEOUT_S) -> dict:
    """`measure` in a fresh `python -m tierline_device_agent.profile` process, so pinning and RSS are its own.

    Raises RuntimeError with the child's last error line when it fails (a missing or corrupt model).
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; one of {sorted(PROFILES)}")
    cmd = [sys.executable, "-m", "tierline_device_agent.profile", "--models", str(models_dir), "--profile", profile,
           "--prompts", str(prompts), "--warmup", str(warmup), "--repeats", str(repeats),
           "--max-tokens", str(max_tokens)]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"device profile {profile!r}: {lines[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tierline_device_agent.profile",
                                 description="the device model on a device profile's cores and threads (one JSON line)")
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="pi")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    a = ap.parse_args(argv)
    for flag, value, least in (("--prompts", a.prompts, 1), ("--warmup", a.warmup, 0), ("--repeats", a.repeats, 1),
                               ("--max-tokens", a.max_tokens, 1)):
        if value < least:
            ap.error(f"{flag} must be >= {least}, got {value}")
    from tierline_shared.models.artifacts import ArtifactError

    try:
        result = measure(a.models, a.profile, a.prompts, a.warmup, a.repeats, a.max_tokens)
    except ArtifactError as exc:
        print(f"tierline_device_agent.profile: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
