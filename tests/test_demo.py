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
