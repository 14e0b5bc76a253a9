"""The one model definition of the Tierline family: a small decoder-only transformer.

The teacher (cloud), the distilled student (edge) and the pruned device model are
all this class with different `GPTConfig`s. Pruning shrinks `n_layer`, `n_head`
and `ffn_hidden` for real, so a pruned model is simply a smaller config.

The forward pass follows the Hugging Face / optimum decoder convention so that the
ONNX export has the standard names: it takes `input_ids`, `attention_mask` (over
past + new tokens), `position_ids` and `past_key_values`, and returns `logits`
and the `present` key/values.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from tierline_shared.models.gpt_config import GPTConfig

__all__ = ["GPT", "GPTConfig", "build_mask", "load_model", "save_model"]

KV = tuple[torch.Tensor, torch.Tensor]  # (B, nh, S, hd) each


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        inner = cfg.n_head * cfg.head_dim
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q = nn.Linear(cfg.n_embd, inner)
        self.k = nn.Linear(cfg.n_embd, inner)
        self.v = nn.Linear(cfg.n_embd, inner)
        self.proj = nn.Linear(inner, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, P+T, hd)
            v = torch.cat([past[1], v], dim=2)
        if mask is None:  # training: right-padded rows, plain causal attention (fused kernel)
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, P+T)
            att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
            y = F.softmax(att, dim=-1) @ v  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.proj(y), (k, v)

class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.ffn_hidden)
        self.out = nn.Linear(cfg.ffn_hidden, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, past):
        a, present = self.attn(self.ln1(x), mask, past)
        x = x + a
        return x + self.mlp(self.ln2(x)), present

def build_mask(
    attention_mask: torch.Tensor, q_len: int, window: int
) -> torch.Tensor:
    """(B, 1, T, P+T) boolean mask: causal, no padding keys, and at most `window` keys back.

    attention_mask is (B, P+T) with 1 for real tokens; the new tokens are the last T.
    """
    S = attention_mask.shape[1]
    q_idx = torch.arange(S - q_len, S, device=attention_mask.device).unsqueeze(1)  # (T, 1)
    k_idx = torch.arange(S, device=attention_mask.device).unsqueeze(0)  # (1, S)
    allowed = k_idx <= q_idx
    if window > 0:
        allowed = allowed & (q_idx - k_idx < window)
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    mask = allowed[None, None] & keys
    # a fully padded query row (left padding) would softmax over nothing: let it see itself
    diag = (k_idx == q_idx)[None, None]
    return mask | diag


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, P+T)
        position_ids: torch.Tensor | None = None,  # (B, T)
        past_key_values: list[KV] | None = None,  # n_layer x (B, nh, P, hd)
        attention_window: int | None = None,  # None: the config's window
    ) -> tuple[torch.Tensor, list[KV]]:
        B, T = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values else 0
        window = self.cfg.attention_window if attention_window is None else attention_window
        if attention_mask is None and P == 0 and (window == 0 or window >= T) and position_ids is None:
            # the training path: no cache, no padding on the left, causal only
            x = self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))
            for block in self.blocks:
                x, _ = block(x, None, None)
            return self.lm_head(self.ln_f(x)), []
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        mask = build_mask(attention_mask, T, window)
        x = self.wte(input_ids) + self.wpe(position_ids)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, mask, past_key_values[i] if past_key_values else None)
            presents.append(present)
        return self.lm_head(self.ln_f(x)), presents  # logits (B, T, vocab)

def save_model(model: GPT, directory: str | Path) -> None:
    """config.json + model.safetensors, the cloud artifact format."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.cfg.to_json(directory / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))


def load_model(directory: str | Path) -> GPT:
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = GPTConfig.from_json(directory / "config.json")
    model = GPT(cfg)
    try:
        state = load_file(str(directory / "model.safetensors"))
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{directory / 'model.safetensors'}: not a readable safetensors file ({exc})") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory / 'model.safetensors'}: weights do not match config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.eval()
    return model
