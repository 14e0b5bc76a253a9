"""`tierline keys create|list|revoke`: API keys in the key store the manifest names.

Without `--manifest`: the manifest of the platform `tierline up` (`make up`) runs now, found in the state it
leaves in runs/ (tierline/running.py), so a new key works with that router at once; else local.yaml.

The commands open the same store the routers read on every request (the SQLite file, or
JetStream KV with `auth.store: nats`, as the operator's identity), so a new key works at
once and a revoked one is refused at once, with no restart.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

DEFAULT_MANIFEST = Path("infra/manifests/local.yaml")


def add_parser(sub, parser_class) -> dict:
    """Register `keys` and its actions on the `tierline` subparsers; returns their handlers."""
    keys = sub.add_parser("keys", help="API keys: create, list, revoke (stored hashed in the manifest's key store)")
    ksub = keys.add_subparsers(dest="action", required=True, parser_class=parser_class)
    c = ksub.add_parser("create", help="a new key for a plan; the key is printed once and never stored")
    c.add_argument("--plan", required=True, help="a plan of the manifest (auth.plans), e.g. free or pro")
    c.add_argument("--name", default="", help="who or what the key is for")
    ls = ksub.add_parser("list", help="every key with today's usage against its plan's quota")
    r = ksub.add_parser("revoke", help="refuse a key from now on (PERMISSION_DENIED)")
    r.add_argument("key_id", help="the key's id (the part after tl_, as `keys list` shows it)")
    for p in (c, ls, r):
        p.add_argument("--manifest", type=Path, default=None,
                       help=f"the platform's YAML manifest (default: the one `tierline up` runs now, else "
                            f"{DEFAULT_MANIFEST})")
        p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return {("keys", action): _run for action in ("create", "list", "revoke")}


def _manifest(given: Path | None) -> Path:
    """--manifest, else the running platform's (said on stderr), else local.yaml."""
    from tierline.running import running_manifest

    if given is not None:
        return given
    if (up := running_manifest()) is not None:
        print(f"tierline: the platform `tierline up` runs now: {up}", file=sys.stderr)
        return up
    return DEFAULT_MANIFEST


def _store(manifest_path: Path):
    from tierline.cli import UsageError
    from tierline_router.auth import open_key_store
    from tierline_shared.config.manifest import load_manifest
    from tierline_shared.security.identities import OPERATOR

    manifest = load_manifest(manifest_path, check_artifacts=False)
    if not manifest.auth.enabled:
        print(f"tierline: note: auth.enabled is false in {manifest_path}: the router does not check keys",
              file=sys.stderr)
    try:
        return manifest, open_key_store(manifest, OPERATOR)
    except (ConnectionError, TimeoutError, ValueError) as exc:  # auth.store: nats, and NATS refused or away
        raise UsageError(f"auth.store {manifest.auth.store}: {exc}") from None


def _when(ts: float | None) -> str:
    return "" if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")


def _run(args) -> int:
    from tierline.cli import UsageError

    args.manifest = _manifest(args.manifest)
    manifest, store = _store(args.manifest)
    try:
        if args.action == "create":
            if args.plan not in manifest.auth.plans:
                raise UsageError(f"--plan: {args.plan!r} is not a plan of {args.manifest}; "
                                 f"allowed: {', '.join(manifest.auth.plans)}")
            key_id, key = store.create(args.plan, args.name)
            if args.json:
                print(json.dumps({"id": key_id, "plan": args.plan, "name": args.name, "key": key}))
            else:
                print(f"created key {key_id} (plan {args.plan}); it is shown only this once:", file=sys.stderr)
                print(key)
        elif args.action == "revoke":
            if not store.revoke(args.key_id):
                where = manifest.key_store_path if manifest.auth.store == "sqlite" else "the shared key store"
                raise UsageError(f"key_id: no key {args.key_id!r} in {where}")
            print(json.dumps({"id": args.key_id, "revoked": True}) if args.json else f"revoked key {args.key_id}")
        else:
            _list(store.list(), manifest.auth.plans, args.json)
    finally:
        store.close()
    return 0


def _list(records, plans, as_json: bool) -> None:
    from tierline_router.auth import next_reset, utc_day

    if as_json:
        print(json.dumps({"day": utc_day(), "keys": [
            {"id": r.id, "name": r.name, "plan": r.plan, "created_at": r.created_at, "revoked_at": r.revoked_at,
             "calls_today": r.calls_today, "tokens_today": r.tokens_today} for r in records]}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"API keys: used today / daily quota (resets {next_reset(utc_day())})")
    for col in ("id", "name", "plan", "created", "status", "calls", "tokens"):
        table.add_column(col, justify="right" if col in ("calls", "tokens") else "left",
                         no_wrap=col != "name")
    for r in records:
        plan = plans.get(r.plan)
        table.add_row(r.id, r.name, r.plan, _when(r.created_at),
                      "revoked" if r.revoked_at else "active",
                      f"{r.calls_today:,} / {plan.calls_per_day:,}" if plan else f"{r.calls_today:,}",
                      f"{r.tokens_today:,} / {plan.tokens_per_day:,}" if plan else f"{r.tokens_today:,}")
    Console().print(table)
