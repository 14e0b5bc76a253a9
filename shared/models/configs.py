"""A model's config.json: a Llama-family decoder's, in Hugging Face's format (DecoderConfig, shared/models/llama.py).

It exposes what the engines and exports read: `layers`, `kv_heads`, `head_dim`, `vocab_size`, `context`,
`window_limit`, `num_params()`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tierline_shared.models.llama import ConfigError, DecoderConfig


def config_from_dict(data: dict, where: str | Path) -> DecoderConfig:
    """A Hugging Face config's contents; ValueError (ConfigError) naming `where`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: not a JSON object")
    return DecoderConfig.from_hf(data, where)


def read_config(path: str | Path) -> DecoderConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return config_from_dict(data, path)
