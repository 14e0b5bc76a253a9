"""The edge tier as a process: the distilled, int8-quantized student (ONNX Runtime) behind the shared servicer."""

from __future__ import annotations

from tierline_edge_node.engine import OnnxEngine, load_engine
from tierline_shared.serving.process import TierProcess, run


class EdgeProcess(TierProcess):
    tier = "edge"

    def load_engine(self) -> OnnxEngine:
        return load_engine(self.manifest.models_path, threads=self.config.threads)


def main(argv: list[str] | None = None) -> int:
    return run(EdgeProcess, argv)
