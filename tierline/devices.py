"""`tierline devices list | set-model | bench`: the device fleet from an operator's seat.

`list` reads every device's reported state from the JetStream KV bucket and
marks the ones whose last heartbeat is older than their own `stale_after_beats`
beats; `set-model` uploads a .tflite and its config.json to the Object Store and
sets the device's desired model (the agent verifies, installs, health-checks and
reports); `bench --profile pi` measures the device model as a Pi-class board
would run it (one core, one thread), through device_agent/profile.py as `make bench` does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path

from tierline_device_agent.profile import PROFILES, measure_pinned  # no runtime: the parser stays light

UPLOAD_TIMEOUT_S = 120.0  # one artifact into the object store, at most
COLUMNS = ("device", "state", "model", "ota", "code", "queue", "requests", "rss_mb", "arch", "beat_age_s",
           "outbox")


def add_parser(sub, parser_class) -> dict:
    """Register `tierline devices ...` on the CLI's subparsers; returns {(command, action): handler}."""
    from tierline.cli import non_negative_int, positive_int

    d = sub.add_parser("devices", help="the device fleet: list, set the desired model, Pi-class bench")
    dsub = d.add_subparsers(dest="action", required=True, parser_class=parser_class)
    ls = dsub.add_parser("list", help="every registered device, its model, load and heartbeat")
    ls.add_argument("--manifest", type=Path, default=Path("infra/manifests/local.yaml"))
    ls.add_argument("--json", action="store_true", help="one JSON object on stdout")
    sm = dsub.add_parser("set-model", help="upload a device model and make it a device's desired model")
    sm.add_argument("--manifest", type=Path, default=Path("infra/manifests/local.yaml"))
    sm.add_argument("--device", required=True, help="device id")
    sm.add_argument("--tflite", type=Path, required=True, help="the .tflite (its config.json beside it)")
    sm.add_argument("--version", required=True, help="version name, e.g. 2025-06-01")
    sm.add_argument("--sha256", default=None, help="the digest the device must see (default: the file's)")
    be = dsub.add_parser("bench", help="tokens/s, first-token latency and RSS of the device model")
    be.add_argument("--profile", choices=sorted(PROFILES), default="pi")
    be.add_argument("--models", type=Path, default=Path("models"))
    be.add_argument("--prompts", type=positive_int("--prompts"), default=16, help="requests per repeat")
    be.add_argument("--warmup", type=non_negative_int("--warmup"), default=2, help="requests first, not counted")
    be.add_argument("--repeats", type=positive_int("--repeats"), default=1, help="runs; medians are reported")
    be.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return {("devices", "list"): cmd_list, ("devices", "set-model"): cmd_set_model, ("devices", "bench"): cmd_bench}


def _nats_options(manifest_path: Path):
    from tierline_shared.config.manifest import load_manifest
    from tierline_shared.transport.messaging import NatsOptions

    manifest = load_manifest(manifest_path, check_artifacts=False)
    return manifest, NatsOptions.from_manifest(manifest)


async def _with_fleet(opts, work):
    """`work(fleet)` on a connection of its own; no NATS, a refused login or no JetStream is one line (exit 2)."""
    from nats.js.errors import ServiceUnavailableError

    from tierline.cli import UsageError
    from tierline_device_agent.fleet import open_fleet  # NATS and JetStream: only when a command runs
    from tierline_shared.transport.messaging import connect

    try:
        nc = await connect(opts, name="tierline-cli", timeout_s=opts.connect_timeout_s + 1)
    except ConnectionError as exc:  # NatsAuthError included
        raise UsageError(str(exc)) from None
    try:
        return await work(await open_fleet(nc))
    except ServiceUnavailableError:
        raise UsageError(f"NATS at {opts.url} has no JetStream: the fleet's state lives there "
                         f"(run nats-server with JetStream)") from None
    finally:
        await nc.close()


# -- list ---------------------------------------------------------------------------------------------
def fleet_rows(records: list[dict], now: float | None = None) -> list[dict]:
    """One row per device; `state` is "stale" after the device's own number of missed beats."""
    now = time.time() if now is None else now
    rows = []
    for r in sorted(records, key=lambda r: r["device_id"]):
        age = now - r["last_heartbeat"]
        ota = r.get("ota") or {}
        rows.append({"device": r["device_id"],
                     "state": "stale" if age > r["stale_after_beats"] * r["heartbeat_s"] else r["status"],
                     "model": r["model"]["version"], "ota": ota.get("status", "-"), "code": ota.get("code", "-"),
                     "queue": r["load"]["queue"], "requests": r["load"]["requests"], "rss_mb": r["load"]["rss_mb"],
                     "arch": r["arch"], "beat_age_s": round(age, 1),
                     "outbox": f"{r['outbox']['pending']}/{r['outbox']['dropped']} dropped"})
    return rows


