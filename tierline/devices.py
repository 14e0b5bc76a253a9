"""`tierline devices list | set-model | provision | revoke | bench`: the device fleet from an operator's seat.

`list` reads every device's reported state from the JetStream KV bucket and marks the ones whose last heartbeat
is older than their own `stale_after_beats` beats, or the operator's manifest's if fewer seconds (the device is
named by its key, the one a board may write; a body that is not a well-formed report of that device is an
`invalid` row, so a stolen board can neither crash the listing nor pose as another board); `set-model` uploads a
.tflite and its config.json to the Object Store and sets the device's desired model, an update manifest signed
with the operator's key (the agent verifies signature, expiry and sequence, then installs, health-checks and
reports); `provision` gives a board its own NATS identity, `revoke` takes it away; `bench --profile pi` measures
the device model as a Pi-class board would run it (one core, one thread), through device_agent/profile.py as
`make bench` does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from tierline_device_agent.profile import PROFILES, measure_pinned  # no runtime: the parser stays light

UPLOAD_TIMEOUT_S = 120.0  # one artifact into the object store, at most
UPDATE_TTL_S = 7 * 86400.0  # seconds a signed update manifest stays valid (`--expires-in`)
COLUMNS = ("device", "state", "model", "ota", "code", "queue", "requests", "rss_mb", "arch", "beat_age_s",
           "outbox")
# what a board wrote is shown within these bounds, whatever it wrote (a stolen board writes its own entry)
MAX_TEXT = 64  # characters of a text shown (a version name is at most 64: ota._VERSION); beyond: cut, CUT marks it
CUT = "…"
MAX_NUMBER = 1e15  # a reported number beyond this (or NaN, or infinite) makes the row invalid
CLOCK_SKEW_S = 300.0  # a heartbeat up to this far ahead of this clock is believed (clocks differ); beyond: invalid


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
    sm.add_argument("--signing-key", type=Path, default=None,
                    help="the operator's Ed25519 key (default: update-signing.key in the manifest's nats.credentials)")
    sm.add_argument("--sequence", type=positive_int("--sequence"), default=None,
                    help="release number, above every earlier one (default: the time in milliseconds)")
    sm.add_argument("--expires-in", type=positive_int("--expires-in"), default=int(UPDATE_TTL_S),
                    help=f"seconds the signed update stays valid (default {int(UPDATE_TTL_S)})")
    pv = dsub.add_parser("provision", help="a board's own NATS identity, and the fleet's buckets")
    pv.add_argument("--manifest", type=Path, default=Path("infra/manifests/local.yaml"))
    pv.add_argument("--device", required=True, help="device id")
    pv.add_argument("--no-buckets", action="store_true", help="only the identity (NATS need not be up)")
    rv = dsub.add_parser("revoke", help="remove a board's NATS identity (a stolen board)")
    rv.add_argument("--manifest", type=Path, default=Path("infra/manifests/local.yaml"))
    rv.add_argument("--device", required=True, help="device id")
    be = dsub.add_parser("bench", help="tokens/s, first-token latency and RSS of the device model")
    be.add_argument("--profile", choices=sorted(PROFILES), default="pi")
    be.add_argument("--models", type=Path, default=Path("models"))
    be.add_argument("--prompts", type=positive_int("--prompts"), default=16, help="requests per repeat")
    be.add_argument("--warmup", type=non_negative_int("--warmup"), default=2, help="requests first, not counted")
    be.add_argument("--repeats", type=positive_int("--repeats"), default=1, help="runs; medians are reported")
    be.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return {("devices", "list"): cmd_list, ("devices", "set-model"): cmd_set_model, ("devices", "bench"): cmd_bench,
            ("devices", "provision"): cmd_provision, ("devices", "revoke"): cmd_revoke}


def _nats_options(manifest_path: Path):
    from tierline.cli import UsageError
    from tierline_shared.config.manifest import load_manifest
    from tierline_shared.security.identities import OPERATOR
    from tierline_shared.transport.messaging import NatsOptions

    manifest = load_manifest(manifest_path, check_artifacts=False)
    try:
        return manifest, NatsOptions.from_manifest(manifest, OPERATOR)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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
_REPORT_FIELDS = {  # what a row reads from a reported state, and the types it must have
    ("device_id",): str, ("status",): str, ("last_heartbeat",): (int, float), ("heartbeat_s",): (int, float),
    ("stale_after_beats",): (int, float), ("model", "version"): str, ("load", "queue"): (int, float),
    ("load", "requests"): (int, float), ("load", "rss_mb"): (int, float), ("arch",): str,
    ("outbox", "pending"): (int, float), ("outbox", "dropped"): (int, float),
}


def _report(key: str, body, now: float) -> dict:
    """The reported state in a registry entry, checked (ValueError: why it is not one). Its numbers are finite and
    bounded, its heartbeat settings what a board's manifest allows, its heartbeat not ahead of `now` (beyond
    CLOCK_SKEW_S): a board that wrote otherwise could not be told stale once it stopped beating (revoked, killed)."""
    from tierline_shared.config.manifest import field_range

    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except ValueError:
            raise ValueError("not JSON") from None
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    for path, kind in _REPORT_FIELDS.items():
        value = body
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{'.'.join(path)}: missing or not {getattr(kind, '__name__', 'a number')}")
        if isinstance(value, str) and not value.isprintable():
            raise ValueError(f"{'.'.join(path)}: control characters")
        if not isinstance(value, str) and not _bounded(value):
            raise ValueError(f"{'.'.join(path)}: not a finite number of at most {MAX_NUMBER:g}")
    if body["device_id"] != key:
        raise ValueError(f"claims to be device {_clip(repr(body['device_id']))}")
    for field in ("heartbeat_s", "stale_after_beats"):  # as device_agent.<field> in a manifest: bounded
        lo, hi = field_range(field)
        if not lo <= body[field] <= hi:
            raise ValueError(f"{field}: {body[field]!r} out of range [{lo}, {hi}]")
    if body["last_heartbeat"] > now + CLOCK_SKEW_S:
        raise ValueError(f"last_heartbeat: {body['last_heartbeat'] - now:.0f} s ahead of this clock "
                         f"(more than {CLOCK_SKEW_S:g} s)")
    ota = body.get("ota") or {}
    if not isinstance(ota, dict) or not all(isinstance(ota.get(f, "-"), (str, int)) for f in ("status", "code")):
        raise ValueError("ota: not an outcome")
    if not all(str(ota.get(f, "-")).isprintable() for f in ("status", "code")):
        raise ValueError("ota.status: control characters")
    if isinstance(ota.get("code"), int) and not _bounded(ota["code"]):
        raise ValueError(f"ota.code: not a number of at most {MAX_NUMBER:g}")
    return body


def _bounded(value) -> bool:
    """A finite number within ±MAX_NUMBER (JSON may bring NaN, Infinity, or an integer of thousands of digits)."""
    return (isinstance(value, int) or math.isfinite(value)) and abs(value) <= MAX_NUMBER


def _clip(value):
    """A text cut to MAX_TEXT characters, CUT marking where; anything else as it is."""
    return value[:MAX_TEXT - len(CUT)] + CUT if isinstance(value, str) and len(value) > MAX_TEXT else value


def fleet_rows(entries: dict[str, object], now: float | None = None, stale_after_s: float | None = None) -> list[dict]:
    """One row per registry key (the device id), from its entry's body (bytes, or already decoded).

    `state` is "stale" after the device's own number of missed beats, or after `stale_after_s` (the operator's
    manifest's `heartbeat_s` x `stale_after_beats`) if that comes first: a board's own settings are what it wrote,
    and a stolen one that wrote the longest a manifest allows (1,000 beats of a day) would stay `serving` for years
    after its revocation. "invalid" when the body
    is not a report of that device (`invalid` then says why). Whatever a board wrote, a row's texts are at most
    MAX_TEXT characters (cut, marked) and its numbers finite, so the table stays a table and --json stays JSON.
    """
    now = time.time() if now is None else now
    rows = []
    for key in sorted(entries):
        try:
            r = _report(key, entries[key], now)
        except ValueError as exc:
            rows.append({**{c: "-" for c in COLUMNS}, "device": _clip(key), "state": "invalid",
                         "invalid": str(exc)})
            continue
        age = now - r["last_heartbeat"]
        ota = r.get("ota") or {}
        stale_after = min(r["stale_after_beats"] * r["heartbeat_s"], stale_after_s or math.inf)
        row = {"device": key,
               "state": "stale" if age > stale_after else r["status"],
               "model": r["model"]["version"], "ota": ota.get("status", "-"), "code": ota.get("code", "-"),
               "queue": r["load"]["queue"], "requests": r["load"]["requests"], "rss_mb": r["load"]["rss_mb"],
               "arch": r["arch"], "beat_age_s": round(max(age, 0.0), 1),  # a clock a little ahead: just now
               "outbox": f"{r['outbox']['pending']}/{r['outbox']['dropped']} dropped"}
        rows.append({c: _clip(v) for c, v in row.items()})
    return rows


def render(rows: list[dict]) -> str:
    table = [COLUMNS] + [tuple(str(row[c]) for c in COLUMNS) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


async def read_devices(fleet) -> dict[str, bytes]:
    """Every registry entry's body by its key (the device id), undecoded: fleet_rows checks them."""
    from tierline_shared.transport.messaging import DEVICES_BUCKET, kv_entries

    return await kv_entries(fleet.js, DEVICES_BUCKET)


