"""Over-the-air model updates: verify, install beside the old one, health-check, swap or roll back.

The desired model (set by `tierline devices set-model`) is a signed update manifest, as
Mender and TUF do it: the operator's Ed25519 key signs the model's name, a release
`sequence` that only increases, an expiry, the device it is for, and two objects in the
JetStream Object Store with their SHA-256 and size. Before anything is downloaded the
agent checks the signature against the publisher keys pinned in its manifest
(`device_agent.update_keys`), the device, the expiry (`verify_update`) and the sequence
(`ModelStore.admit`: above the installed model's and the newest manifest the board has
verified, installed or not, so an older manifest replayed after a newer one failed is
refused too; neither the expiry nor the sequence for the model the board already serves):
an unsigned, wrongly signed, expired or older update is refused with its
own code and the running model keeps serving. Then it downloads the objects to a staging folder
(fleet.py: by direct gets, an object not of the signed size refused before a chunk is
fetched; failing only on a stalled link, and going on from the last chunk on the next try),
refuses them unless sizes and digests match the operator's (`verify`), installs them as
`state_dir/models/<version>/` - a models directory that `load_engine`
reads, sha256 checks included - loads the engine and runs a few benchmark
problems through it. Only a model that passes takes traffic: it is marked verified
(`models/<version>/verified`, written to a new file renamed into place), the `current`
link is switched atomically (rename) and the servicer swaps engines under its lock.
A model that fails is removed and the previous one, which never stopped serving,
stays current (rolled back). Every outcome is reported with an `OtaCode`.

Only verified versions count as installed (`installed`, the boot fallback, `_prune`): a
candidate the agent died on (the OOM killer, a crash in the runtime on that model, a power
cut) is removed when the agent starts again. Before a candidate is loaded its attempt is
recorded (`state_dir/attempt.json`: the manifest's digest, the attempt's number, the step),
so the next boot reports the crash (LOAD_FAILED or HEALTH_CHECK_FAILED) and, after
MAX_CRASHED_ATTEMPTS of them, the same manifest is not tried again until a new one is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from tierline_shared.models.artifacts import INDEX, ArtifactError, file_entry, load_index, sha256_of
from tierline_shared.models.names import ModelNameError, check_model_name
from tierline_shared.runtime.engine import Engine
from tierline_shared.security import signing

CURRENT = "current"  # state_dir/current -> models/<version>, the model that serves
HEALTH_SEED = 0  # the health check's problems are fixed, so a version passes or fails reproducibly
HEALTH_LEVELS = (1, 2)  # short problems: the check takes a fraction of a second on a board
KEEP_VERSIONS = 2  # installed versions kept on disk (the current one and the one before, for rollback)
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # a version, one part of an object name (a file on the board)
_VERSION = re.compile(_NAME)  # always with fullmatch: `$` would let a trailing newline through
_OBJECT = re.compile(rf"{_NAME}(?:/{_NAME}){{0,3}}")  # an object store name: <sha256>/model.tflite
_SHA256 = re.compile(r"[0-9a-f]{64}")
STAGING_PREFIX = ".incoming-"  # state_dir/models/.incoming-<random>: a download in progress
NEWEST = "newest-verified.json"  # state_dir/...: sequence and digest of the newest manifest the board verified
VERIFIED = "verified"  # models/<version>/verified: the version passed its health check (only those count)
ATTEMPT = "attempt.json"  # state_dir/...: the candidate being loaded or checked (what a crash left behind)
MAX_CRASHED_ATTEMPTS = 2  # a manifest the agent died on this many times is not tried again until a new one


class OtaCode(IntEnum):
    """The status code an update reports (0 = the desired model serves)."""

    APPLIED = 0
    IN_PROGRESS = 1
    BAD_REQUEST = 20  # the desired record is malformed
    NOT_FOUND = 21  # an artifact is not in the object store
    DOWNLOAD_FAILED = 22  # the link failed mid-download
    DIGEST_MISMATCH = 23  # the bytes do not have the desired SHA-256: refused, nothing installed
    LOAD_FAILED = 24  # the runtime cannot open the model: rolled back
    HEALTH_CHECK_FAILED = 25  # the model answered too few benchmark problems: rolled back
    UNSIGNED = 26  # the desired record carries no signature: refused before any download
    BAD_SIGNATURE = 27  # no pinned publisher key signed it (or it was altered): refused before any download
    EXPIRED = 28  # the signed manifest's expiry has passed (a replayed old update): refused
    DOWNGRADE = 29  # its sequence is below the installed or the newest verified one's (an older model): refused
    INSTALL_FAILED = 30  # the board could not install it (a full disk, an I/O error): not retried
    # a newer desired record came while it was still downloading: dropped (its partial download with it, nothing
    # installed) and the newer one applied instead; never once its check or swap has begun
    SUPERSEDED = 31


class OtaError(Exception):
    def __init__(self, code: OtaCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Artifact:
    object: str  # name in the object store
    sha256: str
    size: int  # bytes


@dataclass(frozen=True)
class DesiredModel:
    """What the operator wants one device to serve: the payload of the signed update manifest."""

    name: str
    version: str  # its name on the board (state_dir/models/<version>)
    sequence: int  # the release number: a board installs only a sequence above the one it has
    expires: float  # unix time after which the manifest is refused (a replay of an old update)
    device: str  # the one device it is for
    tflite: Artifact
    config: Artifact

    @classmethod
    def from_dict(cls, raw: dict) -> "DesiredModel":
        try:
            desired = cls(raw["name"], raw["version"], raw["sequence"], raw["expires"], raw["device"],
                          Artifact(**raw["tflite"]), Artifact(**raw["config"]))
        except (KeyError, TypeError) as exc:
            raise OtaError(OtaCode.BAD_REQUEST, f"desired model record is malformed ({exc})") from None
        if not _is_name(desired.version, _VERSION):  # a directory name on the board
            raise OtaError(OtaCode.BAD_REQUEST, f"version {desired.version!r}: a string of 1-64 letters, digits, "
                                                "'.', '_', '-', starting with a letter or digit")
        try:  # the rule the import named it by: never a file or a subject here, only the name requests ask for
            check_model_name(desired.name)
        except ModelNameError as exc:
            raise OtaError(OtaCode.BAD_REQUEST, f"name {desired.name!r} {exc}") from None
        if not isinstance(desired.device, str):
            raise OtaError(OtaCode.BAD_REQUEST, f"device {desired.device!r}: a device id")
        if not isinstance(desired.sequence, int) or isinstance(desired.sequence, bool) or desired.sequence < 1:
            raise OtaError(OtaCode.BAD_REQUEST, f"sequence {desired.sequence!r}: an integer >= 1")
        if not isinstance(desired.expires, (int, float)) or isinstance(desired.expires, bool):
            raise OtaError(OtaCode.BAD_REQUEST, f"expires {desired.expires!r}: unix time in seconds")
        for what in (desired.tflite, desired.config):
            if not _is_name(what.object, _OBJECT):
                raise OtaError(OtaCode.BAD_REQUEST, f"object {what.object!r}: names of letters, digits, '.', '_', "
                                                    "'-', joined by '/'")
            if not _is_name(what.sha256, _SHA256):
                raise OtaError(OtaCode.BAD_REQUEST, f"{what.object}: sha256 must be 64 lowercase hex digits")
            if not isinstance(what.size, int) or isinstance(what.size, bool) or what.size < 0:
                raise OtaError(OtaCode.BAD_REQUEST, f"{what.object}: size {what.size!r}: bytes, an integer >= 0")
        return desired

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "sequence": self.sequence, "expires": self.expires,
                "device": self.device, "tflite": vars(self.tflite), "config": vars(self.config)}

    def digest(self) -> str:
        """SHA-256 of the payload's canonical JSON: the same manifest again (a retry) has the same digest."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _is_name(value, pattern: re.Pattern) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