def render(rows: list[dict]) -> str:
    table = [COLUMNS] + [tuple(str(row[c]) for c in COLUMNS) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


async def read_devices(fleet) -> list[dict]:
    from nats.js.errors import KeyNotFoundError, NoKeysError

    try:
        keys = await fleet.devices.keys()
    except NoKeysError:
        return []
    records = []
    for key in keys:
        try:
            records.append(json.loads((await fleet.devices.get(key)).value))
        except KeyNotFoundError:
            continue  # removed meanwhile
    return records


def cmd_list(args) -> int:
    _, opts = _nats_options(args.manifest)
    rows = fleet_rows(asyncio.run(_with_fleet(opts, read_devices)))
    print(json.dumps({"devices": rows}) if args.json else render(rows) if rows else "no devices registered")
    return 0


# -- set-model ------------------------------------------------------------------------------------------
async def publish_model(fleet, device_id: str, name: str, version: str, tflite: bytes, config: bytes,
                        sha256: str | None = None):
    """Upload the artifacts and set the desired model (a DesiredModel); `sha256` is what the device will demand."""
    from tierline_device_agent.fleet import JS_TIMEOUT_S

    desired = desired_model(name, version, tflite, config, sha256)
    for art, data in ((desired.tflite, tflite), (desired.config, config)):
        await asyncio.wait_for(fleet.models.put(art.object, data), UPLOAD_TIMEOUT_S)
    await asyncio.wait_for(fleet.desired.put(device_id, desired.to_json()), JS_TIMEOUT_S)
    return desired


def desired_model(name: str, version: str, tflite: bytes, config: bytes, sha256: str | None = None):
    """The desired record (a DesiredModel), checked as the device will check it (OtaError: a bad version or digest)."""
    from tierline_device_agent.ota import Artifact, DesiredModel

    desired = DesiredModel(name, version,
                           Artifact(f"{version}/model.tflite", sha256 or hashlib.sha256(tflite).hexdigest()),
                           Artifact(f"{version}/config.json", hashlib.sha256(config).hexdigest()))
    return DesiredModel.from_json(desired.to_json())


def cmd_set_model(args) -> int:
    from tierline.cli import UsageError
    from tierline_device_agent.ota import OtaError

    manifest, opts = _nats_options(args.manifest)
    config = args.tflite.parent / "config.json"
    for path in (args.tflite, config):
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    tflite, config_bytes = args.tflite.read_bytes(), config.read_bytes()
    try:
        desired = desired_model(manifest.model_name, args.version, tflite, config_bytes, args.sha256)
    except OtaError as exc:
        raise UsageError(f"--version/--sha256: {exc}") from None
    if args.sha256 and args.sha256 != hashlib.sha256(tflite).hexdigest():
        print(f"tierline: warning: {args.tflite} does not have sha256 {args.sha256}; the device will refuse it",
              file=sys.stderr)
    asyncio.run(_with_fleet(opts, lambda fleet: publish_model(
        fleet, args.device, manifest.model_name, args.version, tflite, config_bytes, args.sha256)))
    print(json.dumps({"device": args.device, "version": desired.version, "tflite": vars(desired.tflite),
                      "config": vars(desired.config)}))
    return 0


# -- bench --------------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    """The device model on the profile's cores and threads, in a pinned process of its own (device_agent/profile.py)."""
    from tierline.cli import UsageError
    from tierline_shared.models.artifacts import load_index

    load_index(args.models)  # a missing family: one line, exit 2, before a process starts
    try:
        r = measure_pinned(args.models, args.profile, prompts=args.prompts, warmup=args.warmup, repeats=args.repeats)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(r) if args.json else
          f"device model, profile {r['profile']} ({r['cores']} core, {r['threads']} thread): "
          f"decode {r['decode_tokens_per_s']} tokens/s, first token p50 {r['first_token_ms_p50']} ms "
          f"(p95 {r['first_token_ms_p95']}), RSS {r['rss_mib']} MiB (peak {r['peak_rss_mib']}), "
          f"{r['params']:,} params, {r['bytes']:,} bytes; {r['prompts']} requests one at a time, "
          f"{r['warmup']} warm-up, median of {r['repeats']}")
    return 0
