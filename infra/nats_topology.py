"""NATS beyond one machine: a hub cluster, and edge sites joined to it as leaf nodes (docs/DEPLOY.md).

NATS already is the distributed engine for this shape: a cluster of three hub servers (full
mesh routes, JetStream domain `hub`), and at each site one server that joins the hub as a leaf
node with a JetStream domain of its own, so the site's boards and tiers talk to their local
server and keep working when the link to the hub is cut. Queue groups prefer local responders,
across a leaf connection too: a site's requests to `tierline.edge.infer` stay at the site while
its edge tier is up. Every server includes the same generated `nats-auth.conf` (one identity
per role, shared/security/identities.py) and speaks TLS to clients; routes authenticate with a
generated password; a site's leaf connection authenticates as `leaf-<site>`
with a password of its own (`leaf-<site>.secret` in the credentials directory) and is TLS too.

`topology_confs` builds every server's configuration; `write_topology` writes them (`tierline nats
config`, and the examples in infra/nats/, checked with `nats-server -t` in the tests);
`NatsNode` runs one of them for the tests, on loopback.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from tierline_infra.supervisor import NatsServer
from tierline_shared.security.identities import AUTH_CONF
from tierline_shared.security.signing import write_secret_file

HUB = "hub"  # the hub cluster's name and JetStream domain
ROUTE_USER = "route"


@dataclass
class Ports:
    """One server's listening ports (0 in a config = any free one; the tests pick free ones)."""

    client: int
    route: int = 0  # hub servers only
    leaf: int = 0  # hub servers only: where sites connect


@dataclass
class Topology:
    """A hub of len(hub) servers and one leaf server per site, on `host`."""

    hub: list[Ports]
    sites: dict[str, Ports] = field(default_factory=dict)
    host: str = "127.0.0.1"
    route_password: str = field(default_factory=lambda: secrets.token_hex(16))

    def client_urls(self, site: str | None = None) -> list[str]:
        """What a process at the hub (site None) or at a site lists as `nats.url`."""
        ports = [self.sites[site]] if site else self.hub
        return [f"tls://{self.host}:{p.client}" for p in ports]


def leaf_identity(site: str) -> str:
    return f"leaf-{site}"


def _tls(creds: Path) -> str:
    return f'tls {{ cert_file: "{creds / "server.pem"}", key_file: "{creds / "server-key.pem"}", timeout: 5 }}'


def hub_conf(t: Topology, i: int, creds: Path, store_dir: Path, auth_include: str) -> str:
    """Hub server `i`: clients (TLS, identities), routes to the other hub servers, leaf connections from sites."""
    me = t.hub[i]
    routes = [f"nats-route://{ROUTE_USER}:{t.route_password}@{t.host}:{p.route}" for j, p in enumerate(t.hub)
              if j != i]
    leaf_users = [{"user": leaf_identity(s), "password": leaf_secret(creds, s)} for s in t.sites]
    return "\n".join([
        f"server_name: {HUB}-{i}",
        f"listen: {t.host}:{me.client}",
        f'include "{auth_include}"',
        _tls(creds),
        f"cluster {{ name: {HUB}, listen: {t.host}:{me.route}, routes: {json.dumps(routes)},",
        f'  authorization {{ user: {ROUTE_USER}, password: "{t.route_password}" }} }}',
        f"leafnodes {{ listen: {t.host}:{me.leaf}, {_tls(creds)},",
        f"  authorization {{ users: {json.dumps(leaf_users)} }} }}",
        f'jetstream {{ store_dir: "{store_dir}", domain: {HUB} }}',
        "",
    ])


def leaf_conf(t: Topology, site: str, creds: Path, store_dir: Path, auth_include: str) -> str:
    """A site's server: its clients (TLS, identities), a leaf connection to every hub server, its own domain."""
    me = t.sites[site]
    login = f"{leaf_identity(site)}:{leaf_secret(creds, site)}"
    remote = {"urls": [f"nats-leaf://{login}@{t.host}:{p.leaf}" for p in t.hub],
              "tls": {"ca_file": str(creds / "ca.pem")}}
    return "\n".join([
        f"server_name: site-{site}",
        f"listen: {t.host}:{me.client}",
        f'include "{auth_include}"',
        _tls(creds),
        f'leafnodes {{ reconnect: "1s", remotes: [{json.dumps(remote)}] }}',
        f'jetstream {{ store_dir: "{store_dir}", domain: {site} }}',
        "",
    ])