_SIGNATURE_CODES = {signing.UNSIGNED: OtaCode.UNSIGNED, signing.BAD_SIGNATURE: OtaCode.BAD_SIGNATURE,
                    signing.NO_TRUSTED_KEY: OtaCode.BAD_SIGNATURE}


def verify_update(raw: bytes, update_keys: list[str], device_id: str, now: float | None = None) -> DesiredModel:
    """The desired model in a signed update manifest, once signature, device and expiry check out.

    The sequence is not checked here (`check_sequence`): re-announcing the model a board already
    serves is not a downgrade.
    """
    desired = verify_signed(raw, update_keys, device_id)
    check_expiry(desired, now)
    return desired


def verify_signed(raw: bytes, update_keys: list[str], device_id: str) -> DesiredModel:
    """The desired model in a signed update manifest, once signature and device check out (not the expiry: a
    board that already serves this very model has nothing to refuse, however old its manifest, `check_expiry`)."""
    try:
        payload = signing.verify(raw, [signing.parse_public_key(k) for k in update_keys])
    except signing.SignatureError as exc:
        if exc.reason == signing.NO_TRUSTED_KEY:
            raise OtaError(OtaCode.BAD_SIGNATURE, "no publisher key is pinned (device_agent.update_keys): "
                                                  "every update is refused") from None
        raise OtaError(_SIGNATURE_CODES[exc.reason], f"{exc}; refused, nothing downloaded") from None
    desired = DesiredModel.from_dict(payload)
    if desired.device != device_id:
        raise OtaError(OtaCode.BAD_REQUEST, f"signed for device {desired.device!r}, not this one ({device_id!r}); "
                                            "refused")
    return desired


