"""Beyond one machine, on loopback (issue 25): a hub cluster of three real nats-servers and an edge site
joined to it as a leaf node (infra/nats_topology.py), with TLS and the per-role identities; the cloud on
the hub, the device and edge tiers and a router at the site."""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tests.conftest import run_cli
from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_infra.nats_topology import Servers, loopback_topology, start_topology
from tierline_infra.supervisor import Stack, host_share, nats_server_binary, write_manifest
from tierline_shared.security.credentials import init_credentials

TIMEOUT = 30  # seconds, each RPC
EASY = "Q:2+3=?\nA:"  # the device's (policy below)
HARD = "Q:" + "+".join("1" * 14) + "=?\nA:"  # complexity 1.0: the cloud's
LOAD = 120  # requests during a hub node's death
SITE = "s1"


def _stub(address: str):
    return pb_grpc.InferenceServiceStub(grpc.insecure_channel(address))


def _ask(stub, prompt: str, timeout: float = TIMEOUT) -> pb.InferResponse:
    return stub.Infer(pb.InferRequest(prompt=prompt, parameters=pb.Parameters(max_tokens=6)), timeout=timeout)


def test_generated_configs_pass_nats_server_t(tmp_path):
    """`tierline creds init` then `tierline nats config`: a hub of three and two sites, each config valid."""
    import json

    assert run_cli("creds", "init", "--out", str(tmp_path / "creds")).returncode == 0
    proc = run_cli("nats", "config", "--creds", str(tmp_path / "creds"), "--out", str(tmp_path / "nats"),
                   "--site", "north", "--site", "south")
    assert proc.returncode == 0, proc.stderr
    paths = [Path(p) for p in json.loads(proc.stdout)["configs"]]
    assert sorted(p.stem for p in paths) == ["hub-0", "hub-1", "hub-2", "site-north", "site-south"]
    for path in paths:
        proc = subprocess.run([nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert proc.returncode == 0 and "is valid" in proc.stderr + proc.stdout, (path, proc.stderr)
        assert path.stat().st_mode & 0o077 == 0  # passwords inside: the owner's only


@pytest.fixture
def topology(tmp_path):
    creds = tmp_path / "creds"
    init_credentials(creds)
    nodes = start_topology(loopback_topology(3, [SITE]), creds, tmp_path / "nats")
    yield creds, nodes
    for n in nodes.values():
        n.stop()


def test_killing_a_hub_node_under_load_loses_no_request(tiny_family, topology):
    creds, nodes = topology
    hub = Servers([nodes[f"hub-{i}"] for i in range(3)], creds, jetstream=False)
    overrides = {"router.confidence_threshold": {"edge": 0.0}}
    with Stack(tiny_family, tiers=("edge",), replicas={"edge": 2}, nats=hub, overrides=overrides) as s:
        router = _stub(s.router_address)
        done = []
        killed = threading.Event()
        kill_lock = threading.Lock()

        def one(i: int) -> str:
            with kill_lock:  # once, by the first thread to see a third done (two answers may land between checks)
                kill_now = len(done) >= LOAD // 3 and not killed.is_set()
                if kill_now:
                    killed.set()
            if kill_now:
                nodes["hub-0"].stop()  # under load: some processes were connected to it
            try:
                _ask(router, f"Q:{i}+4=?\nA:")
                return "ok"
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            finally:
                done.append(i)

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, range(LOAD)))
    assert killed.is_set()
    assert outcomes.count("ok") == LOAD, [o for o in outcomes if o != "ok"][:5]


def test_a_site_keeps_answering_when_its_leaf_link_is_cut(tiny_family, topology, tmp_path):
    """Cut: the site answers from its device and edge tiers, requests for the cloud fail fast and come back
    degraded; restored: the cloud answers again within seconds. The figures go to docs/DEPLOY.md."""
    creds, nodes = topology
    hub_nodes = [nodes[f"hub-{i}"] for i in range(3)]
    policy = {"router.scorer": "", "router.device_complexity": 0.3, "router.cloud_complexity": 0.9,  # heuristic
              "router.confidence_threshold": {"device": 0.0, "edge": 0.0}}
    # each host's share, as its own manifest says (what `tierline up --host FILE` runs)
    hub_m = write_manifest(tmp_path / "hub.yaml", tiny_family, Servers(hub_nodes, creds), ("cloud",),
                           {"router.enabled": False})
    site_m = write_manifest(tmp_path / "site.yaml", tiny_family, Servers([nodes[f"site-{SITE}"]], creds),
                            ("device", "edge", "cloud"), {**policy, "tiers.cloud.elsewhere": True})
    with host_share(hub_m) as hub, host_share(site_m) as site:
        assert [p.name for p in hub.procs] == ["cloud-0"]
        assert [p.name for p in site.procs] == ["device-0", "edge-0", "router"]
        router = _stub(site.router_address)
        assert _wait(lambda: _ask(router, HARD).tier == "cloud", 20), "the cloud never answered through the leaf"
        assert _ask(router, EASY).tier == "device"

        for n in hub_nodes:  # the link is cut: nothing at the hub answers
            n.stop()
        t0 = time.perf_counter()
        cut = _ask(router, HARD)
        cut_s = time.perf_counter() - t0
        assert cut.degraded and cut.tier != "cloud" and cut.choices[0].finish_reason
        assert cut_s < 5.0, cut_s  # fast: no responders, not a request timeout (10 s)
        assert _ask(router, EASY).tier == "device"

        for n in hub_nodes:
            n.start()
        t0 = time.perf_counter()
        assert _wait(lambda: _ask(router, HARD, timeout=5).tier == "cloud", 30), "the cloud did not come back"
        back_s = time.perf_counter() - t0
    print(f"\nleaf link cut: a cloud request came back degraded in {cut_s:.2f} s; "
          f"restored: the cloud answered again after {back_s:.2f} s")


def _wait(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    return False
