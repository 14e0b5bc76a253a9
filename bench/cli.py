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
    return {("bench", None): cmd_bench}


def cmd_bench(args) -> int:
    from tierline_bench.harness import run_bench
    from tierline_shared.models.artifacts import load_index

    load_index(args.models)  # a missing or unreadable family: one line, exit 2, before anything starts
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: not a directory")
    results = run_bench(args.models, args.out, quick=args.quick, log=lambda m: print(m, file=sys.stderr, flush=True))
    meta = results["meta"]
    print(json.dumps({"markdown": str(args.out / "BENCHMARKS.md"), "results": str(args.out / "bench/results.json"),
                      "total_seconds": meta["total_seconds"], "quick": meta["quick"]}))
    return 0
