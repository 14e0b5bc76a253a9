"""Who may do what on NATS: one identity per role, its subject permissions, and the nats-server
authorization config generated from them (docs/SECURITY.md).

Roles, each only what it needs:
- `operator` (the CLI): everything: it creates the fleet's buckets, writes desired models, reads telemetry.
- `router`: asks every tier (`infer`, `stream`, `cancel`) and discovers their replicas (`$SRV`); runs the
  Batch API's streams and buckets (its work queue, records, results and files) and only those.
- `tier-<tier>`: serves its own subjects in the queue group, answers only the requests it received
  (`allow_responses`), and asks the tiers above it (a device tier escalates).
- `device-<id>`: one board: what `tier-device` may do, plus its own registry key, its own telemetry
  subject and the read side of the model store. It can neither read nor write another board's entry,
  nor delete anything.

Every identity is an nkey user (Ed25519): the server's configuration holds only public keys and
each process reads its own seed file, so a stolen board yields one board's rights and nothing
else. Each identity gets its own reply inbox prefix (`_INBOX_<identity>`) and may subscribe only
there: nobody reads another's answers.

`IdentityStore` keeps a directory: `<identity>.nk` (the seeds, mode 0600), `identities.json` (the
public keys, from which the server's `nats-auth.conf` is regenerated whenever an identity is
added or revoked).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nkeys
from nats.micro.service import DEFAULT_QUEUE_GROUP

from tierline_shared.security.signing import write_secret_file
from tierline_shared.transport.messaging import (
    BATCH_BUCKET,
    BATCH_STREAM,
    DESIRED_BUCKET,
    DEVICES_BUCKET,
    FILES_BUCKET,
    KEYS_BUCKET,
    MODELS_BUCKET,
    RESULTS_BUCKET,
    SUBJECT_PREFIX,
    USAGE_BUCKET,
    service_name,
    subject,
)
from tierline_shared.wire import TIERS, tiers_above

OPERATOR = "operator"
ROUTER = "router"
TIER_PREFIX = "tier-"
DEVICE_PREFIX = "device-"
REGISTRY = "identities.json"  # public keys by identity
AUTH_CONF = "nats-auth.conf"  # the nats-server `authorization` block, generated from the registry
SEED_SUFFIX = ".nk"
RESPONSES_MAX = 100_000  # replies one request may get (a stream's chunks and heartbeats)
RESPONSES_EXPIRE = "15m"  # how long a responder may answer one request
VERBS = ("infer", "stream", "cancel")  # what a requester publishes to a tier
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")


def tier_identity(tier: str) -> str:
    if tier not in TIERS:
        raise ValueError(f"tier {tier!r}: one of {', '.join(TIERS)}")
    return TIER_PREFIX + tier


def device_identity(device_id: str) -> str:
    return DEVICE_PREFIX + device_id


def inbox_prefix(identity: str) -> str:
    """The reply subjects of this identity's requests: `_INBOX_<identity>.<unique>` (only it may read them)."""
    return f"_INBOX_{identity}"


def _serve(tier: str) -> list[str]:
    """What serving a tier's nats.micro service subscribes to: its subjects in the service's queue group
    (so even a leaked tier identity gets its share of requests, never a copy of all of them), every
    replica's cancel subject, and its discovery ($SRV)."""
    name = service_name(tier)
    return [f"{subject(tier, v)} {DEFAULT_QUEUE_GROUP}" for v in ("infer", "stream")] + [
        # each replica's own (a retry after a silence)
        f"{subject(tier, replica='*')} {DEFAULT_QUEUE_GROUP}", f"{subject(tier, 'stream', '*')} {DEFAULT_QUEUE_GROUP}",
        subject(tier, "cancel"), "$SRV.*", f"$SRV.*.{name}", f"$SRV.*.{name}.*"]


def _ask(tiers) -> list[str]:
    """Asking a tier: its verbs, a replica's own subject and $SRV.PING (a retry after a silence goes to a replica
    that is alive: messaging.ask_tier)."""
    return [subject(t, v) for t in tiers for v in VERBS] + [
        p for t in tiers for p in (subject(t, replica="*"), subject(t, "stream", "*"), f"$SRV.PING.{service_name(t)}")]


