"""The cloud backend: the full-precision PyTorch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.engine import Engine, EngineInfo, Past
from shared.model import GPT, load_model
from shared.tokenizer import CharTokenizer


class TorchEngine(Engine):
    def __init__(self, model: GPT, tokenizer: CharTokenizer, info: EngineInfo, device: str = "cpu"):
        super().__init__(tokenizer, info)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def load(cls, directory: str | Path, tokenizer: CharTokenizer, tier: str = "cloud",
             model_name: str = "tierline", version: str = "0", device: str = "cpu") -> "TorchEngine":
        directory = Path(directory)
        model = load_model(directory)
        _check_vocab(model.cfg.vocab_size, tokenizer, directory)
        size = (directory / "model.safetensors").stat().st_size
        info = EngineInfo(tier, model_name, version, model.num_params(), size,
                          model.cfg.block_size, model.cfg.window_limit)
        return cls(model, tokenizer, info, device)

    @torch.inference_mode()
    def _forward(self, input_ids, attention_mask, position_ids, past):
        d = self.device
        logits, present = self.model(
            torch.from_numpy(input_ids).to(d),
            torch.from_numpy(attention_mask).to(d),
            torch.from_numpy(position_ids).to(d),
            past,
        )
        return logits[:, -1:, :].float().cpu().numpy(), present

    def _trim_past(self, past: Past, keep: int) -> Past:
        return [(k[:, :, -keep:], v[:, :, -keep:]) for k, v in past]


def _check_vocab(model_vocab: int, tokenizer: CharTokenizer, where: Path) -> None:
    if model_vocab != tokenizer.vocab_size:
        raise ValueError(
            f"{where}: model vocabulary ({model_vocab}) does not match the tokenizer's ({tokenizer.vocab_size})"
        )