def cmd_list(args) -> int:
    manifest, opts = _nats_options(args.manifest)
    fleet = manifest.device_agent
    rows = fleet_rows(asyncio.run(_with_fleet(opts, read_devices)),
                      stale_after_s=fleet.heartbeat_s * fleet.stale_after_beats)
    # allow_nan=False: never NaN or Infinity, which are not JSON (fleet_rows leaves none)
    print(json.dumps({"devices": rows}, allow_nan=False) if args.json else render(rows) if rows else
          "no devices registered")
    return 0


# -- set-model ------------------------------------------------------------------------------------------
async def publish_model(fleet, desired, signing_key, tflite: bytes, config: bytes):
    """Upload the artifacts and set the device's desired model: the DesiredModel signed with `signing_key`."""
    from tierline_device_agent.fleet import JS_TIMEOUT_S
    from tierline_shared.security.signing import sign

    for art, data in ((desired.tflite, tflite), (desired.config, config)):
        await asyncio.wait_for(fleet.models.put(art.object, data), UPLOAD_TIMEOUT_S)
    await asyncio.wait_for(fleet.desired.put(desired.device, sign(desired.to_dict(), signing_key)), JS_TIMEOUT_S)
    return desired


def desired_model(device: str, name: str, version: str, tflite: bytes, config: bytes, sha256: str | None = None,
                  sequence: int | None = None, expires_in_s: float = UPDATE_TTL_S):
    """The update manifest (a DesiredModel), checked as the device will check it (OtaError: a bad field).

    `sequence` defaults to the time in milliseconds, so each update outranks the ones before it. The objects are
    named by their content's SHA-256, not by the version: the model store is shared by every board, and two
    boards given different files under one version name would otherwise overwrite each other's (a board still
    offline would then find the other's bytes and refuse them, digest_mismatch, for good)."""
    from tierline_device_agent.ota import Artifact, DesiredModel

    tflite_sha, config_sha = hashlib.sha256(tflite).hexdigest(), hashlib.sha256(config).hexdigest()
    desired = DesiredModel(name, version, time.time_ns() // 1_000_000 if sequence is None else sequence,
                           round(time.time() + expires_in_s, 3), device,
                           Artifact(f"{tflite_sha}/model.tflite", sha256 or tflite_sha, len(tflite)),
                           Artifact(f"{config_sha}/config.json", config_sha, len(config)))
    return DesiredModel.from_dict(json.loads(json.dumps(desired.to_dict())))


