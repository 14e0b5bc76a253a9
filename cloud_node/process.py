"""The cloud tier as a process: the full-precision teacher (PyTorch) behind the shared servicer."""

from __future__ import annotations

from tierline_cloud_node.engine import TorchEngine, load_engine
from tierline_shared.serving.process import TierProcess, run


class CloudProcess(TierProcess):
    tier = "cloud"

    def load_engine(self) -> TorchEngine:
        return load_engine(self.manifest.models_path, threads=self.config.threads)


def main(argv: list[str] | None = None) -> int:
    return run(CloudProcess, argv)