def _board(device_id: str) -> list[str]:
    """A board's own fleet entries (JetStream): its registry key (written, never read: the answer to a read goes
    to whatever reply subject the request names, and a stream capturing that subject stores it, so a board
    that could read its own entry back could write bytes of its choosing into any bucket, the API keys'
    among them), its desired key, its telemetry, the model store's read side. KV reads are direct gets,
    whose subject names the key. No stream info (with
    a subjects filter it lists every key, hence every board's id: the board binds its buckets by name)
    and no consumers: a consumer's deliver subject is in the request's body, which permissions do not
    see, so a board that may create one can have the server push the store to any subject. It reads
    an object by direct gets on the model store instead: its record, then its chunks by subject in batches.
    Not message gets, as before: those answer one 128 KiB chunk a request, so a model over a slow link took
    a round trip per chunk (100 MB over 100 ms, 80 s of the 120 s limit). The direct get subject, its body
    saying what, is every read of that one stream and nothing else, as the message get's was; it adds the
    batch and the stored headers in the answer (a record's `Nats-Rollup: sub`), which matter only where a
    board names another subject as the reply (docs/SECURITY.md)."""
    api = "$JS.API"
    desired, models = f"KV_{DESIRED_BUCKET}", f"OBJ_{MODELS_BUCKET}"
    return [
        subject("telemetry", device_id),
        f"$KV.{DEVICES_BUCKET}.{device_id}",
        f"{api}.DIRECT.GET.{desired}.$KV.{DESIRED_BUCKET}.{device_id}",
        f"{api}.DIRECT.GET.{models}",  # an object's record and its chunks (the body says which)
    ]


def _quotas() -> list[str]:
    """The shared key store (`auth.store: nats`): read keys, count usage; keys are made by the operator."""
    api, keys, usage = "$JS.API", f"KV_{KEYS_BUCKET}", f"KV_{USAGE_BUCKET}"
    return [f"{api}.STREAM.INFO.{keys}", f"{api}.STREAM.INFO.{usage}", f"{api}.DIRECT.GET.{keys}.>",
            f"{api}.DIRECT.GET.{usage}.>", f"$KV.{USAGE_BUCKET}.>"]


def _batch_api() -> list[str]:
    """The Batch API's JetStream (router/batch.py): the router creates and runs its streams and buckets, and
    nothing else's: the work queue, the records and results (KV), the files (Object Store). It may not update or
    delete them: a stream's subjects are in the body of the call, which permissions do not see, so an update could
    point the work queue at the tiers' subjects and record what they carry (and the router checks, when it opens
    them, that each has its own subjects: BatchStore.open)."""
    api = "$JS.API"
    streams = (BATCH_STREAM, f"KV_{BATCH_BUCKET}", f"KV_{RESULTS_BUCKET}", f"OBJ_{FILES_BUCKET}")
    return [f"{api}.INFO", f"{api}.STREAM.NAMES", f"{SUBJECT_PREFIX}.batch.>",
            f"$KV.{BATCH_BUCKET}.>", f"$KV.{RESULTS_BUCKET}.>", f"$O.{FILES_BUCKET}.>"] + [
        p for s in streams for p in (
            f"{api}.STREAM.CREATE.{s}", f"{api}.STREAM.INFO.{s}", f"{api}.STREAM.PURGE.{s}",
            f"{api}.STREAM.MSG.*.{s}", f"{api}.DIRECT.GET.{s}", f"{api}.DIRECT.GET.{s}.>",
            f"{api}.CONSUMER.*.{s}", f"{api}.CONSUMER.*.{s}.>", f"{api}.CONSUMER.*.*.{s}.>",
            f"$JS.ACK.{s}.>", f"$JS.FC.{s}.>")]