def cmd_set_model(args) -> int:
    from tierline.cli import UsageError
    from tierline_device_agent.ota import OtaError
    from tierline_shared.security.credentials import SIGNING_KEY
    from tierline_shared.security.signing import key_id, read_private_key

    manifest, opts = _nats_options(args.manifest)
    config = args.tflite.parent / "config.json"
    for path in (args.tflite, config):
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    tflite, config_bytes = args.tflite.read_bytes(), config.read_bytes()
    key_path = args.signing_key or (manifest.resolve(manifest.nats.credentials) / SIGNING_KEY
                                    if manifest.nats.credentials else None)
    if key_path is None:
        raise UsageError("--signing-key: required (the operator's update signing key; `tierline creds init` "
                         "writes one beside the NATS identities)")
    try:
        key = read_private_key(key_path)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--signing-key: {exc}") from None
    try:  # the manifest's model_name was checked by the same rule at load (the boards check it again)
        desired = desired_model(args.device, manifest.model_name, args.version, tflite, config_bytes, args.sha256,
                                args.sequence, args.expires_in)
    except OtaError as exc:
        raise UsageError(f"--version/--sha256/--sequence/--expires-in: {exc}") from None
    if args.sha256 and args.sha256 != hashlib.sha256(tflite).hexdigest():
        print(f"tierline: warning: {args.tflite} does not have sha256 {args.sha256}; the device will refuse it",
              file=sys.stderr)
    asyncio.run(_with_fleet(opts, lambda fleet: publish_model(fleet, desired, key, tflite, config_bytes)))
    print(json.dumps({"device": args.device, "version": desired.version, "sequence": desired.sequence,
                      "expires": desired.expires, "signed_by": key_id(key), "tflite": vars(desired.tflite),
                      "config": vars(desired.config)}))
    return 0


