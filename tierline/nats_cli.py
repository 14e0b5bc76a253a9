"""`tierline nats config`: nats-server configurations for a hub cluster and edge sites (leaf nodes).

Writes `hub-<i>.conf` and `site-<name>.conf` (infra/nats_topology.py) from the operator's credentials
directory (`tierline creds init`): every server includes its `nats-auth.conf` (one identity per role) and
its TLS certificate. Start each with `nats-server -c FILE`; docs/DEPLOY.md walks through it.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub, parser_class) -> dict:
    from tierline.cli import positive_int

    n = sub.add_parser("nats", help="nats-server configurations: a hub cluster, edge sites as leaf nodes")
    nsub = n.add_subparsers(dest="action", required=True, parser_class=parser_class)
    c = nsub.add_parser("config", help="write hub-<i>.conf and site-<name>.conf (checked with nats-server -t)")
    c.add_argument("--creds", type=Path, required=True, help="the credentials directory (tierline creds init)")
    c.add_argument("--out", type=Path, required=True, help="where the configurations go (mode 0600: secrets inside)")
    c.add_argument("--hub", type=positive_int("--hub"), default=3, help="hub servers (a cluster; default 3)")
    c.add_argument("--site", action="append", default=[], metavar="NAME", help="an edge site (repeat)")
    c.add_argument("--host", default="127.0.0.1", help="the address every server listens on and is reached at")
    return {("nats", "config"): cmd_config}


def cmd_config(args) -> int:
    from tierline.cli import UsageError
    from tierline_infra.nats_topology import standard_topology, write_topology
    from tierline_shared.security.identities import AUTH_CONF

    if not (args.creds / AUTH_CONF).is_file():
        raise UsageError(f"--creds: {args.creds / AUTH_CONF} not found; run `tierline creds init --out {args.creds}`")
    bad = [s for s in args.site if not s.replace("-", "").replace("_", "").isalnum()]
    if bad:
        raise UsageError(f"--site: {bad[0]!r}: letters, digits, '-' and '_' only")
    t = standard_topology(args.hub, args.site, args.host)
    paths = write_topology(t, args.creds, args.out)
    print(json.dumps({"configs": [str(p) for p in paths], "hub_urls": t.client_urls(),
                      "site_urls": {s: t.client_urls(s) for s in args.site}}, indent=2))
    return 0
