"""The YAML tier manifest: validated whole at start, errors name the file and the field."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tierline_shared.config.manifest import ManifestError, load_manifest


@pytest.fixture
def manifest(tiny_family, tmp_path):
    from tierline_shared.models.artifacts import load_index as load_models

    models = load_models(tiny_family)["artifacts"]
    data = {
        "model_name": "tierline-reasoner",
        "models_dir": str(tiny_family),
        "nats": {"url": "nats://127.0.0.1:4222", "user": "u", "password": "p"},
        "tiers": {t: {"artifact": models[t]["weights"]["path"], "sha256": models[t]["weights"]["sha256"],
                      "batching": {"max_num_seqs": 4}} for t in ("device", "edge", "cloud")},
    }
    path = tmp_path / "m.yaml"

    def write(**changes):
        d = yaml.safe_load(yaml.safe_dump(data))
        for dotted, value in changes.items():
            node = d
            *parents, leaf = dotted.split("__")
            for p in parents:
                node = node[p]
            if value is None:
                del node[leaf]
            else:
                node[leaf] = value
        path.write_text(yaml.safe_dump(d))
        return path

    return write


def test_valid_manifest_loads(manifest):
    m = load_manifest(manifest())
    assert m.tier("edge").batching.max_num_seqs == 4
    assert m.tier("cloud").batching.max_queue == 64  # the default
    assert m.tier("cloud").upstream.max_context == 0  # unknown


def test_a_confidence_threshold_map_of_one_tier_keeps_the_others_default(manifest):
    """Found by a fault hunt: `confidence_threshold: {edge: 0.3}` replaced the defaults, and the device's fell to
    0 (its answers never escalated: 0 of 40 against 40 of 40 with both given), with no word. The map is laid over
    the defaults now, for the router and a board's front door alike (both build their policy from it)."""
    from tierline_router.policy import Policy

    m = load_manifest(manifest(router={"confidence_threshold": {"edge": 0.3}}))
    assert m.router.confidence_threshold == {"device": 0.5, "edge": 0.3}
    policy = Policy.from_config(m.router)
    assert (policy.threshold("device"), policy.threshold("edge")) == (0.5, 0.3)
    assert not policy.accept("device", 0.4) and policy.accept("edge", 0.4)


def test_an_upstream_context_loads(manifest):
    m = load_manifest(manifest(tiers__cloud__upstream={"url": "http://127.0.0.1:9/v1", "max_context": 4096}))
    assert m.tier("cloud").upstream.max_context == 4096
    assert m.models_path.is_dir()


