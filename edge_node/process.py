"""The edge tier as a process: the distilled, int8-quantized student (ONNX Runtime) behind the shared servicer."""

from __future__ import annotations

from tierline_edge_node.engine import load_engine
from tierline_shared.serving.process import TierProcess, run


class EdgeProcess(TierProcess):
    tier = "edge"
    loader = staticmethod(load_engine)


def main(argv: list[str] | None = None) -> int:
    return run(EdgeProcess, argv)