# -- provision / revoke ---------------------------------------------------------------------------------
def cmd_provision(args) -> int:
    """A board's own NATS identity (its seed file, to copy onto the board), the server's config regenerated,
    and the fleet's buckets created (a board may use them, not create them)."""
    from tierline.cli import UsageError
    from tierline_device_agent.fleet import provision_fleet
    from tierline_shared.config.manifest import DEVICE_ID_CHARS
    from tierline_shared.security.identities import IdentityStore, device_identity

    if not args.device or not set(args.device) <= DEVICE_ID_CHARS or len(args.device) > 64:
        raise UsageError(f"{args.device!r}: a device id is 1-64 letters, digits, '_' or '-'")
    manifest, opts = _nats_options(args.manifest)
    if not manifest.nats.credentials:
        raise UsageError(f"{args.manifest}: nats.credentials: not set; boards get identities from the directory "
                         "`tierline creds init` made")
    store = IdentityStore(manifest.resolve(manifest.nats.credentials))
    seed = store.create(device_identity(args.device))
    print(json.dumps({"device": args.device, "identity": device_identity(args.device), "seed_file": str(seed),
                      "nats_auth": str(store.auth_conf),
                      "next": "reload nats-server (nats-server --signal reload), then copy the seed file and "
                              "ca.pem to the board (nats.credentials, nats.tls_ca)"}))
    if not args.no_buckets:
        try:
            asyncio.run(provision_fleet(opts))
        except (ConnectionError, TimeoutError) as exc:
            raise UsageError(f"the fleet's buckets were not created ({exc}); run again once NATS is up") from None
    return 0


def cmd_revoke(args) -> int:
    """Remove a board's identity: after a reload of nats-server it cannot connect any more."""
    from tierline.cli import UsageError
    from tierline_shared.config.manifest import load_manifest
    from tierline_shared.security.identities import IdentityStore, device_identity

    manifest = load_manifest(args.manifest, check_artifacts=False)
    if not manifest.nats.credentials:
        raise UsageError(f"{args.manifest}: nats.credentials: not set")
    store = IdentityStore(manifest.resolve(manifest.nats.credentials))
    if not store.revoke(device_identity(args.device)):
        raise UsageError(f"{args.device}: no such device identity in {store.dir}")
    print(json.dumps({"device": args.device, "revoked": True, "nats_auth": str(store.auth_conf),
                      "next": "reload nats-server (nats-server --signal reload)"}))
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
