"""The `tierline` command.

Errors a user can cause (a bad flag, a missing or corrupt artifact) print one line
and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2
DEFAULT_MODELS = Path("models")


class UsageError(Exception):
    """A user mistake: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UsageError(message)


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target-edge-share must be a number, got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"--target-edge-share must be in (0, 1), got {v}")
    return v


def _positive(flag: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {v}")
        return v
    return parse


def _non_negative(flag: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 0, got {v}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    from shared.artifacts import TIERS
    from shared.problems import SPLITS

    p = _Parser(prog="tierline", description="Serve one model family across cloud, edge and device tiers.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    models = sub.add_parser("models", help="build, evaluate and benchmark the model family")
    msub = models.add_subparsers(dest="action", required=True, parser_class=_Parser)
    b = msub.add_parser("build", help="build a model family from scratch")
    b.add_argument("--config", default="default", choices=("tiny", "default"))
    b.add_argument("--out", type=Path, default=None, help="output directory (default: models/ or runs/tiny)")
    b.add_argument("--seed", type=_non_negative("--seed"), default=0)

    e = msub.add_parser("eval", help="exact-match accuracy of one tier")
    e.add_argument("--tier", required=True, choices=TIERS)
    e.add_argument("--n", type=_positive("--n"), default=500)
    e.add_argument("--seed", type=_non_negative("--seed"), default=0)
    e.add_argument("--split", default="test", choices=SPLITS)
    e.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    e.add_argument("--threads", type=_positive("--threads"), default=2)
    e.add_argument("--json", action="store_true", help="one JSON object on stdout")

    be = msub.add_parser("bench", help="decode speed and first-token latency of every tier")
    be.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    be.add_argument("--rounds", type=_positive("--rounds"), default=3)
    be.add_argument("--prompts", type=_positive("--prompts"), default=16)
    be.add_argument("--threads", type=_positive("--threads"), default=2)
    be.add_argument("--json", action="store_true", help="one JSON object on stdout")
    be.add_argument("--write", type=Path, default=None, help="also write the table into this Markdown file")

    route = sub.add_parser("route", help="the router's learned scorer")
    rsub = route.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ts = rsub.add_parser("train-scorer", help="label the calib split with the lower tiers and fit the scorer")
    ts.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    ts.add_argument("--n", type=_positive("--n"), default=1000)
    ts.add_argument("--seed", type=_non_negative("--seed"), default=0)

    re_ = rsub.add_parser("eval", help="every router (tierline and the baselines) on the test split")
    re_.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    re_.add_argument("--n", type=_positive("--n"), default=1000)
    re_.add_argument("--seed", type=_non_negative("--seed"), default=0)
    re_.add_argument("--target-edge-share", type=_share, default=0.9)
    re_.add_argument("--out", type=Path, default=Path("docs/routing"), help="where the curve PNG and CSV go")
    re_.add_argument("--json", action="store_true", help="one JSON object on stdout")

    rc = rsub.add_parser("calibrate", help="set router.cloud_complexity so a share of traffic stays below the cloud")
    rc.add_argument("--target-edge-share", type=_share, required=True)
    rc.add_argument("--manifest", type=Path, default=Path("infra/manifests/local.yaml"))
    rc.add_argument("--n", type=_positive("--n"), default=1000, help="calibration prompts")

    d = sub.add_parser("demo", help="start the platform, send a mixed workload through the router, stop")
    d.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    d.add_argument("--n", type=_positive("--n"), default=300, help="requests to send")
    d.add_argument("--concurrency", type=_positive("--concurrency"), default=16)

    u = sub.add_parser("up", help="start the platform and keep it running (Ctrl-C or `make down` stops it)")
    u.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    u.add_argument("--pidfile", type=Path, default=Path("runs/up.pid"))
    return p


def _cmd_build(args) -> int:
    from tierline.modelling.pipeline import build, family

    out = args.out or (DEFAULT_MODELS if args.config == "default" else Path("runs/tiny"))
    report = build(family(args.config, seed=args.seed), out)
    print(json.dumps({k: report[k] for k in ("family", "build_seconds", "params", "int8_kv_cache_agreement")}))
    return 0


def _cmd_eval(args) -> int:
    from shared.artifacts import load_engine
    from shared.problems import generate
    from tierline.modelling.evaluate import evaluate

    engine = load_engine(args.models, args.tier, threads=args.threads)
    r = evaluate(engine, generate(args.split, args.n, seed=args.seed))
    r.pop("correct")
    out = {"tier": args.tier, "split": args.split, "seed": args.seed, **r,
           "params": engine.info.params, "bytes": engine.info.bytes}
    if args.json:
        print(json.dumps(out))
    else:
        levels = " ".join(f"L{k}={v:.3f}" for k, v in out["by_level"].items())
        print(f"{args.tier}: accuracy {out['accuracy']:.3f} ({levels}), n={out['n']}, "
              f"{out['tokens_per_s']} tokens/s, {out['params']:,} params, {out['bytes']:,} bytes")
    return 0


def _cmd_bench(args) -> int:
    from tierline.modelling.bench import bench, render

    result = bench(args.models, rounds=args.rounds, n_prompts=args.prompts, threads=args.threads)
    if args.write:
        args.write.write_text("# Tier speed (`tierline models bench`)\n\n" + render(result))
    print(json.dumps(result) if args.json else render(result))
    return 0


def _cmd_train_scorer(args) -> int:
    from router.build import train_scorer

    print(json.dumps(train_scorer(args.models, n=args.n, seed=args.seed)))
    return 0


def _cmd_route_eval(args) -> int:
    from router.build import SCORER_PATH
    from router.evaluation import evaluate_routers, run_tiers, write_curve
    from router.scorer import Scorer, artifact_digests
    from shared.problems import generate
    from tierline.demo import DEFAULT_COSTS

    scorer = Scorer.load(args.models / SCORER_PATH, expected_artifacts=artifact_digests(args.models))
    problems = generate("test", args.n, seed=args.seed)
    outcomes = run_tiers(args.models, problems, threads=2)
    curves: dict = {}
    calib = [p.prompt for p in generate("calib", 1000, seed=args.seed)]
    result = evaluate_routers(outcomes, problems, scorer, DEFAULT_COSTS, calib_prompts=calib,
                              target_edge_share=args.target_edge_share, curves_out=curves)
    args.out.mkdir(parents=True, exist_ok=True)
    write_curve(curves, args.out / "cost_quality.png", args.out / "cost_quality.csv")
    if args.json:
        print(json.dumps(result))
    else:
        for name, r in result["routers"].items():
            extra = f", APGR {r['apgr']:.3f}" if r.get("apgr") is not None else ""
            print(f"{name:12s} accuracy {r['accuracy']:.3f}  cloud share {r['share']['cloud']:.2f}  "
                  f"cost {r['cost_vs_cloud']:.2f} of all-cloud{extra}")
    return 0


def _cmd_route_calibrate(args) -> int:
    """RouteLLM-style: the threshold is the target-share quantile of the scores on the calib split."""
    import yaml

    from router.__main__ import load_scorer
    from router.evaluation import calibrate
    from shared.manifest import load_manifest
    from shared.problems import generate

    manifest = load_manifest(args.manifest)
    scorer = load_scorer(manifest)
    if scorer is None:
        raise UsageError(f"{args.manifest}: router.scorer is not set; nothing to calibrate")
    scores = [scorer.complexity(p.prompt) for p in generate("calib", args.n, seed=0)]
    threshold = round(float(calibrate(scores, args.target_edge_share)), 6)
    raw = yaml.safe_load(args.manifest.read_text())
    raw.setdefault("router", {})["cloud_complexity"] = threshold
    args.manifest.write_text(yaml.safe_dump(raw, sort_keys=False))
    print(json.dumps({"manifest": str(args.manifest), "router.cloud_complexity": threshold,
                      "target_edge_share": args.target_edge_share, "calib_prompts": args.n}))
    return 0


def _cmd_demo(args) -> int:
    from tierline.demo import demo

    return demo(args.models, n=args.n, concurrency=args.concurrency)


def _cmd_up(args) -> int:
    from tierline.demo import up

    return up(args.models, args.pidfile)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handlers = {("models", "build"): _cmd_build, ("models", "eval"): _cmd_eval, ("models", "bench"): _cmd_bench,
                    ("route", "train-scorer"): _cmd_train_scorer, ("route", "eval"): _cmd_route_eval,
                    ("route", "calibrate"): _cmd_route_calibrate,
                    ("demo", None): _cmd_demo, ("up", None): _cmd_up}
        handler = handlers[(args.command, getattr(args, "action", None))]
        return handler(args)
    except UsageError as exc:
        print(f"tierline: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as exc:
        # ArtifactError is a ValueError; messages name the file or the flag
        print(f"tierline: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
