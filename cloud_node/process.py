"""The cloud tier as a process: the full-precision teacher (PyTorch) behind the shared servicer."""

from __future__ import annotations

from tierline_cloud_node.engine import load_engine
from tierline_shared.serving.process import TierProcess, run


class CloudProcess(TierProcess):
    tier = "cloud"
    loader = staticmethod(load_engine)


def main(argv: list[str] | None = None) -> int:
    return run(CloudProcess, argv)
