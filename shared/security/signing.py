"""Ed25519 signed envelopes: a payload that carries its own proof of who wrote it.

Anything a Tierline process acts on from elsewhere (a manifest, a model index, a fleet
command) can travel as an envelope in the TUF/Mender style:

    {"signed": {...payload...}, "signatures": [{"keyid": "<16 hex>", "sig": "<base64>"}]}

Each signature covers the canonical JSON of the payload (`canonical_json`), so the
envelope's own layout and whitespace do not matter. `verify` takes a list of trusted
public keys: one valid signature by any of them suffices and signatures by other keys
are ignored, which is how keys rotate (trust [old, new], sign with new, drop old later).
What `verify` returns is exactly what the signature covered.

Public keys travel as text, "ed25519:<base64 of the 32 raw bytes>"; a private key is a
PEM (PKCS8, unencrypted) file that is never readable by anyone but its owner.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_PREFIX = "ed25519:"
PUBLIC_KEY_BYTES = 32  # an Ed25519 public key, raw
SIGNATURE_BYTES = 64  # an Ed25519 signature, raw
KEY_ID_HEX = 16  # hex characters of sha256(raw public key) that name a key
SECRET_FILE_MODE = 0o600  # private keys: owner read/write, nobody else

# SignatureError.reason
UNSIGNED = "unsigned"  # not an envelope: malformed JSON, no "signed" payload, no signatures
BAD_SIGNATURE = "bad_signature"  # no signature by a trusted key verifies (unknown key, tampered payload)
NO_TRUSTED_KEY = "no_trusted_key"  # the caller trusts no key at all, so nothing can verify


class SignatureError(Exception):
    """An envelope that cannot be trusted; `reason` is one of UNSIGNED, BAD_SIGNATURE, NO_TRUSTED_KEY."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


# --- keys -----------------------------------------------------------------------------------------------------------

def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_secret_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically with mode 0600: the file is never readable by others, not even briefly.

    The bytes go to a temporary file in the same folder, created with mode 0600 by os.open itself,
    and are renamed over `path` once on disk, so a reader sees the old file or the whole new one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # O_EXCL: never an existing file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), SECRET_FILE_MODE)  # exactly 0600 whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_private_key(path: str | os.PathLike, key: Ed25519PrivateKey) -> Path:
    """The key as PEM (PKCS8, no password) in a file of mode 0600, written atomically."""
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"expected an Ed25519PrivateKey, got {type(key).__name__}")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return write_secret_file(path, pem)


def read_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """The Ed25519 key in a PEM file; FileNotFoundError or ValueError naming the file otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"private key file {path} does not exist") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"private key file {path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"private key file {path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def _public(key: Ed25519PrivateKey | Ed25519PublicKey) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key
    raise TypeError(f"expected an Ed25519 private or public key, got {type(key).__name__}")


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """"ed25519:" + standard base64 (no newlines) of the 32 raw public key bytes."""
    return PUBLIC_KEY_PREFIX + base64.b64encode(_raw(_public(key))).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """The key `public_key_text` wrote; ValueError naming the text when it is not one."""
    shown = repr(text if len(str(text)) <= 80 else str(text)[:77] + "...")
    if not isinstance(text, str) or not text.strip().startswith(PUBLIC_KEY_PREFIX):
        raise ValueError(f"public key {shown} does not start with {PUBLIC_KEY_PREFIX!r}")
    try:
        raw = base64.b64decode(text.strip()[len(PUBLIC_KEY_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"public key {shown} is not valid base64 after {PUBLIC_KEY_PREFIX!r}") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public key {shown} has {len(raw)} bytes, an Ed25519 key has {PUBLIC_KEY_BYTES}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The first 16 hex characters of sha256 of the raw public key: names a key in an envelope."""
    return hashlib.sha256(_raw(_public(key))).hexdigest()[:KEY_ID_HEX]


# --- envelopes ------------------------------------------------------------------------------------------------------

def canonical_json(payload: dict[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(payload: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """The JSON envelope {"signed": payload, "signatures": [{"keyid", "sig"}]} signed with `key`."""
    return sign_with(payload, [key])


def sign_with(payload: dict[str, Any], keys: list[Ed25519PrivateKey]) -> bytes:
    """An envelope with one signature per key (a rotation: sign with old and new while both are trusted)."""
    if not isinstance(payload, dict):
        raise TypeError(f"the payload to sign must be a dict, got {type(payload).__name__}")
    if not keys:
        raise ValueError("sign_with needs at least one key")
    message = canonical_json(payload)
    signatures = [{"keyid": key_id(k), "sig": base64.b64encode(k.sign(message)).decode("ascii")} for k in keys]
    return json.dumps({"signed": payload, "signatures": signatures}, ensure_ascii=False).encode()


def verify(envelope: bytes | str, trusted: list[Ed25519PublicKey]) -> dict[str, Any]:
    """The payload of `envelope` if a key in `trusted` signed it; SignatureError (with its reason) otherwise."""
    if not trusted:
        raise SignatureError(NO_TRUSTED_KEY, "no trusted public key is configured: cannot verify any envelope")
    try:
        doc = json.loads(envelope)
    except (ValueError, TypeError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SignatureError(UNSIGNED, f"not a signed envelope: not JSON ({e})") from None
    if not isinstance(doc, dict) or "signed" not in doc:
        raise SignatureError(UNSIGNED, "not a signed envelope: no \"signed\" payload")
    payload, signatures = doc["signed"], doc.get("signatures")
    if not isinstance(payload, dict):
        raise SignatureError(UNSIGNED, f"not a signed envelope: \"signed\" is a {type(payload).__name__}, not an "
                                       "object")
    if not isinstance(signatures, list) or not signatures:
        raise SignatureError(UNSIGNED, "the envelope carries no signatures")

    by_id: dict[str, list[Ed25519PublicKey]] = {}
    for public in trusted:
        by_id.setdefault(key_id(public), []).append(_public(public))
    message = canonical_json(payload)
    seen: list[str] = []
    for entry in signatures:
        if not isinstance(entry, dict):
            continue
        kid, sig = entry.get("keyid"), entry.get("sig")
        seen.append(repr(kid))
        if not isinstance(kid, str) or not isinstance(sig, str) or kid not in by_id:
            continue  # a key we do not trust, or a malformed entry: ignored
        try:
            raw = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) != SIGNATURE_BYTES:
            continue
        for public in by_id[kid]:
            try:
                public.verify(raw, message)
                return payload
            except InvalidSignature:
                pass
    raise SignatureError(BAD_SIGNATURE, f"no valid signature by a trusted key (trusted key ids {sorted(by_id)}; "
                                        f"signed by key ids [{', '.join(seen)}])")
