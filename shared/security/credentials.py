"""The operator's credentials directory, made in one step (`tierline creds init`, and every `Stack`).

| file | what | who holds it |
|---|---|---|
| `identities.json`, `nats-auth.conf` | public nkeys; the server's `authorization` block | the NATS server |
| `<identity>.nk` | one process's NATS identity (seed, 0600) | that process only (a board: its own) |
| `update-signing.key` | the Ed25519 key that signs model updates (0600) | the operator's machine only |
| `update-signing.pub` | its public key (`ed25519:...`), pinned in boards' `device_agent.update_keys` | every board |
| `ca.pem` | the CA that signed the server's certificate | every client (`nats.tls_ca`) |
| `ca-key.pem`, `server.pem`, `server-key.pem` | the CA's key, the server's certificate and key | the NATS server |

Existing files are kept, so running it again adds what is missing and changes nothing else, but for
`nats-auth.conf`, which is derived from `identities.json` and written again when this version of Tierline gives a
role other permissions (after an upgrade: run it again, then reload nats-server).
"""

from __future__ import annotations

from pathlib import Path

from tierline_shared.security import signing, tls
from tierline_shared.security.identities import IdentityStore
from tierline_shared.wire import TIERS

SIGNING_KEY = "update-signing.key"
SIGNING_PUB = "update-signing.pub"
LOOPBACK = ("127.0.0.1", "localhost")


def init_credentials(directory: str | Path, tiers=TIERS, tls_hosts=LOOPBACK) -> dict:
    """Identities for the operator, the router and each tier; the update signing key; a CA and the server's
    certificate for `tls_hosts` (none when empty). Returns the paths and the signing public key."""
    d = Path(directory)
    store = IdentityStore(d)
    identities = store.init(tiers)
    key_path = d / SIGNING_KEY
    if not key_path.exists():
        signing.write_private_key(key_path, signing.generate_key())
    public = signing.public_key_text(signing.read_private_key(key_path))
    (d / SIGNING_PUB).write_text(public + "\n")
    out = {"directory": str(d), "identities": identities, "nats_auth": str(store.auth_conf),
           "update_signing_key": str(key_path), "update_key": public}
    if tls_hosts:
        ca, ca_key = d / "ca.pem", d / "ca-key.pem"
        if not (ca.exists() and ca_key.exists()):
            ca, ca_key = tls.make_ca(d)
        cert, key = d / "server.pem", d / "server-key.pem"
        if not (cert.exists() and key.exists()):
            cert, key = tls.make_server_cert(d, ca, ca_key, hosts=tuple(tls_hosts))
        out.update(tls_ca=str(ca), tls_cert=str(cert), tls_key=str(key))
    return out
