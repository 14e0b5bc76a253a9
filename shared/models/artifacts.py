"""Model artifacts on disk: the manifest, sha256 checks, model cards, loading an engine.

A models directory holds `manifest.json`, the shared `tokenizer.json` and one folder
per tier (`cloud/`, `edge/`, `device/`), each with its `config.json`, the weights
in the tier's runtime format and a model card. Every file an engine reads is
listed in the manifest with its sha256; loading checks them first, so a swapped
or corrupt file is refused before any runtime touches it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.runtime.engine import Engine

MANIFEST = "manifest.json"
TIERS = ("cloud", "edge", "device")
# The runtime format each tier serves.
TIER_FORMATS = {"cloud": "safetensors", "edge": "onnx-int8", "device": "tflite"}
_CHUNK = 1 << 20  # bytes read at a time when hashing


class ArtifactError(ValueError):
    """A missing, corrupt or mismatched artifact; the message names the file."""


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(root: Path, path: Path) -> dict[str, Any]:
    return {"path": str(path.relative_to(root)), "sha256": sha256_of(path), "bytes": path.stat().st_size}


def load_manifest(models_dir: str | Path) -> dict[str, Any]:
    path = Path(models_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest not found (build models with `make models`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), dict):
        raise ArtifactError(f"{path}: no 'artifacts' object")
    return manifest


def verify_file(models_dir: Path, entry: dict[str, Any]) -> Path:
    """The file's path once its sha256 matches the manifest entry."""
    path = models_dir / entry["path"]
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (listed in {models_dir / MANIFEST})")
    actual = sha256_of(path)
    if actual != entry["sha256"]:
        raise ArtifactError(
            f"{path}: sha256 {actual[:12]}… does not match the manifest's {entry['sha256'][:12]}…"
        )
    return path


def tier_entry(manifest: dict[str, Any], tier: str, models_dir: Path) -> dict[str, Any]:
    if tier not in TIERS:
        raise ArtifactError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
    entry = manifest["artifacts"].get(tier)
    if not entry:
        raise ArtifactError(f"{models_dir / MANIFEST}: no artifact for tier {tier!r}")
    return entry


def load_tokenizer(models_dir: str | Path, manifest: dict[str, Any] | None = None) -> TextTokenizer:
    models_dir = Path(models_dir)
    manifest = manifest or load_manifest(models_dir)
    path = verify_file(models_dir, manifest["artifacts"]["tokenizer"])
    try:
        return TextTokenizer.load(path)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None


def load_engine(models_dir: str | Path, tier: str, threads: int | None = None, device: str = "cpu") -> Engine:
    """The tier's engine, after every file it reads has passed its sha256 check."""
    models_dir = Path(models_dir)
    manifest = load_manifest(models_dir)
    entry = tier_entry(manifest, tier, models_dir)
    tok = load_tokenizer(models_dir, manifest)
    weights = verify_file(models_dir, entry["weights"])
    verify_file(models_dir, entry["config"])
    name, version = manifest.get("model_name", "tierline"), manifest.get("version", "0")
    try:
        if entry["format"] == "safetensors":
            from tierline_cloud_node.engine import TorchEngine

            return TorchEngine.load(weights.parent, tok, tier, name, version, device=device, threads=threads)
        if entry["format"].startswith("onnx"):
            from tierline_edge_node.engine import OnnxEngine

            return OnnxEngine.load(weights, tok, tier, name, version, threads=threads)
        if entry["format"] == "tflite":
            from tierline_device_agent.engine import LiteRTEngine

            return LiteRTEngine.load(weights, tok, tier, name, version, threads=threads)
    except ArtifactError:
        raise
    except (ValueError, OSError) as exc:
        raise ArtifactError(str(exc)) from None
    raise ArtifactError(f"{models_dir / MANIFEST}: unknown format {entry['format']!r} for tier {tier!r}")


def write_card(directory: Path, card: dict[str, Any]) -> None:
    """card.json (read by tools) and card.md (read by people)."""
    (directory / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    lines = [f"# Model card: {card['tier']} ({card['format']})", ""]
    lines += [f"- **{k}**: {v}" for k, v in card.items() if k not in ("training", "accuracy", "tier")]
    if card.get("accuracy"):
        acc = card["accuracy"]
        lines += ["", "## Accuracy (test split, exact match)", "",
                  "| level | " + " | ".join(acc["by_level"]) + " | all |",
                  "|---|" + "---|" * (len(acc["by_level"]) + 1),
                  "| accuracy | " + " | ".join(f"{v:.3f}" for v in acc["by_level"].values())
                  + f" | {acc['accuracy']:.3f} |", "", f"n = {acc['n']}"]
    if card.get("training"):
        lines += ["", "## Training", "", "```json", json.dumps(card["training"], indent=2), "```"]
    (directory / "card.md").write_text("\n".join(lines) + "\n")
