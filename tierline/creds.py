"""`tierline creds init`: the operator's NATS identities, update signing key and TLS certificates.

One directory (shared/security/credentials.py says what each file is and who holds it): point
the manifest's `nats.credentials` at it and `nats.tls_ca` at its `ca.pem`, include its
`nats-auth.conf` in nats-server's configuration (with a `tls` block naming `server.pem` and
`server-key.pem`), and pin the printed `update_key` in each board's `device_agent.update_keys`.
Boards get their own identity with `tierline devices provision`.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub, parser_class) -> dict:
    """Register `creds init` on the `tierline` subparsers; returns its handler."""
    creds = sub.add_parser("creds", help="NATS identities per role, the update signing key, TLS certificates")
    csub = creds.add_subparsers(dest="action", required=True, parser_class=parser_class)
    init = csub.add_parser("init", help="write (or complete) a credentials directory; existing files are kept")
    init.add_argument("--out", type=Path, required=True, help="the directory (created; secrets are mode 0600)")
    init.add_argument("--tls-host", action="append", default=None, metavar="HOST",
                      help="a name or IP the NATS server's certificate is for (repeat; default 127.0.0.1 and "
                           "localhost)")
    init.add_argument("--no-tls", action="store_true", help="no CA or server certificate")
    return {("creds", "init"): cmd_init}


def cmd_init(args) -> int:
    from tierline.cli import UsageError
    from tierline_shared.security.credentials import LOOPBACK, init_credentials

    hosts = () if args.no_tls else tuple(args.tls_host or LOOPBACK)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    try:
        made = init_credentials(args.out, tls_hosts=hosts)
    except OSError as exc:  # no permission, a full disk, a file in the way
        raise UsageError(f"--out {args.out}: cannot write the credentials there ({exc.strerror or exc})") from None
    print(json.dumps(made, indent=2))
    return 0
