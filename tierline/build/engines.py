"""Any tier's engine from a models directory, for the offline tools that read every tier.

Each tier package loads its own model (`tierline_<tier>.engine.load_engine`); this picks the one
whose backend reads the format the models index records for the tier. The backends are imported
only when asked for, so evaluating the device model does not load torch.
"""

from __future__ import annotations

from pathlib import Path

from tierline_shared.models.artifacts import INDEX, ArtifactError, load_index, tier_entry
from tierline_shared.runtime.engine import Engine


def load_engine(models_dir: str | Path, tier: str, threads: int | None = None) -> Engine:
    models_dir = Path(models_dir)
    fmt = tier_entry(load_index(models_dir), tier, models_dir)["format"]
    if fmt.startswith("safetensors"):
        from tierline_cloud_node.engine import load_engine as torch_engine

        return torch_engine(models_dir, tier, threads=threads)
    if fmt.startswith("onnx"):
        from tierline_edge_node.engine import load_engine as onnx_engine

        return onnx_engine(models_dir, tier, threads=threads)
    if fmt.startswith("tflite"):
        from tierline_device_agent.engine import load_engine as litert_engine

        return litert_engine(models_dir, tier, threads=threads)
    raise ArtifactError(f"{models_dir / INDEX}: unknown format {fmt!r} for tier {tier!r}")
