"""Training without padding: the model's forward on a batch's real tokens only (training code, not serving).

About a third of a training batch's positions are padding. `forward_packed` runs the
embeddings, norms, projections and the MLP on the real tokens only, as one (N, d) matrix,
row after row; attention alone needs rows, so each group of `group_rows` consecutive rows
is laid out again, padded to its own longest row (sort the rows by length and the groups
waste little). The result is the padded forward's, token for token (tests/test_model.py).
It reads the layers of tierline_shared.models.llama.Decoder (rotary positions from each token's
position in its row); inference and the exports use the model's own `forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from tierline_shared.models.llama import Attention, Decoder, apply_rotary, build_mask, rotary


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


def forward_packed(model: Decoder, input_ids: torch.Tensor, packing: Packing, select: torch.Tensor) -> torch.Tensor:
    """input_ids (N,) are the real tokens of right-padded rows, row after row (see Packing); returns the
    logits (select.sum(), vocab) at the selected tokens only."""
    cfg = model.cfg
    cos, sin = rotary(packing.positions.to(input_ids.device)[None], cfg)
    cos, sin = cos[0, 0][:, None], sin[0, 0][:, None]  # (N, 1, hd): per token, broadcast over heads
    x = model.model.embed_tokens(input_ids)
    for layer in model.model.layers:
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, packing, cfg.sliding_window)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x[select]))


def _attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packing: Packing,
               window: int) -> torch.Tensor:
    """x: (N, hidden), the real tokens of right-padded rows; causal attention within each row."""
    N = x.shape[0]
    q = apply_rotary(attn.q_proj(x).view(N, attn.n_head, attn.head_dim), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(N, attn.n_kv, attn.head_dim), cos, sin)
    v = attn.v_proj(x).view(N, attn.n_kv, attn.head_dim)
    group = attn.n_head // attn.n_kv
    out = []
    for g in packing.groups:
        qg, kg, vg = (_rows(t, g) for t in (q, k, v))
        if group > 1:
            kg, vg = kg.repeat_interleave(group, dim=1), vg.repeat_interleave(group, dim=1)
        if 0 < window < g.width:  # a sliding window: an explicit band mask (the fused kernel is causal only)
            band = build_mask(torch.ones(1, g.width, dtype=torch.long, device=x.device), g.width, window)[0]
            y = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=band)
        else:  # padding comes after a row's tokens: causal attention never sees it
            y = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        out.append(y.transpose(1, 2).reshape(g.rows * g.width, -1).index_select(0, g.index))
    return attn.o_proj(torch.cat(out))


def _rows(t: torch.Tensor, g: RowGroup) -> torch.Tensor:
    """A group's tokens of t (N, heads, hd) as (rows, heads, width, hd), zeros after each row."""
    _, heads, hd = t.shape
    laid = t.new_zeros(g.rows * g.width, heads, hd).index_copy(0, g.index, t[g.start: g.end])
    return laid.view(g.rows, g.width, heads, hd).transpose(1, 2)