@pytest.mark.parametrize("change, message", [
    ({"tiers__edge__batchsize": 3}, "tiers.edge.batchsize: unknown key"),
    ({"tiers__edge__threads": "two"}, "tiers.edge.threads: expected int"),
    ({"tiers__edge__batching__max_queue": 0}, "tiers.edge.batching.max_queue: 0 out of range"),
    ({"tiers__edge__sha256": "0" * 64}, "tiers.edge.sha256"),
    ({"tiers__cloud__artifact": "cloud/nope.safetensors"}, "tiers.cloud.artifact: file not found"),
    ({"tiers__fog": {"artifact": "x", "sha256": "y"}}, "tiers.fog: unknown tier"),
    ({"model_name": None}, "model_name: required field missing"),
    ({"model_name": "org/my?model"}, "model_name: 'org/my?model' holds '?'"),
    ({"model_name": "tab\tname"}, "model_name: 'tab\\tname' holds a control or invisible character (U+0009)"),
    ({"model_name": "x" * 129}, "model_name: '" + "x" * 129 + "' is 129 characters"),
    ({"limits": {"max_id_chars": 8}}, "is 17 characters; limits.max_id_chars (8) refuses every request that names it"),
    ({"nats__url": 4222}, "nats.url: expected str"),
    ({"router": {"cloud_complexity": 2}}, "router.cloud_complexity: 2 out of range"),
    ({"router": {"confidence_threshold": {"cloud": 0.5}}}, "router.confidence_threshold.cloud: the top tier's"),
    # a fault hunt: 1e13 ms overflowed every deadline (INTERNAL on each call); 1e15 MB overflowed setrlimit
    ({"tiers__edge__timeout_ms": 10**13}, "tiers.edge.timeout_ms: 10000000000000 out of range"),
    ({"nats__request_timeout_ms": 10**13}, "nats.request_timeout_ms: 10000000000000 out of range"),
    ({"device_agent": {"memory_max_mb": 10**15}}, "device_agent.memory_max_mb: 1000000000000000 out of range"),
    # a fault hunt: NaN passed every range (all comparisons with it are false), inf every unbounded one
    ({"router": {"cloud_complexity": float("nan")}}, "router.cloud_complexity: nan; expected a finite number"),
    ({"tiers__edge__cost_per_1k_tokens": float("inf")}, "tiers.edge.cost_per_1k_tokens: inf; expected a finite"),
    ({"tiers__edge__engine_cpus": 1}, "tiers.edge.engine_cpus: expected a list"),
    ({"tiers__edge__engine_cpus": [0, -1]}, "tiers.edge.engine_cpus[1]: -1 out of range"),
    ({"tiers__edge__engine_cpus": [1, 1]}, "tiers.edge: engine_cpus: [1, 1] names a CPU twice"),
    ({"tiers__cloud__engine_cpus": [0], "tiers__cloud__threads": 1,
      "tiers__cloud__upstream": {"url": "http://127.0.0.1:9/v1"}},
     "tiers.cloud.engine_cpus: this host runs no model for the cloud tier (tiers.cloud.upstream)"),
    ({"tiers__edge__engine_cpus": [0], "tiers__edge__threads": 1, "tiers__edge__engine_process": False},
     "tiers.edge: engine_cpus: engine_process is false: no engine core to bind"),
    ({"tiers__edge__engine_cpus": [0]}, "tiers.edge: engine_cpus: 1 CPU(s) for threads: 2 runtime threads"),
])
def test_bad_manifest_names_the_field(manifest, change, message):
    path = manifest(**change)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)


def test_a_manifest_path_that_is_not_a_readable_text_file_is_named(tmp_path):
    """A fault hunt: a directory (or a file without permission) raised IsADirectoryError out of every command, and
    bytes that are not UTF-8 said so without naming the file."""
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe not text")
    for path in (tmp_path, binary):
        with pytest.raises(ManifestError, match="cannot read the manifest") as err:
            load_manifest(path)
        assert str(err.value).startswith(f"{path}: ")