def leaf_secret(creds: Path, site: str) -> str:
    """A site's leaf password (`leaf-<site>.secret` in the credentials directory, made on first use, 0600).
    Not a client identity: the hub's `leafnodes` block alone accepts it, so it opens a leaf connection and
    nothing else (nats-server's leaf authorization takes users and passwords, one per site)."""
    path = creds / f"{leaf_identity(site)}.secret"
    if not path.exists():
        write_secret_file(path, secrets.token_hex(24).encode() + b"\n")
    return path.read_text().strip()


def topology_confs(t: Topology, creds: Path, out: Path) -> dict[str, str]:
    """name -> configuration text, for servers whose config files live in `out`."""
    creds = creds.resolve()
    include = os.path.relpath(creds / AUTH_CONF, out.resolve())  # nats-server includes relative to the file
    confs = {f"{HUB}-{i}": hub_conf(t, i, creds, out.resolve() / "jetstream" / f"{HUB}-{i}", include)
             for i in range(len(t.hub))}
    confs.update({f"site-{s}": leaf_conf(t, s, creds, out.resolve() / "jetstream" / f"site-{s}", include)
                  for s in t.sites})
    return confs


def write_topology(t: Topology, creds: Path, out: Path) -> list[Path]:
    """Every server's `<name>.conf` in `out` (secrets inside: mode 0600)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in topology_confs(t, creds, out).items():
        paths.append(write_secret_file(out / f"{name}.conf", text.encode()))
    return paths


class NatsNode(NatsServer):
    """One server of a topology, run from its generated config (restartable on the same ports)."""

    def __init__(self, conf: Path, port: int, credentials: Path):
        super().__init__(conf.parent, credentials=credentials)
        self.conf, self.port = conf, port

    def start(self) -> "NatsNode":
        self._launch(self.conf)
        return self


class Servers:
    """Running servers of a topology, as a `Stack` uses its NATS (`Stack(nats=...)`): the URLs a process
    at the hub (or at one site) lists, the credentials, a reload of all; started and stopped by the caller."""

    def __init__(self, nodes: list[NatsNode], credentials: Path, jetstream: bool = True):
        self.nodes, self.credentials, self.jetstream = nodes, credentials, jetstream
        self.user = self.password = ""

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def start(self) -> "Servers":
        return self  # already running

    def stop(self) -> None:
        pass  # the caller's

    def reload(self) -> None:
        for n in self.nodes:
            n.reload()


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def loopback_topology(hub: int = 3, sites=()) -> Topology:
    """A topology on free loopback ports (tests, `tierline nats config` without ports)."""
    ports = iter(free_ports(3 * hub + len(sites)))
    return Topology([Ports(next(ports), next(ports), next(ports)) for _ in range(hub)],
                    {s: Ports(next(ports)) for s in sites})


def start_topology(t: Topology, creds: Path, out: Path) -> dict[str, NatsNode]:
    """Every server of `t` running (hub first), from configs written in `out`; name -> node."""
    paths = write_topology(t, creds, out)
    nodes = {}
    ports = {f"{HUB}-{i}": p.client for i, p in enumerate(t.hub)} | {f"site-{s}": p.client for s, p in t.sites.items()}
    try:
        for path in paths:
            name = path.stem
            nodes[name] = NatsNode(path, ports[name], creds).start()
    except BaseException:
        for n in nodes.values():
            n.stop()
        raise
    return nodes


CLIENT_PORT, ROUTE_PORT, LEAF_PORT = 4222, 6222, 7422  # NATS's customary ports, the first hub server's


def standard_topology(hub: int, sites, host: str = "127.0.0.1", site_port: int = CLIENT_PORT + 10) -> Topology:
    """NATS's customary ports, counting up per server, so a hub and sites fit on one machine (docs/DEPLOY.md);
    on separate machines every server can keep the first ones."""
    return Topology([Ports(CLIENT_PORT + i, ROUTE_PORT + i, LEAF_PORT + i) for i in range(hub)],
                    {s: Ports(site_port + k) for k, s in enumerate(sites)}, host=host)
