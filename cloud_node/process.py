"""The cloud tier as a process: the shared tier process around the torch engine, on CPU or CUDA, or around
an OpenAI-compatible serving engine the user already runs (`tiers.cloud.upstream`: cloud_node/upstream.py)."""

from __future__ import annotations

from tierline_cloud_node.upstream import UpstreamEngine, UpstreamScheduler
from tierline_shared.config.manifest import ACCELERATORS, ManifestError
from tierline_shared.runtime.engine import Engine
from tierline_shared.runtime.engine_core import Loader
from tierline_shared.serving.metrics import Metrics
from tierline_shared.serving.process import TierProcess, run
from tierline_shared.serving.servicer import TierServicer


class CloudProcess(TierProcess):
    tier = "cloud"
    accelerators = ACCELERATORS

    def load_engine(self) -> Engine:
        if self.config.upstream.url:  # a serving engine the user runs answers: no model here
            try:
                self._forward = UpstreamScheduler(self.config.upstream, self._upstream_model, self.config.batching)
            except ValueError as exc:
                raise ManifestError(f"{self.manifest.path}: tiers.cloud.{exc}") from None
            return UpstreamEngine.of(self.config.upstream, self.manifest.model_name, self._upstream_model)
        return super().load_engine()

    def engine_loader(self) -> Loader:
        """The torch engine on the accelerator named, loaded where it is called: this process imports no torch
        when the model runs in its engine core."""
        return Loader("tierline_cloud_node.engine", "load_on",
                      (self.manifest.models_path, self.config.threads, self.config.accelerator),
                      {"where": f"{self.manifest.path}: tiers.cloud.accelerator"})

    def engine_core(self):
        return None if self.config.upstream.url else super().engine_core()

    @property
    def _upstream_model(self) -> str:
        return self.config.upstream.model or self.manifest.model_name

    def make_servicer(self, engine, metrics: Metrics, scheduler=None) -> TierServicer:
        return super().make_servicer(engine, metrics, self._forward if self.config.upstream.url else scheduler)


def main(argv: list[str] | None = None) -> int:
    return run(CloudProcess, argv)
