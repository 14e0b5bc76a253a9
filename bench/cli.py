"""`tierline bench [--quick] [--models DIR] [--out DIR]`, registered by tierline/cli.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub, parser_class) -> dict:
    """Register `tierline bench` on the CLI's subparsers; returns {(command, action): handler}."""
    b = sub.add_parser("bench", help="the platform measured side by side: writes BENCHMARKS.md and bench/results.json")
    b.add_argument("--quick", action="store_true", help="a few requests, one repeat: checks the report, not speed")
    b.add_argument("--models", type=Path, default=Path("models"))
    b.add_argument("--out", type=Path, default=Path("."),
                   help="directory for BENCHMARKS.md, bench/results.json and bench/plots/ (default: here)")
    b.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                   help="instead: the whole platform under steady load for MINUTES after a 1-minute warm-up; "
                        "prints each process's RSS after the warm-up and at the end (JSON)")
    b.add_argument("--concurrency", type=int, default=4, help="clients of the soak (default 4)")
    b.add_argument("--failover", action="store_true",
                   help="instead: kill one of two edge replicas under load; prints how long the requests in flight "
                        "took (JSON)")
    b.add_argument("--import-scaling", action="store_true",
                   help="instead: import random 10M- and 50M-parameter Llama checkpoints; prints each import's time "
                        "and peak memory (JSON, docs/IMPORT.md)")
    return {("bench", None): cmd_bench}


def cmd_bench(args) -> int:
    from tierline_bench.harness import run_bench
    from tierline_shared.models.artifacts import load_index

    if args.import_scaling:
        from tierline_bench.import_scaling import import_scaling

        print(json.dumps(import_scaling(log=lambda m: print(m, file=sys.stderr, flush=True)), indent=2))
        return 0
    load_index(args.models)  # a missing or unreadable family: one line, exit 2, before anything starts
    if args.failover:
        from tierline_bench.reliability import failover

        print(json.dumps(failover(args.models), indent=2))
        return 0
    if args.soak is not None:
        from tierline_bench.reliability import soak

        if args.soak <= 0 or args.concurrency < 1:
            raise ValueError("--soak must be > 0 minutes and --concurrency >= 1")
        result = soak(args.models, args.soak, concurrency=args.concurrency,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
        return 0
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: not a directory")
    results = run_bench(args.models, args.out, quick=args.quick, log=lambda m: print(m, file=sys.stderr, flush=True))
    meta = results["meta"]
    print(json.dumps({"markdown": str(args.out / "BENCHMARKS.md"), "results": str(args.out / "bench/results.json"),
                      "total_seconds": meta["total_seconds"], "quick": meta["quick"]}))
    return 0