def check_expiry(desired: DesiredModel, now: float | None = None) -> None:
    """Refuse a manifest past its expiry (a replay of an old update): before anything is downloaded."""
    now = time.time() if now is None else now
    if now > desired.expires:
        raise OtaError(OtaCode.EXPIRED, f"the update manifest of {desired.version!r} expired "
                                        f"{now - desired.expires:.0f} s ago; refused, nothing downloaded")


def claimed_version(raw: bytes) -> str:
    """The version a desired record names, for the report only: it may be unsigned or forged."""
    try:
        doc = json.loads(raw)
        version = (doc.get("signed") or doc)["version"]
    except (ValueError, TypeError, KeyError, AttributeError):
        return "?"
    return version if _is_name(version, _VERSION) else "?"


def check_sequence(desired: DesiredModel, installed_sequence: int, newest: tuple[int, str] = (0, "")) -> None:
    """Refuse a downgrade: a sequence not above the installed model's, or below the newest manifest the board has
    verified (`newest`: its sequence and digest), installed or not. Against the installed one alone, a manifest
    older than one that failed (its download, its health check) would pass, and an attacker holding an old
    signed manifest could replay it. The newest one itself passes again (a retry, or a reinstall after a damaged
    model was removed); another manifest with its sequence does not."""
    newest_sequence, newest_digest = newest
    if desired.sequence <= installed_sequence:
        raise OtaError(OtaCode.DOWNGRADE, f"sequence {desired.sequence} of {desired.version!r} is not above the "
                                          f"installed {installed_sequence}: a downgrade, refused")
    if desired.sequence < newest_sequence or (desired.sequence == newest_sequence
                                              and desired.digest() != newest_digest):
        raise OtaError(OtaCode.DOWNGRADE, f"sequence {desired.sequence} of {desired.version!r} is not above the "
                                          f"newest verified update's {newest_sequence}: a replay, refused")


