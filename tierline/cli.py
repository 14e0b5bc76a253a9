"""The `tierline` command.

Errors a user can cause (a bad flag, a missing or corrupt artifact) print one line
and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

EXIT_USAGE = 2
DEFAULT_MODELS = Path("models")
# what each command needs beyond the client (pip install tierline gives infer, stream and status)
EXTRAS = {"models": "build", "route": "build", "bench": "dev", "demo": "platform", "up": "platform",
          "devices": "platform", "keys": "router"}


class UsageError(Exception):
    """A user mistake: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UsageError(message)


def fraction(flag: str, include_one: bool = False):
    """An argparse type: a number in (0, 1), or (0, 1] with include_one; the message names the flag."""
    interval = "(0, 1]" if include_one else "(0, 1)"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not (0.0 < v < 1.0 or (include_one and v == 1.0)):
            raise argparse.ArgumentTypeError(f"{flag} must be in {interval}, got {v}")
        return v

    return parse


def _bounded(flag: str, cast, kind: str, ok, rule: str):
    """An argparse type: `cast(text)` for which `ok(value)` holds; the messages name the flag."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {kind}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{flag} must be {rule}, got {v}")
        return v
    return parse


def positive_int(flag: str):
    return _bounded(flag, int, "an integer", lambda v: v > 0, "positive")


def non_negative_int(flag: str):
    return _bounded(flag, int, "an integer", lambda v: v >= 0, ">= 0")


def positive_float(flag: str):
    return _bounded(flag, float, "a number", lambda v: 0 < v < float("inf"), "positive")


def build_parser() -> argparse.ArgumentParser:
    from tierline_shared.tasks.problems import SPLITS
    from tierline_shared.wire import TIERS

    p = _Parser(prog="tierline", description="Serve one model family across cloud, edge and device tiers.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    models = sub.add_parser("models", help="build, evaluate and benchmark the model family")
    msub = models.add_subparsers(dest="action", required=True, parser_class=_Parser)
    b = msub.add_parser("build", help="build a model family from scratch")
    b.add_argument("--config", default="default", choices=("tiny", "default"))
    b.add_argument("--out", type=Path, default=None, help="output directory (default: models/ or runs/tiny)")
    b.add_argument("--seed", type=non_negative_int("--seed"), default=0)

    im = msub.add_parser("import", help="a local Llama-family checkpoint (Hugging Face format) as all three tiers")
    im.add_argument("src", type=Path, help="the checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    im.add_argument("--out", type=Path, required=True, help="the models directory to write (new or empty)")
    im.add_argument("--device-ratio", type=fraction("--device-ratio"), default=0.35,
                    help="the device model's share of the parameters (structural pruning)")
    im.add_argument("--corpus", type=Path, default=None,
                    help="text (.txt, paragraphs) or .jsonl ('text' or 'prompt'): calibration, and the device "
                         "model's recovery by distillation")
    im.add_argument("--recover-steps", type=non_negative_int("--recover-steps"), default=200,
                    help="distillation steps for the pruned model (with --corpus; 0: none)")
    im.add_argument("--device-context", type=positive_int("--device-context"), default=512,
                    help="positions in the device's fixed KV cache")
    im.add_argument("--name", default=None, help="the model name clients ask for (default: SRC's folder name)")
    im.add_argument("--threads", type=positive_int("--threads"), default=2)

    e = msub.add_parser("eval", help="exact-match accuracy of one tier")
    e.add_argument("--tier", required=True, choices=TIERS)
    e.add_argument("--n", type=positive_int("--n"), default=500)
    e.add_argument("--seed", type=non_negative_int("--seed"), default=0)
    e.add_argument("--split", default="test", choices=SPLITS)
    e.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    e.add_argument("--threads", type=positive_int("--threads"), default=2)
    e.add_argument("--json", action="store_true", help="one JSON object on stdout")

    be = msub.add_parser("bench", help="decode speed and first-token latency of every tier")
    be.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    be.add_argument("--rounds", type=positive_int("--rounds"), default=3)
    be.add_argument("--prompts", type=positive_int("--prompts"), default=16)
    be.add_argument("--threads", type=positive_int("--threads"), default=2)
    be.add_argument("--json", action="store_true", help="one JSON object on stdout")
    be.add_argument("--write", type=Path, default=None, help="also write the table into this Markdown file")

    route = sub.add_parser("route", help="the router's learned scorer")
    rsub = route.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ts = rsub.add_parser("train-scorer", help="label the calib split with the lower tiers and fit the scorer")
    ts.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    ts.add_argument("--n", type=positive_int("--n"), default=1000)
    ts.add_argument("--seed", type=non_negative_int("--seed"), default=0)

    re_ = rsub.add_parser("eval", help="every router (tierline and the baselines) on the test split")
    re_.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    re_.add_argument("--n", type=positive_int("--n"), default=1000)
    re_.add_argument("--seed", type=non_negative_int("--seed"), default=0)
    re_.add_argument("--target-edge-share", type=fraction("--target-edge-share"), default=0.9,
                     help="operating point of the random and length baselines")
    re_.add_argument("--manifest", type=Path, default=Path("infra/manifests/local.yaml"),
                     help="the router policy (thresholds) and tier costs to evaluate")
    re_.add_argument("--out", type=Path, default=None,
                     help="write the curve (PNG, CSV) and the results (JSON, Markdown) into this directory, e.g. "
                          "docs/routing (default: print only, write nothing)")
    re_.add_argument("--json", action="store_true", help="one JSON object on stdout")

    rc = rsub.add_parser("calibrate", help="set the router's thresholds so a share of traffic stays below the cloud")
    rc.add_argument("--target-edge-share", type=fraction("--target-edge-share"), required=True)
    rc.add_argument("--manifest", type=Path, default=Path("infra/manifests/local.yaml"))
    rc.add_argument("--n", type=positive_int("--n"), default=1000, help="calibration prompts")
    rc.add_argument("--min-quality", type=fraction("--min-quality", include_one=True), default=None,
                    help="also keep at least this fraction of the cloud-only accuracy, then minimise cost "
                         "(default: the most accurate thresholds that keep the share)")
    rc.add_argument("--prompts", type=Path, default=None,
                    help="your own prompts (.jsonl, one {\"prompt\": ...} per line), no answers needed: each lower "
                         "tier is labelled by agreement with the cloud, the scorer is trained on them, then the "
                         "thresholds are set (tierline/build/labels.py)")
    rc.add_argument("--extract", default=None, metavar="REGEX",
                    help="with --prompts: compare only what this regex matches in each answer (its first group)")
    rc.add_argument("--max-tokens", type=positive_int("--max-tokens"), default=96,
                    help="with --prompts: tokens each tier generates per prompt")

    cl = rsub.add_parser("compare-labels", help="calibration from agreement labels against calibration from true "
                                                "answers, both measured on the test split (docs/ROUTING.md)")
    cl.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    cl.add_argument("--manifest", type=Path, default=Path("infra/manifests/local.yaml"), help="for the costs")
    cl.add_argument("--n", type=positive_int("--n"), default=1000, help="calib and test problems each")
    cl.add_argument("--target-edge-share", type=fraction("--target-edge-share"), default=0.9)

    d = sub.add_parser("demo", help="start the platform, send a mixed workload through the router, stop")
    d.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    d.add_argument("--n", type=positive_int("--n"), default=300, help="requests to send")
    d.add_argument("--concurrency", type=positive_int("--concurrency"), default=16)

    u = sub.add_parser("up", help="start the platform and keep it running (Ctrl-C or `make down` stops it)")
    u.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    u.add_argument("--pidfile", type=Path, default=Path("runs/up.pid"))
    u.add_argument("--manifest", type=Path, default=None,
                   help="take the ports from this manifest (0 = a free port); default: infra/manifests/local.yaml, "
                        "whose ports the README's examples use")
    u.add_argument("--host", type=Path, default=None, metavar="MANIFEST",
                   help="run this host's share of a deployment as the manifest says: its tiers (not those marked "
                        "elsewhere), its router unless router.enabled is false, on the NATS it names (docs/DEPLOY.md)")
    u.add_argument("--replicas", type=replica_counts, default={}, metavar="TIER=N,...",
                   help="replicas per tier, e.g. edge=2,cloud=2 (the first on the manifest's ports, the others "
                        "on free ports of their own)")

    from tierline.devices import add_parser as add_devices  # the fleet commands live in their own module

    p.handlers = add_devices(sub, _Parser)

    from tierline_bench.cli import add_parser as add_bench  # `tierline bench` (make bench) lives in bench/

    p.handlers.update(add_bench(sub, _Parser))

    from tierline.batch_cli import add_parser as add_batch  # the Batch API over HTTP
    from tierline.client_cli import add_parsers as add_client  # infer, stream, status: through the SDK
    from tierline.creds import add_parser as add_creds  # NATS identities, signing key, TLS
    from tierline.keys import add_parser as add_keys  # API keys
    from tierline.nats_cli import add_parser as add_nats  # nats-server configs: hub cluster, sites

    p.handlers.update(add_client(sub, _Parser))
    p.handlers.update(add_keys(sub, _Parser))
    p.handlers.update(add_batch(sub, _Parser))
    p.handlers.update(add_creds(sub, _Parser))
    p.handlers.update(add_nats(sub, _Parser))
    return p


def _cmd_build(args) -> int:
    from tierline.build.pipeline import build, family

    out = args.out or (DEFAULT_MODELS if args.config == "default" else Path("runs/tiny"))
    report = build(family(args.config, seed=args.seed), out)
    print(json.dumps({k: report[k] for k in ("family", "build_seconds", "params", "int8_kv_cache_agreement")}))
    return 0


def _cmd_import(args) -> int:
    from tierline.build.importer import import_checkpoint

    report = import_checkpoint(args.src, args.out, device_ratio=args.device_ratio, corpus=args.corpus,
                               recover_steps=args.recover_steps, device_context=args.device_context,
                               threads=args.threads, name=args.name)
    print(json.dumps({k: report[k] for k in ("params", "device_ratio", "quality_vs_cloud", "import_seconds")}))
    if not report["recovery"]:
        print(f"tierline: note: the device model was pruned without recovery; it agrees with the full model on "
              f"{report['quality_vs_cloud']['device']['identical']:.0%} of held-out continuations "
              f"(--corpus FILE fine-tunes it)", file=sys.stderr)
    return 0


def _cmd_eval(args) -> int:
    from tierline.build.engines import load_engine
    from tierline.build.evaluate import evaluate, summary
    from tierline_shared.tasks.problems import generate

    engine = load_engine(args.models, args.tier, threads=args.threads)
    r = summary(evaluate(engine, generate(args.split, args.n, seed=args.seed)))
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
    from tierline.build.speed import bench, render

    result = bench(args.models, rounds=args.rounds, n_prompts=args.prompts, threads=args.threads)
    if args.write:
        args.write.write_text("# Tier speed (`tierline models bench`)\n\n" + render(result))
    print(json.dumps(result) if args.json else render(result))
    return 0


def _cmd_train_scorer(args) -> int:
    from tierline.build.scorer import train_scorer

    print(json.dumps(train_scorer(args.models, n=args.n, seed=args.seed)))
    return 0


def _router_inputs(models: Path, split: str, n: int, seed: int):
    """The scorer (checked against these models), `n` problems of a split, and every tier's outcomes on them."""
    from tierline.build.routing import run_tiers
    from tierline.build.scorer import SCORER_PATH, artifact_digests
    from tierline_router.scorer import Scorer
    from tierline_shared.tasks.problems import generate

    scorer = Scorer.load(models / SCORER_PATH, expected_artifacts=artifact_digests(models))
    problems = generate(split, n, seed=seed)
    return scorer, problems, run_tiers(models, problems, threads=2)