def permissions(identity: str) -> dict:
    """The nats-server `permissions` of one identity (allow lists: anything else is refused)."""
    inbox = [f"{inbox_prefix(identity)}.>"]
    responses = {"max": RESPONSES_MAX, "expires": RESPONSES_EXPIRE}
    if identity == OPERATOR:
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    if identity == ROUTER:
        discover = [f"$SRV.*.{service_name(t)}" for t in TIERS]
        return {"publish": {"allow": _ask(TIERS) + discover + _quotas() + _batch_api()},
                "subscribe": {"allow": inbox}}
    if identity.startswith(TIER_PREFIX) and identity.removeprefix(TIER_PREFIX) in TIERS:
        tier = identity.removeprefix(TIER_PREFIX)
        publish = _ask(tiers_above(tier))
        return {"publish": {"allow": publish} if publish else {"deny": [">"]},
                "subscribe": {"allow": _serve(tier) + inbox}, "allow_responses": responses}
    if identity.startswith(DEVICE_PREFIX) and _NAME.match(identity.removeprefix(DEVICE_PREFIX)):
        board = identity.removeprefix(DEVICE_PREFIX)
        return {"publish": {"allow": _ask(tiers_above("device")) + _board(board)},
                "subscribe": {"allow": _serve("device") + inbox}, "allow_responses": responses}
    raise ValueError(f"identity {identity!r}: one of {OPERATOR}, {ROUTER}, {TIER_PREFIX}<tier>, "
                     f"{DEVICE_PREFIX}<device id>")


def new_seed() -> bytes:
    """A new nkey user seed (`SU...`)."""
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)


def public_key(seed: bytes) -> str:
    return nkeys.from_seed(seed).public_key.decode()


class IdentityStore:
    """A directory of identities: their seeds, their public keys, and the server's authorization config."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def seed_path(self, identity: str) -> Path:
        return self.dir / f"{identity}{SEED_SUFFIX}"

    def users(self) -> dict[str, str]:
        """identity -> public nkey."""
        path = self.dir / REGISTRY
        return json.loads(path.read_text())["users"] if path.exists() else {}

    def _save(self, users: dict[str, str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / REGISTRY).write_text(json.dumps({"version": 1, "users": dict(sorted(users.items()))},
                                                    indent=1) + "\n")
        (self.dir / AUTH_CONF).write_text(auth_config(users))

    def create(self, identity: str, replace: bool = False) -> Path:
        """A new identity's seed file (kept when it exists, unless `replace`); returns its path."""
        permissions(identity)  # a name no role has is refused here
        users = self.users()
        path = self.seed_path(identity)
        if identity in users and path.exists() and not replace:
            return path
        self.dir.mkdir(parents=True, exist_ok=True)
        seed = new_seed()
        write_secret_file(path, seed + b"\n")
        users[identity] = public_key(seed)
        self._save(users)
        return path

    def revoke(self, identity: str) -> bool:
        """Remove an identity from the server's config (after a reload it can no longer connect)."""
        users = self.users()
        if identity not in users:
            return False
        del users[identity]
        self._save(users)
        self.seed_path(identity).unlink(missing_ok=True)
        return True

    def init(self, tiers=TIERS) -> list[str]:
        """The platform's identities (operator, router, one per tier); existing ones are kept. The server's
        config is written again from the registry whenever it differs: it holds each role's permissions as this
        version of Tierline gives them, so after an upgrade that changes one (a board's model downloads moved from
        message gets to direct gets) `tierline creds init` and a reload bring the server up to it, where the old
        config would go on refusing the new requests."""
        names = [OPERATOR, ROUTER] + [tier_identity(t) for t in tiers]
        for name in names:
            self.create(name)
        users = self.users()
        if not self.auth_conf.exists() or self.auth_conf.read_text() != auth_config(users):
            self._save(users)
        return names

    @property
    def auth_conf(self) -> Path:
        return self.dir / AUTH_CONF


def auth_config(users: dict[str, str]) -> str:
    """The nats-server `authorization` block: each identity's public key with its permissions."""
    block = {"users": [{"nkey": key, "permissions": permissions(identity)} for identity, key in sorted(users.items())]}
    return ("# generated by `tierline creds` from identities.json: edit the identities, not this file\n"
            f"authorization: {json.dumps(block, indent=1)}\n")


def read_seed(path: Path) -> str:
    """An identity's seed, for connecting; a clear error when the file is missing or is not a seed."""
    try:
        seed = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the NATS identity ({exc.strerror}); `tierline creds init` or "
                         f"`tierline devices provision` writes it") from None
    try:
        nkeys.from_seed(seed.encode())
    except Exception:  # noqa: BLE001 - nkeys raises its own error types for every malformation
        raise ValueError(f"{path}: not an nkey user seed") from None
    return seed
