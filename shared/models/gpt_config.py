"""The model family's configuration, importable without torch (the device tier has none)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class GPTConfig:
    vocab_size: int = 249  # size of the shared tokenizer (shared/tokenizer.py)
    block_size: int = 256  # longest sequence (prompt + completion), learned positions
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    head_dim: int = 32  # width of one head; n_head * head_dim need not equal n_embd
    n_embd: int = 128  # residual stream width
    ffn_hidden: int = 512  # MLP hidden width (4 * n_embd before pruning)
    attention_window: int = 0  # 0 = full causal attention; N = attend to the last N tokens only
    dropout: float = 0.0  # training only

    def __post_init__(self):
        for f in ("vocab_size", "block_size", "n_layer", "n_head", "head_dim", "n_embd", "ffn_hidden"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"GPTConfig.{f} must be a positive int, got {v!r}")
        if not 0 <= self.attention_window <= self.block_size:
            raise ValueError(
                f"GPTConfig.attention_window must be in [0, block_size={self.block_size}], got {self.attention_window}"
            )

    # the names the engines and exports read, shared with the Llama-family DecoderConfig
    @property
    def layers(self) -> int:
        return self.n_layer

    @property
    def kv_heads(self) -> int:
        """Key/value heads: every head has its own here."""
        return self.n_head

    @property
    def context(self) -> int:
        return self.block_size

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def window_limit(self) -> int:
        """The widest attention window the model supports (its context length)."""
        return self.attention_window or self.block_size

    def num_params(self) -> int:
        """GPT(cfg).num_params() without building the model (pruning searches; the device has no torch)."""
        c = self.n_embd
        embeddings = self.vocab_size * c + self.block_size * c  # wte, wpe
        return embeddings + self.n_layer * self.block_params() + 2 * c + c * self.vocab_size  # ln_f, lm_head (untied)

    def block_params(self, n_head: int | None = None, ffn_hidden: int | None = None) -> int:
        """Parameters of one block with the given head count / MLP width (default: this config's)."""
        c, f = self.n_embd, self.ffn_hidden if ffn_hidden is None else ffn_hidden
        inner = (self.n_head if n_head is None else n_head) * self.head_dim
        norms = 2 * (2 * c)  # ln1, ln2
        attn = 3 * (c * inner + inner) + (inner * c + c)  # q, k, v, proj
        mlp = (c * f + f) + (f * c + c)  # fc, out
        return norms + attn + mlp

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "GPTConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**data)