def _cmd_route_eval(args) -> int:
    from tierline.build.routing import evaluate_routers, write_curve
    from tierline_shared.config.manifest import load_manifest
    from tierline_shared.tasks.problems import generate

    manifest = load_manifest(args.manifest, check_artifacts=False)
    rc = manifest.router
    policy = {"cloud_complexity": rc.cloud_complexity, "device_complexity": rc.device_complexity,
              "confidence_threshold": dict(rc.confidence_threshold)}
    scorer, problems, outcomes = _router_inputs(args.models, "test", args.n, args.seed)
    curves: dict = {}
    calib = [p.prompt for p in generate("calib", 1000, seed=args.seed)]
    result = evaluate_routers(outcomes, problems, scorer, _all_costs(manifest), calib_prompts=calib,
                              target_edge_share=args.target_edge_share, policy=policy, curves_out=curves)
    result["policy"] = {"manifest": str(args.manifest), **policy}
    if args.out is not None:  # the committed docs/routing/ is rewritten only when asked for
        args.out.mkdir(parents=True, exist_ok=True)
        write_curve(curves, args.out / "cost_quality.png", args.out / "cost_quality.csv")
        (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "results.md").write_text(render_route_eval(result, args))
    if args.json:
        print(json.dumps(result))
    else:
        for name, r in result["routers"].items():
            extra = f", APGR {r['apgr']:.3f}" if r.get("apgr") is not None else ""
            print(f"{name:12s} accuracy {r['accuracy']:.3f}  cloud share {r['share']['cloud']:.2f}  "
                  f"cost {r['cost_vs_cloud']:.2f} of all-cloud{extra}")
    return 0


