"""A model's config.json, whichever definition wrote it: a Llama-family decoder in Hugging Face's format
(shared/models/llama.py), or the project's older GPT (shared/models/gpt.py, until its family is rebuilt).

Both expose what the engines and exports read: `layers`, `kv_heads`, `head_dim`, `vocab_size`,
`context`, `window_limit`, `num_params()`. Importable without torch (the device tier has none).
"""

from __future__ import annotations

import json
from pathlib import Path

from tierline_shared.models.gpt_config import GPTConfig
from tierline_shared.models.llama import DecoderConfig

ModelConfig = GPTConfig | DecoderConfig


def config_from_dict(data: dict, where: str | Path) -> ModelConfig:
    """A Hugging Face config (it names its `architectures`) or a GPTConfig; ValueError naming `where`."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: not a JSON object")
    if "architectures" in data or "model_type" in data:
        return DecoderConfig.from_hf(data, where)
    known = set(GPTConfig.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown config keys {sorted(unknown)}")
    try:
        return GPTConfig(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return config_from_dict(data, path)
