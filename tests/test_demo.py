"""`make demo`: the whole platform starts, serves a workload through the router, and stops.

Its own module, so that no other test's platform is running while it looks for leftovers.
"""

from tests.conftest import processes_with, run_cli


def test_demo_runs_the_whole_platform_and_leaves_nothing_behind(tiny_family):
    proc = run_cli("demo", "--models", str(tiny_family), "--n", "24", "--concurrency", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Tierline demo: 24 requests" in proc.stdout and "of sending everything to the cloud" in proc.stdout
    assert "completed, 60 completed, 0 failed of 60" in " ".join(proc.stdout.split())  # its batch, every line
    leftover = processes_with(lambda args: b"--manifest" in args and any(b"/tierline-" in a for a in args))
    assert not leftover



def test_a_tier_that_cannot_start_stops_the_tiers_starting_beside_it(tiny_family, tmp_path):
    """The stack starts its tiers side by side: one that exits before it is ready fails the start with its log's
    tail, and the others, still loading, are stopped with it (their NATS stays up here: a tier left running would
    stay, not exit for want of it)."""
    import pytest

    from tierline_infra.supervisor import NatsServer, Stack

    class KeptNats(NatsServer):
        def stop(self) -> None:  # the test's, stopped at its end
            pass

    nats = KeptNats(tmp_path)
    stack = Stack(tiny_family, workdir=tmp_path, tiers=("device", "cloud", "edge"), secure=False, nats=nats,
                  overrides={"tiers.edge.engine_cpus": [4000]})  # no such CPU here: the edge exits 2
    try:
        with pytest.raises(RuntimeError) as err:
            stack.start()
        assert "edge-0 exited with 2 before it was ready" in str(err.value) and "engine_cpus" in str(err.value)
        manifest = str(tmp_path / "manifest.yaml").encode()
        assert not processes_with(lambda args: manifest in args) and not stack.procs  # the device and cloud tiers
    finally:
        NatsServer.stop(nats)