def _all_costs(manifest) -> dict[str, float]:
    """Every tier's cost from the manifest: the offline evaluation replays all of them."""
    from tierline_shared.wire import TIERS

    costs = manifest.costs()
    missing = [t for t in TIERS if t not in costs]
    if missing:
        raise UsageError(f"{manifest.path}: tiers.{missing[0]}: not configured; routers are compared on every "
                         f"tier, so the manifest needs each one's cost_per_1k_tokens")
    return costs


def render_route_eval(result: dict, args) -> str:
    """The results table of `tierline route eval` as Markdown (written beside the curve)."""
    rows = ["| router | accuracy | vs cloud-only | device | edge | cloud | cost vs all-cloud | APGR | CPT(50%) "
            "| CPT(80%) | accuracy at 90% below cloud |", "|---" * 11 + "|"]
    cloud = result["routers"]["cloud_only"]["accuracy"]

    def num(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    for name, r in result["routers"].items():
        sh = r["share"]
        rows.append(f"| {name} | {r['accuracy']:.3f} | {num(r['accuracy'] / cloud if cloud else None, '{:.0%}')} "
                    f"| {sh['device']:.1%} | {sh['edge']:.1%} | {sh['cloud']:.1%} | {r['cost_vs_cloud']:.3f} "
                    f"| {num(r.get('apgr'))} | {num(r.get('cpt50'), '{:.1%}')} | {num(r.get('cpt80'), '{:.1%}')} "
                    f"| {num(r.get('accuracy_at_90'))} |")
    pol = result["policy"]
    return "\n".join([
        f"# Router evaluation: {result['n']} test problems (seed {args.seed})", "",
        f"Regenerate: `tierline route eval --n {args.n} --seed {args.seed} --manifest {args.manifest} "
        f"--out {args.out}` (plot: `cost_quality.png`, sweep points: `cost_quality.csv`, raw: `results.json`).", "",
        f"tierline policy from `{pol['manifest']}`: cloud_complexity {pol['cloud_complexity']:.4f}, "
        f"device_complexity {pol['device_complexity']:.4f}, confidence_threshold {pol['confidence_threshold']}. "
        f"random and length send {1 - args.target_edge_share:.0%} to the cloud by score (calibrated on the calib "
        "split); APGR/CPT sweep each router's cloud threshold (weak = edge_only, strong = cloud_only).", "",
        *rows, "",
    ])


def _yaml_float(representer, value: float):
    """A float as YAML 1.1 (PyYAML, which loads manifests) reads one: a mantissa with a dot. ruamel.yaml writes
    1e-07, which PyYAML reads as the string '1e-07'."""
    text = repr(value)
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _update_router(path: Path, fields: dict) -> None:
    """Write `fields` into the manifest's `router:` section in a round trip (ruamel.yaml): the operator's
    comments and key order stay, which a load and dump would drop (sequences are written indented, as the
    repository's manifests are)."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(float, _yaml_float)
    raw = rt.load(path.read_text())
    router = raw.setdefault("router", {})
    for name, value in fields.items():
        if isinstance(value, dict) and isinstance(router.get(name), dict):
            router[name].update(value)  # its own comments stay
        else:
            router[name] = value
    out = io.StringIO()
    rt.dump(raw, out)
    path.write_text(out.getvalue())


def _cmd_route_calibrate(args) -> int:
    """Every threshold of the policy from real outcomes (see tierline.build.routing.calibrate_policy): the calib
    split's true answers, or (--prompts) the user's prompts labelled by agreement with the cloud."""
    import numpy as np
    import ruamel.yaml  # noqa: F401 - missing, say so before the tiers run, not after

    from tierline.build.routing import calibrate_policy
    from tierline_shared.config.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    raw_router: dict = {}
    if args.prompts is not None:
        from tierline.build.scorer import SCORER_PATH

        scorer, prompts, outcomes, card = _agreement_scorer(manifest.models_path, args)
        raw_router["scorer"] = str(SCORER_PATH)
        source = {"prompts": str(args.prompts), "labels": "agreement with the cloud", "extract": args.extract,
                  "scorer_heldout": card["heldout"]}
    else:
        if not manifest.router.scorer:
            raise UsageError(f"{args.manifest}: router.scorer is not set; nothing to calibrate "
                             f"(--prompts FILE trains one from your prompts)")
        scorer, problems, outcomes = _router_inputs(manifest.models_path, "calib", args.n, 0)
        prompts, source = [pr.prompt for pr in problems], {"calib_prompts": args.n, "labels": "true answers"}
    p = [scorer.p_correct(prompt) for prompt in prompts]
    point = calibrate_policy(outcomes, np.asarray([1.0 - d["edge"] for d in p]),
                             np.asarray([1.0 - d["device"] for d in p]), args.target_edge_share,
                             _all_costs(manifest), min_quality=args.min_quality)
    _update_router(args.manifest, {**raw_router, **point.manifest_fields()})
    print(json.dumps({"manifest": str(args.manifest), "target_edge_share": args.target_edge_share,
                      "min_quality": args.min_quality, **source, "router": point.manifest_fields(),
                      "calib": {"share_below_cloud": point.share_below_cloud, "accuracy": point.accuracy,
                                "cloud_only_accuracy": outcomes.accuracy("cloud"),
                                "cost_vs_cloud": point.cost_vs_cloud}}))
    return 0


def _agreement_scorer(models: Path, args):
    """The user's prompts answered on every tier, labelled by agreement with the cloud; the scorer trained on
    them and saved beside the models."""
    from tierline.build.labels import (
        Agreement,
        agreement_outcomes,
        answer_on_every_tier,
        lower_tier_labels,
        read_prompts,
    )
    from tierline.build.scorer import artifact_digests, fit_scorer, save_scorer

    agreement = Agreement(args.extract)
    prompts = read_prompts(args.prompts)
    outcomes = agreement_outcomes(answer_on_every_tier(models, prompts, args.max_tokens), agreement)
    scorer = fit_scorer(prompts, lower_tier_labels(outcomes), artifacts=artifact_digests(models))
    how = f"--extract {args.extract}" if args.extract else "normalised text"
    card = save_scorer(models, scorer, prompts,
                       f"{len(prompts)} prompts from {args.prompts}, labelled by agreement with the cloud ({how})")
    return scorer, prompts, outcomes, card


def _cmd_route_compare_labels(args) -> int:
    from tierline.build.labels import compare_label_sources
    from tierline_shared.config.manifest import load_manifest

    costs = _all_costs(load_manifest(args.manifest, check_artifacts=False))
    print(json.dumps(compare_label_sources(args.models, args.n, args.target_edge_share, costs), indent=2))
    return 0


def _cmd_demo(args) -> int:
    from tierline.demo import demo

    return demo(args.models, n=args.n, concurrency=args.concurrency)


def _cmd_up(args) -> int:
    from tierline.demo import up

    return up(args.models, args.pidfile, args.manifest, args.replicas, args.host)


def replica_counts(text: str) -> dict[str, int]:
    """`edge=2,cloud=2` -> {"edge": 2, "cloud": 2} (argparse type: a bad value is one line)."""
    from tierline_shared.wire import TIERS

    out = {}
    for part in filter(None, text.split(",")):
        tier, _, n = part.partition("=")
        if tier not in TIERS or not n.isdigit() or not 1 <= int(n) <= 16:
            raise argparse.ArgumentTypeError(f"{part!r}: TIER=N with TIER one of {', '.join(TIERS)} and N in 1..16")
        out[tier] = int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        handlers = {("models", "build"): _cmd_build, ("models", "import"): _cmd_import,
                    ("models", "eval"): _cmd_eval, ("models", "bench"): _cmd_bench,
                    ("route", "train-scorer"): _cmd_train_scorer, ("route", "eval"): _cmd_route_eval,
                    ("route", "calibrate"): _cmd_route_calibrate,
                    ("route", "compare-labels"): _cmd_route_compare_labels,
                    ("demo", None): _cmd_demo, ("up", None): _cmd_up, **parser.handlers}
        handler = handlers[(args.command, getattr(args, "action", None))]
        return handler(args)
    except UsageError as exc:
        print(f"tierline: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:  # a server command on a client-only install
        if args is None or (exc.name or "tierline").startswith("tierline"):
            raise  # our own code: a bug, not a missing extra
        extra = EXTRAS.get(args.command, "platform")
        print(f"tierline: error: `tierline {args.command}` needs the {extra} extra (missing module {exc.name!r}): "
              f"pip install 'tierline[{extra}]'", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as exc:
        # ArtifactError is a ValueError; messages name the file or the flag
        print(f"tierline: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