class ModelStore:
    """Installed model versions on the board: state_dir/models/<version>/ and the `current` link."""

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir)
        self.models = self.root / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """What a crash left half-made, before anything else runs in this state dir: downloads, `current` links,
        newest-verified, attempt and verified-marker files, and every version that never passed its health check
        (a candidate the agent died on while loading or checking it). The version `current` names is verified by
        construction (it is switched only after the check); one installed before versions were marked (an older
        agent) is marked here. Other unmarked versions from then are removed with the candidates: nothing tells
        them apart."""
        for path in self.models.glob(f"{STAGING_PREFIX}*"):
            self.discard(path)
        for path in [*self.root.glob(f".{CURRENT}-*"), *self.root.glob(f".{NEWEST}-*"),
                     *self.root.glob(f".{ATTEMPT}-*"), *self.models.glob(f"*/.{VERIFIED}-*")]:
            path.unlink(missing_ok=True)
        current = self.current()
        if current is not None and not self.is_verified(current):
            self.mark_verified(current.name)
        for path in self._versions():
            if path != current and not self.is_verified(path):
                self.discard(path)

    def _versions(self) -> list[Path]:
        return [p for p in self.models.iterdir() if p.is_dir() and not p.name.startswith(".")]

    @staticmethod
    def is_verified(path: Path) -> bool:
        return (path / VERIFIED).is_file()

    def mark_verified(self, version: str) -> None:
        """Record that `version` passed its health check (kept if it is there already: its time is when it
        passed): a new file renamed into place and flushed, so a power loss leaves it whole or absent."""
        target = self.models / version / VERIFIED
        if target.is_file():
            return
        _write_atomically(target, {"verified_at": round(time.time(), 3)})

    def current(self) -> Path | None:
        """The models directory of the installed model that serves, or None (the manifest's then)."""
        link = self.root / CURRENT
        return link.resolve() if link.is_symlink() and (link.resolve() / INDEX).is_file() else None

    def installed(self) -> list[Path]:
        """Every installed version (one that passed its health check), the current one first, then the others
        newest first (by when they passed)."""
        current = self.current()
        others = sorted((p for p in self._verified() if p != current and (p / INDEX).is_file()),
                        key=_verified_at, reverse=True)
        return ([current] if current else []) + others

    def _verified(self) -> list[Path]:
        return [p for p in self._versions() if self.is_verified(p)]

    def fall_back(self, damaged: list[Path], to: Path | None) -> None:
        """Serve `to` (an installed version; None: the board's own model) and remove the damaged versions."""
        if to is None:
            (self.root / CURRENT).unlink(missing_ok=True)
        else:
            self.activate(to.name)
        for path in damaged:
            self.discard(path)

    def sequence(self) -> int:
        """The release sequence of the model that serves (0: the one the board shipped with)."""
        current = self.current()
        return int(load_index(current).get("sequence", 0)) if current else 0

    def newest(self) -> tuple[int, str]:
        """Sequence and digest of the newest update manifest this board has verified ((0, ""): none yet, or a
        file it cannot read, when the installed model's sequence is the bound)."""
        try:
            doc = json.loads((self.root / NEWEST).read_text())
            return int(doc["sequence"]), str(doc["digest"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0, ""

    def admit(self, desired: DesiredModel) -> None:
        """`check_sequence`, then remember `desired` as the newest verified manifest, before anything is downloaded:
        from then on an older one is refused even if this one never installs. Written to a new file renamed over
        the old one, flushed to disk: a power loss leaves the old bound or the new one."""
        check_sequence(desired, self.sequence(), self.newest())
        _write_atomically(self.root / NEWEST, {"sequence": desired.sequence, "digest": desired.digest(),
                                               "version": desired.version})

    def staging(self) -> Path:
        path = self.models / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
        (path / "device").mkdir(parents=True)
        return path

    def install(self, staged: Path, desired: DesiredModel, base_models: Path) -> Path:
        """Make the staged files a models directory (manifest, tokenizer) and move it into place."""
        base = load_index(base_models)
        tok = base["artifacts"]["tokenizer"]
        shutil.copyfile(base_models / tok["path"], staged / tok["path"])
        weights, config = staged / "device" / "model.tflite", staged / "device" / "config.json"
        manifest = {"model_name": desired.name, "version": desired.version, "sequence": desired.sequence,
                    "family": base.get("family", ""),
                    "answer_marker": base.get("answer_marker"),
                    "artifacts": {"tokenizer": tok, "device": {"format": "tflite",
                                                              "weights": file_entry(staged, weights),
                                                              "config": file_entry(staged, config)}}}
        (staged / INDEX).write_text(json.dumps(manifest, indent=2) + "\n")
        target = self.models / desired.version
        if self.current() == target.resolve():  # replacing it would leave nothing to roll back to
            raise OtaError(OtaCode.BAD_REQUEST, f"version {desired.version!r} is serving; publish under a new name")
        if target.exists():  # a retry of a version that failed before, or a re-install
            shutil.rmtree(target)
        os.rename(staged, target)  # atomic on one filesystem
        return target

    def activate(self, version: str) -> None:
        """Point `current` at a version that passed its health check (marked verified first, if it is not yet):
        a new link renamed over the old one, never a moment without."""
        self.mark_verified(version)
        tmp = self.root / f".{CURRENT}-{uuid.uuid4().hex[:8]}"
        os.symlink(Path("models") / version, tmp)
        os.replace(tmp, self.root / CURRENT)
        self._prune(keep_newest=KEEP_VERSIONS)

    def discard(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def _prune(self, keep_newest: int) -> None:
        """Keep the current version and the newest verified others, `keep_newest` in all; a version that never
        passed its health check is never kept for a rollback (no update runs beside the one activating)."""
        current = self.current()
        others = sorted((p for p in self._verified() if p != current), key=_verified_at, reverse=True)
        kept = others[:max(keep_newest - (current is not None), 0)]
        for old in self._versions():
            if old != current and old not in kept:
                self.discard(old)

    # -- the candidate being loaded and checked: what a crash leaves behind --------------------------------------
    def begin_attempt(self, desired: DesiredModel) -> int:
        """Record, before the candidate `desired` is loaded, that it is being tried; returns the attempt's number
        (1 + the attempts of the same manifest the agent died in before)."""
        record = self.attempt()
        number = record["attempts"] + 1 if record and record["digest"] == desired.digest() else 1
        _write_atomically(self.root / ATTEMPT, {"digest": desired.digest(), "version": desired.version,
                                                "attempts": number, "step": "load", "crashed": False})
        return number

    def attempt_step(self, step: str) -> None:
        """The attempt goes on to `step` ("health_check"): what a crash from now on is reported as."""
        record = self.attempt()
        if record is not None:
            _write_atomically(self.root / ATTEMPT, {**record, "step": step})

    def end_attempt(self) -> None:
        """The attempt ended on its own (passed, or failed and reported): nothing for the next boot to report."""
        (self.root / ATTEMPT).unlink(missing_ok=True)

    def attempt(self) -> dict | None:
        """The attempt record: {"digest", "version", "attempts", "step", "crashed"}; None when there is none (or
        it cannot be read: then the manifest is tried again, as before records were kept)."""
        try:
            record = json.loads((self.root / ATTEMPT).read_text())
            return {"digest": str(record["digest"]), "version": str(record["version"]),
                    "attempts": int(record["attempts"]), "step": str(record["step"]),
                    "crashed": bool(record["crashed"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def crashed_attempt(self) -> dict | None:
        """At boot: the attempt the agent died in (the record of an attempt that never ended), now marked crashed
        so that it is reported once; None when the last attempt ended on its own."""
        record = self.attempt()
        if record is None or record["crashed"]:
            return None
        if self.is_verified(self.models / record["version"]):  # it passed; the agent died before the record went
            self.end_attempt()
            return None
        _write_atomically(self.root / ATTEMPT, {**record, "crashed": True})
        return record

    def given_up(self, desired: DesiredModel) -> dict | None:
        """The record if the agent died on `desired` MAX_CRASHED_ATTEMPTS times: it is not tried again."""
        record = self.attempt()
        if record and record["crashed"] and record["digest"] == desired.digest() \
                and record["attempts"] >= MAX_CRASHED_ATTEMPTS:
            return record
        return None


def _crash_code(record: dict) -> OtaCode:
    return OtaCode.LOAD_FAILED if record["step"] == "load" else OtaCode.HEALTH_CHECK_FAILED


def crash_outcome(record: dict, serving: str) -> dict:
    """The `ota` outcome a boot reports for an attempt the agent died in."""
    step = "loading" if record["step"] == "load" else "health-checking"
    again = ("tried again" if record["attempts"] < MAX_CRASHED_ATTEMPTS
             else "not tried again until a new desired model is set")
    return outcome(_crash_code(record), record["version"],
                   f"the agent stopped while {step} {record['version']} (attempt {record['attempts']} of "
                   f"{MAX_CRASHED_ATTEMPTS}: killed for memory, a crash in the runtime, a power cut); removed, "
                   f"serving {serving}; {again}")


def given_up(record: dict) -> OtaError:
    """The refusal of a manifest the agent died on MAX_CRASHED_ATTEMPTS times (`ModelStore.given_up`)."""
    return OtaError(_crash_code(record), f"the agent stopped {record['attempts']} times while loading or "
                                         f"health-checking {record['version']}; not tried again until a new desired "
                                         "model is set")


def _verified_at(path: Path) -> float:
    try:
        return (path / VERIFIED).stat().st_mtime
    except OSError:
        return 0.0


def _write_atomically(path: Path, doc: dict) -> None:
    """`doc` as JSON in `path`: a new file, flushed to disk, renamed over the old one."""
    tmp = path.with_name(f".{path.name}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(path: Path, art: Artifact) -> None:
    """Refuse bytes that are not the ones the operator signed (tampered, truncated, swapped)."""
    size = path.stat().st_size
    if size != art.size:
        raise OtaError(OtaCode.DIGEST_MISMATCH, f"{art.object}: {size} bytes, not the signed {art.size}; refused")
    actual = sha256_of(path)
    if actual != art.sha256:
        raise OtaError(OtaCode.DIGEST_MISMATCH, f"{art.object}: sha256 {actual[:12]}... is not the signed "
                                                f"{art.sha256[:12]}...; refused ({size} bytes)")


def health_check(engine: Engine, n_problems: int, min_token_accuracy: float,
                 stopped: Callable[[], bool] = lambda: False) -> float:
    """Share of the reference answers' tokens the model predicts, on a few fixed benchmark problems.

    Teacher-forced next-token accuracy rather than exact match: it separates a sound
    model from a broken one of the same shape even when the model is too small to
    get whole answers right (a corrupted model scores near 1/vocabulary). Below
    `min_token_accuracy` raises HEALTH_CHECK_FAILED. `stopped()` True ends it before its next problem (the
    agent stops, or the update was cancelled: a thread cannot be cancelled, and the process would wait for it).
    """
    from tierline_shared.tasks.problems import generate

    hits = total = 0
    for problem in generate("calib", n_problems, seed=HEALTH_SEED, levels=HEALTH_LEVELS):
        if stopped():
            raise OtaError(OtaCode.HEALTH_CHECK_FAILED, "health check interrupted: the update was cancelled")
        h, n = engine.teacher_forced_hits(problem.prompt, problem.target)
        hits, total = hits + h, total + n
    score = hits / max(total, 1)
    if not score >= min_token_accuracy:  # NaN-proof
        raise OtaError(OtaCode.HEALTH_CHECK_FAILED,
                       f"health check: {score:.3f} of the reference tokens predicted on {n_problems} problems, "
                       f"below {min_token_accuracy:.3f}; rolled back")
    return score


def load_candidate(models_dir: Path, threads: int) -> Engine:
    try:
        from tierline_device_agent.engine import load_engine  # the runtime: not needed to publish an update

        return load_engine(models_dir, threads=threads)
    except ArtifactError as exc:
        raise OtaError(OtaCode.LOAD_FAILED, f"cannot load the new model ({exc}); rolled back") from None


def outcome(code: OtaCode, version: str, detail: str) -> dict:
    """The `ota` part of the reported state."""
    return {"code": int(code), "status": code.name.lower(), "version": version, "detail": detail,
            "at": round(time.time(), 3)}