def test_a_memory_cap_below_what_the_agent_uses_is_refused_naming_it(manifest):
    """A fault hunt: device_agent.memory_max_mb 1 crashed the agent with "can't start new thread" (a traceback)."""
    proc = subprocess.run([sys.executable, "-m", "tierline_device_agent", "--no-nats", "--manifest",
                           str(manifest(device_agent={"memory_max_mb": 1}))], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "device_agent.memory_max_mb: 1 MB leaves the agent no room" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_nats_ca_is_one_line_naming_it(manifest):
    """A fault hunt: a nats.tls_ca that is not there was a FileNotFoundError traceback (exit 1) in the edge, the
    router and the device agent, at their connect."""
    proc = subprocess.run([sys.executable, "-m", "tierline_edge_node", "--manifest",
                           str(manifest(nats__tls_ca="no-such-ca.pem"))], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nats.tls_ca: file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_a_tier_process_exits_2_on_a_bad_manifest(manifest):
    path = manifest(tiers__edge__batching__max_num_seqs=-1)
    proc = subprocess.run([sys.executable, "-m", "edge_node", "--manifest", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "tiers.edge.batching.max_num_seqs" in proc.stderr and "Traceback" not in proc.stderr


def test_the_example_manifest_matches_the_committed_models():
    from pathlib import Path

    m = load_manifest(Path(__file__).resolve().parents[1] / "infra" / "manifests" / "local.yaml")
    assert set(m.tiers) == {"device", "edge", "cloud"}


def test_accelerator_is_checked_where_the_tier_loads_its_model(manifest):
    """tiers.<tier>.accelerator: the cloud's torch backend runs on CUDA when asked (and there is one); the
    onnxruntime and LiteRT tiers say they cannot, naming the field."""
    import torch

    from tierline_cloud_node.process import CloudProcess
    from tierline_edge_node.process import EdgeProcess

    with pytest.raises(ManifestError, match="tiers.edge.accelerator: 'gpu'; allowed: cpu, cuda, auto"):
        load_manifest(manifest(tiers__edge__accelerator="gpu"))
    with pytest.raises(ManifestError, match="tiers.edge.accelerator: 'cuda' is not supported by the edge tier"):
        EdgeProcess(load_manifest(manifest(tiers__edge__accelerator="cuda")), use_nats=False).load_engine()
    from tierline_device_agent.process import DeviceProcess  # its own loader (a fault hunt: it served on "cuda")

    with pytest.raises(ManifestError, match="tiers.device.accelerator: 'cuda' is not supported by the device tier"):
        DeviceProcess(load_manifest(manifest(tiers__device__accelerator="cuda")), use_nats=False).load_engine()
    engine = CloudProcess(load_manifest(manifest(tiers__cloud__accelerator="auto")), use_nats=False).load_engine()
    assert engine.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ManifestError, match="tiers.cloud.accelerator: 'cuda', but torch sees no CUDA device"):
            CloudProcess(load_manifest(manifest(tiers__cloud__accelerator="cuda")), use_nats=False).load_engine()
        with pytest.raises(ManifestError, match="tiers.cloud.accelerator: 'cuda', but torch sees no CUDA device"):
            CloudProcess(load_manifest(manifest(tiers__cloud__accelerator="cuda")), use_nats=False).engine_core()


def _affinity(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


def _threads_affinity(pid: int) -> set[frozenset]:
    """Every thread's CPU set (threads that end meanwhile left out)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(frozenset(os.sched_getaffinity(int(tid))))
        except OSError:
            pass
    return out


def test_engine_cpus_bind_the_engine_core_and_the_tier_serves_on_the_rest(manifest, tmp_path):
    """tiers.<tier>.engine_cpus: the engine core (every thread of it) runs on those CPUs, the tier's own
    process on the others, and it still answers; a CPU this process may not use, or a tier without a core,
    is refused naming the field."""
    from tests.test_platform import _engine_cores
    from tierline_bench.load import GrpcClient
    from tierline_device_agent.process import DeviceProcess
    from tierline_edge_node.process import EdgeProcess
    from tierline_infra.supervisor import launch

    have = sorted(os.sched_getaffinity(0))
    mine = have[-1:]  # the last CPU this test may use; the tier keeps the others (none on a 1-CPU machine)
    path = manifest(tiers__edge__engine_cpus=mine, tiers__edge__threads=1)
    proc = launch("edge", [sys.executable, "-m", "edge_node", "--manifest", str(path), "--no-nats"],
                  tmp_path / "edge.log")
    try:
        [core] = _engine_cores(proc.popen.pid)
        assert _threads_affinity(core) == {frozenset(mine)}
        rest = frozenset(have[:-1]) or frozenset(have)
        assert _threads_affinity(proc.popen.pid) == {rest}
        client = GrpcClient(f"127.0.0.1:{proc.ready['grpc_port']}", 8)
        assert client.infer("Q:2+2=?\nA:").ok
        os.kill(core, signal.SIGKILL)  # a core started again is bound again (spawned by a thread on `rest`)
        deadline = time.monotonic() + 60
        while _engine_cores(proc.popen.pid) in ([], [core]):
            assert time.monotonic() < deadline, "the engine core did not start again"
            time.sleep(0.05)
        [again] = _engine_cores(proc.popen.pid)
        while not client.infer("Q:3+4=?\nA:").ok:  # answered once the new core has loaded
            assert time.monotonic() < deadline, "the new engine core did not answer"
            time.sleep(0.1)
        assert _threads_affinity(again) == {frozenset(mine)}
        assert _threads_affinity(proc.popen.pid) == {rest}
        client.close()
    finally:
        proc.close()

    unusable = max(os.cpu_count() or 1, 4095)
    with pytest.raises(ManifestError, match=rf"tiers.edge.engine_cpus: CPU {unusable} is not available"):
        EdgeProcess(load_manifest(manifest(tiers__edge__engine_cpus=[unusable], tiers__edge__threads=1)),
                    use_nats=False).engine_core()
    with pytest.raises(ManifestError, match="tiers.device.engine_cpus: the device tier runs its model in its own "
                                            "process"):
        DeviceProcess(load_manifest(manifest(tiers__device__engine_cpus=mine, tiers__device__threads=1)),
                      use_nats=False).engine_core()
