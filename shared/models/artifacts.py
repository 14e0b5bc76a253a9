"""Model artifacts on disk: the models index, sha256 checks, model cards, opening a tier's files.

A models directory holds its index `manifest.json`, the shared `tokenizer.json` (with the
`tokenizer_config.json` naming its special tokens, for an imported model) and one
folder per tier (`cloud/`, `edge/`, `device/`), each with its `config.json`, the weights
in the tier's runtime format and a model card. Every file an engine reads is listed in
the index with its sha256; `open_tier` checks them first, so a swapped or corrupt file is
refused before any runtime touches it. The runtimes themselves live in the tier packages
(each has a `load_engine(models_dir)`); this module knows none of them. The YAML file that
configures a deployment is another thing: the manifest (tierline_shared.config.manifest).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.wire import TIERS

INDEX = "manifest.json"  # the models index, in every models directory
# The runtime format each tier serves.
TIER_FORMATS = {"cloud": "safetensors", "edge": "onnx-int8", "device": "tflite"}
_CHUNK = 1 << 20  # bytes read at a time when hashing
E = TypeVar("E")


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


def load_index(models_dir: str | Path) -> dict[str, Any]:
    """The models directory's index (manifest.json): every artifact with its sha256 and size."""
    path = Path(models_dir) / INDEX
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
        raise ArtifactError(f"{path}: missing (listed in {models_dir / INDEX})")
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
        raise ArtifactError(f"{models_dir / INDEX}: no artifact for tier {tier!r}")
    return entry


def load_tokenizer(models_dir: str | Path, index: dict[str, Any] | None = None) -> TextTokenizer:
    models_dir = Path(models_dir)
    index = index or load_index(models_dir)
    path = verify_file(models_dir, index["artifacts"]["tokenizer"])
    # an imported model's special tokens (the family's tokenizer has the defaults and lists none)
    config = index["artifacts"].get("tokenizer_config")
    config_path = verify_file(models_dir, config) if config else None
    try:
        return TextTokenizer.load(path, config_path, beside=False)  # only what the index lists and checks
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None


def served_context(models_dir: str | Path, tiers: tuple[str, ...] = TIERS) -> int | None:
    """The longest context (prompt + completion tokens) among these tiers' models, from their config.json;
    None when the directory cannot say (a router on a host without the models: the tiers still check)."""
    from tierline_shared.models.configs import read_config

    models_dir = Path(models_dir)
    try:
        index = load_index(models_dir)
        contexts = [read_config(models_dir / tier_entry(index, t, models_dir)["config"]["path"]).context
                    for t in tiers if t in index["artifacts"]]
    except (ValueError, KeyError, OSError):
        return None
    return max(contexts) if contexts else None


@dataclass(frozen=True)
class TierFiles:
    """One tier's artifact, every file checked against the index: what a backend loads."""

    tier: str
    format: str  # TIER_FORMATS' value for the family that built it (e.g. "onnx-int8")
    weights: Path
    config: Path
    tokenizer: TextTokenizer
    model_name: str
    version: str


def open_tier(models_dir: str | Path, tier: str) -> TierFiles:
    """The tier's files once each has passed its sha256 check."""
    models_dir = Path(models_dir)
    index = load_index(models_dir)
    entry = tier_entry(index, tier, models_dir)
    tok = load_tokenizer(models_dir, index)
    weights = verify_file(models_dir, entry["weights"])
    for shard in entry.get("shards", ()):  # a sharded checkpoint: weights is its index, each shard listed
        verify_file(models_dir, shard)
    config = verify_file(models_dir, entry["config"])
    for key in TIER_EXTRAS:
        if key in entry:  # an index written before they were listed has none
            verify_file(models_dir, entry[key])
    return TierFiles(tier, entry["format"], weights, config, tok, index.get("model_name", "tierline"),
                     index.get("version", "0"))


def load_with(models_dir: str | Path, tier: str, formats: tuple[str, ...], backend: Callable[[TierFiles], E]) -> E:
    """`backend(files)` for the tier's checked files; a format the backend cannot read or a file it
    refuses becomes ArtifactError naming the file (the CLI and the processes print it as one line)."""
    files = open_tier(models_dir, tier)
    if not files.format.startswith(formats):
        raise ArtifactError(f"{Path(models_dir) / INDEX}: tier {tier!r} is {files.format!r}; "
                            f"this backend reads {', '.join(formats)}")
    try:
        return backend(files)
    except ArtifactError:
        raise
    except (ValueError, OSError) as exc:
        raise ArtifactError(str(exc)) from None


TIER_WEIGHTS = {"cloud": "cloud/model.safetensors", "edge": "edge/model.int8.onnx", "device": "device/model.tflite"}
# files beside a tier's config that change what it serves, listed with their sha256 when there (index key: file):
# the end tokens (read_config reads them with the config), the chat template (router/chat.py)
TIER_EXTRAS = {"generation_config": "generation_config.json", "chat_template": "chat_template.jinja"}


def write_index(out: Path, model_name: str, version: str, family: str, **extra: Any) -> dict[str, Any]:
    """Write `out`'s index (manifest.json) over the files there: the tokenizer (and its config, if there is
    one at the top), each tier's weights (a sharded cloud checkpoint: its index and every shard), config and
    cards, each with sha256 and size. `extra` goes into the index as it is (e.g. answer_marker)."""
    artifacts: dict[str, Any] = {"tokenizer": file_entry(out, out / "tokenizer.json")}
    if (out / "tokenizer_config.json").is_file():
        artifacts["tokenizer_config"] = file_entry(out, out / "tokenizer_config.json")
    for tier, rel in TIER_WEIGHTS.items():
        weights = out / rel
        entry: dict[str, Any] = {"format": TIER_FORMATS[tier]}
        sharded = weights.with_name(weights.name + ".index.json")
        if tier == "cloud" and not weights.is_file() and sharded.is_file():
            shards = sorted(set(json.loads(sharded.read_text())["weight_map"].values()))
            entry["weights"] = file_entry(out, sharded)
            entry["shards"] = [file_entry(out, weights.parent / name) for name in shards]
        else:
            entry["weights"] = file_entry(out, weights)
        entry["config"] = file_entry(out, out / tier / "config.json")
        for key, name in TIER_EXTRAS.items():
            if (out / tier / name).is_file():
                entry[key] = file_entry(out, out / tier / name)
        for card in ("card.json", "card.md"):
            if (out / tier / card).exists():
                entry[card.replace(".", "_")] = file_entry(out, out / tier / card)
        artifacts[tier] = entry
    index = {"model_name": model_name, "version": version, "family": family, **extra, "artifacts": artifacts}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


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
