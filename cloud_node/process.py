"""The cloud tier as a process: the shared tier process around the torch engine, on CPU or CUDA."""

from __future__ import annotations

from tierline_cloud_node.engine import load_engine, torch_device
from tierline_shared.config.manifest import ACCELERATORS, ManifestError
from tierline_shared.runtime.engine import Engine
from tierline_shared.serving.process import TierProcess, run


class CloudProcess(TierProcess):
    tier = "cloud"
    loader = staticmethod(load_engine)
    accelerators = ACCELERATORS

    def load_engine(self) -> Engine:
        try:
            device = torch_device(self.config.accelerator)
        except ValueError as exc:
            raise ManifestError(f"{self.manifest.path}: tiers.cloud.accelerator: {exc}") from None
        return load_engine(self.manifest.models_path, threads=self.config.threads, device=device)


def main(argv: list[str] | None = None) -> int:
    return run(CloudProcess, argv)
