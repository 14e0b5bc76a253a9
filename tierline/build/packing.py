"""Training without padding: the model's forward on a batch's real tokens only (training code, not serving).

About a third of a training batch's positions are padding. `forward_packed` runs the
embeddings, norms, projections and the MLP on the real tokens only, as one (N, d) matrix,
row after row; attention alone needs rows, so each group of `group_rows` consecutive rows
is laid out again, padded to its own longest row (sort the rows by length and the groups
waste little). The result is the padded forward's, token for token (tests/test_model.py).
It reads the layers of tierline_shared.models.gpt.GPT; inference and the exports use the
model's own `forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from tierline_shared.models.gpt import GPT, Attention, build_mask


@dataclass(frozen=True)
class RowGroup:
    """Consecutive rows of a packed batch, laid out again as (rows, width) for attention."""

    start: int  # first of the group's tokens in the packed order
    end: int
    rows: int
    width: int  # the group's longest row
    index: torch.Tensor  # (end - start,) each token's place in the group's rows * width layout


@dataclass(frozen=True)
class Packing:
    """A right-padded training batch without its padding: each token's position, and the row groups."""

    positions: torch.Tensor  # (N,) each token's position in its row
    groups: tuple[RowGroup, ...]

    @classmethod
    def from_lengths(cls, lengths: list[int], group_rows: int = 8) -> "Packing":
        if not lengths or min(lengths) <= 0:
            raise ValueError(f"every row needs at least one token, got lengths {lengths}")
        positions = torch.cat([torch.arange(n) for n in lengths])
        groups, start = [], 0
        for first in range(0, len(lengths), group_rows):
            chunk = lengths[first: first + group_rows]
            width = max(chunk)
            index = torch.cat([torch.arange(n) + r * width for r, n in enumerate(chunk)])
            groups.append(RowGroup(start, start + sum(chunk), len(chunk), width, index))
            start += sum(chunk)
        return cls(positions, tuple(groups))


def forward_packed(model: GPT, input_ids: torch.Tensor, packing: Packing, select: torch.Tensor) -> torch.Tensor:
    """input_ids (N,) are the real tokens of right-padded rows, row after row (see Packing); returns the
    logits (select.sum(), vocab) at the selected tokens only."""
    x = model.wte(input_ids) + model.wpe(packing.positions.to(input_ids.device))
    for block in model.blocks:
        x = x + _attention(block.attn, block.ln1(x), packing, model.cfg.attention_window)
        x = x + block.mlp(block.ln2(x))
    return model.lm_head(model.ln_f(x[select]))


def _attention(attn: Attention, x: torch.Tensor, packing: Packing, window: int) -> torch.Tensor:
    """x: (N, n_embd), the real tokens of right-padded rows; causal attention within each row."""
    inner = attn.n_head * attn.head_dim
    q, k, v = attn.q(x), attn.k(x), attn.v(x)
    dropout = attn.dropout if attn.training else 0.0
    out = []
    for g in packing.groups:
        qg, kg, vg = (_rows(attn, t, g) for t in (q, k, v))
        if 0 < window < g.width:  # a sliding window: an explicit band mask (the fused kernel is causal only)
            band = build_mask(torch.ones(1, g.width, dtype=torch.long, device=x.device), g.width, window)[0]
            y = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=band, dropout_p=dropout)
        else:  # padding comes after a row's tokens: causal attention never sees it
            y = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, dropout_p=dropout)
        out.append(y.transpose(1, 2).reshape(g.rows * g.width, inner).index_select(0, g.index))
    return attn.proj(torch.cat(out))


def _rows(attn: Attention, t: torch.Tensor, g: RowGroup) -> torch.Tensor:
    """A group's tokens of t (N, inner) as (rows, nh, width, hd), zeros after each row."""
    laid = t.new_zeros(g.rows * g.width, t.shape[1]).index_copy(0, g.index, t[g.start: g.end])
    return laid.view(g.rows, g.width, attn.n_head, attn.head_dim).transpose(1, 2)
