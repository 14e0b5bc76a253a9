"""The deployment files (issue 25), checked offline: the Kubernetes resources against the API's own schemas
(kubernetes-validate, strict), the manifests they carry against Tierline's schema, each process given its
own NATS identity only, and the compose file's nats-server configuration with `nats-server -t`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT
from tierline_infra.supervisor import nats_server_binary
from tierline_shared.config.manifest import load_manifest
from tierline_shared.security.credentials import init_credentials
from tierline_shared.security.identities import ROUTER, tier_identity

K8S, COMPOSE = ROOT / "infra" / "k8s", ROOT / "infra" / "compose"
K8S_VERSION = "1.37.0"
IDENTITY = {"tierline_router": ROUTER, "tierline_cloud_node": tier_identity("cloud"),
            "tierline_edge_node": tier_identity("edge"), "tierline_device_agent": tier_identity("device")}
TIER_OF = {"tierline_cloud_node": "cloud", "tierline_edge_node": "edge", "tierline_device_agent": "device"}


def _resources() -> list[tuple[Path, dict]]:
    return [(p, doc) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(p.read_text()) if doc]


def _manifest(text: str, tmp_path: Path):
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    return load_manifest(path, check_artifacts=False)


@pytest.mark.parametrize("path, resource", _resources(), ids=lambda v: v.name if isinstance(v, Path) else None)
def test_kubernetes_resources_validate_strictly(path, resource):
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_the_kustomization_deploys_every_file_and_nats_from_its_chart():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    nats = next(c for c in k["helmCharts"] if c["name"] == "nats")
    assert nats["repo"] == "https://nats-io.github.io/k8s/helm/charts/"
    config = nats["valuesInline"]["config"]
    assert config["cluster"]["enabled"] and config["cluster"]["replicas"] == 3 and config["jetstream"]["enabled"]
    assert config["nats"]["tls"]["enabled"]


def test_each_pod_runs_its_manifests_ports_with_its_own_identity_only(tmp_path):
    docs = [d for _, d in _resources()]
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    manifest = _manifest(cm["data"]["manifest.yaml"], tmp_path)
    assert manifest.auth.store == "nats" and manifest.nats.credentials and manifest.nats.tls_ca
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        c = dep["spec"]["template"]["spec"]["containers"][0]
        module = c["args"][0]
        want = manifest.router.grpc_port if module == "tierline_router" else manifest.tiers[TIER_OF[module]].grpc_port
        assert c["readinessProbe"]["grpc"]["port"] == want == c["ports"][0]["containerPort"], module
        secret = next(v["secret"] for v in dep["spec"]["template"]["spec"]["volumes"]
                      if v.get("secret", {}).get("secretName") == "tierline-creds")
        assert sorted(i["key"] for i in secret["items"]) == sorted([f"{IDENTITY[module]}.nk", "ca.pem"]), module


def test_compose_gives_each_service_its_own_identity_and_a_valid_nats_config(tmp_path):
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    manifest = _manifest((COMPOSE / "manifest.yaml").read_text(), tmp_path)
    assert set(manifest.tiers) == {"device", "edge", "cloud"}
    for name, svc in compose["services"].items():
        seeds = [v for v in svc.get("volumes", []) if v.endswith(".nk:ro") or v.startswith("./creds:")]
        if name == "nats":
            assert not seeds  # the server holds public keys and its certificate only
            continue
        seed = f"{IDENTITY[svc['command'][0]]}.nk"
        assert seeds == [f"./creds/{seed}:/etc/tierline/creds/{seed}:ro"], name
    creds = tmp_path / "creds"
    init_credentials(creds, tls_hosts=("nats", "127.0.0.1"))
    conf = tmp_path / "nats.conf"
    conf.write_text((COMPOSE / "nats.conf").read_text().replace("/etc/nats/", f"{tmp_path}/")
                    .replace('"/data"', f'"{tmp_path}/data"'))
    proc = subprocess.run([nats_server_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_each_tier_is_given_longer_to_stop_than_its_grace(tmp_path):
    """A tier stopping lets its requests in flight finish for tiers.<tier>.stop_grace_s, then answers what is left
    UNAVAILABLE and drains its link (STOP_LOOP_S at most): compose's and Kubernetes' wait before SIGKILL must cover
    both, or a rolling upgrade kills a replica in its grace and its requests get no answer at all. Compose waits
    10 s unless told (stop_grace_period), Kubernetes 30 s (terminationGracePeriodSeconds)."""
    from tierline_shared.transport.tier_service import STOP_LOOP_S

    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    manifest = _manifest((COMPOSE / "manifest.yaml").read_text(), tmp_path)
    for svc in compose["services"].values():
        if svc.get("command", [None])[0] in TIER_OF:
            tier = TIER_OF[svc["command"][0]]
            period = float(svc.get("stop_grace_period", "10s").removesuffix("s"))
            assert period >= manifest.tiers[tier].stop_grace_s + STOP_LOOP_S + 5, (tier, period)  # + closing
    docs = [d for _, d in _resources()]
    manifest = _manifest(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["manifest.yaml"], tmp_path)
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        module = pod["containers"][0]["args"][0]
        if module in TIER_OF:
            period = pod.get("terminationGracePeriodSeconds", 30)
            assert period >= manifest.tiers[TIER_OF[module]].stop_grace_s + STOP_LOOP_S, (module, period)
