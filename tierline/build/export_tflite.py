"""Export the (pruned) device model, a Llama-family decoder, to .tflite with an external KV cache, for LiteRT.

The file follows the LiteRT generative convention (the layout litert-torch's own
`generative.utilities.converter` produces): one `prefill_{len}` signature per fixed
prompt length and one `decode` signature, each taking `tokens` (1, len) int32,
`input_pos` (len,) int32 and the caches `kv_cache_k_{i}` / `kv_cache_v_{i}`
(1, context, kv_heads, head_dim) float32 (kv_heads: the key/value heads; grouped-query attention stores fewer
than the query heads), and returning `logits` (1, len, vocab)
plus the updated caches under the same names.

One extra input, `kv_start` (1,) int32, makes the engine's sliding window exact: keys
at positions < kv_start are masked out. The base engine evicts the oldest cache
entries when a request's `attention_window` is narrower than the sequence; a fixed-size
cache cannot drop rows, so it masks them instead. Pass 0 for plain causal attention.

We do not call litert-torch's `convert_to_tflite` helper directly: it needs its own
`ModelConfig`, names the file itself, quantizes by default and drops prefill logits;
the engine needs the logits of the last prompt token. Instead we add the same
signatures to `litert_torch.signature(...)` ourselves, reusing its `KVCache` pytree
(which gives the `kv_cache_k_{i}` names) and its dynamic-update-slice cache update.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from tierline_shared.models.configs import DecoderConfig
from tierline_shared.models.llama import Decoder, apply_rotary, rotary

CACHE_LAYOUT = "BTNH"  # (batch=1, position, head, head_dim), litert-torch's default layout
DEFAULT_PREFILL_LENS = (32, 64, 128, 256)


class KVCacheDecoder(nn.Module):
    """The decoder's own weights behind the LiteRT prefill/decode calling convention: rotary positions from
    `input_pos`, a cache of (1, context, kv_heads, head_dim) per layer (grouped-query attention stores the
    key/value heads only).

    The mask comes from `input_pos`: a query at position p attends keys at positions
    k with kv_start <= k <= p (and p - k < sliding_window when the config sets one),
    so the padding a fixed-length prefill writes past the prompt is never read, and
    is overwritten by later decode steps. Cache slot == absolute position.
    """

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model  # shares the parameters; nothing is copied
        self.cfg = model.cfg
        self.register_buffer("key_pos", torch.arange(model.cfg.context, dtype=torch.int32), persistent=False)

    def blocked(self, pos: torch.Tensor, kv_start: torch.Tensor) -> torch.Tensor:
        """(1, 1, T, S): the cache slots each query may not see (later positions, evicted ones, past the window)."""
        q_pos = pos[:, None]  # (T, 1)
        k_pos = self.key_pos[None, :]  # (1, S)
        allowed = (k_pos <= q_pos) & (k_pos >= kv_start.to(torch.int32))
        if self.cfg.window_limit < self.cfg.context:
            allowed = allowed & (q_pos - k_pos < self.cfg.window_limit)
        return ~allowed[None, None]

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_cache, kv_start: torch.Tensor) -> dict:
        from litert_torch.generative.layers import kv_cache as kv_utils

        m, cfg = self.model, self.cfg
        T = tokens.shape[1]
        pos = input_pos.to(torch.int32)
        blocked = self.blocked(pos, kv_start)
        cos, sin = rotary(pos[None].long(), cfg)  # (1, 1, T, hd)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        x = m.model.embed_tokens(tokens)
        entries = []
        for layer, entry in zip(m.model.layers, kv_cache.caches):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = apply_rotary(a.q_proj(h).view(1, T, a.n_head, a.head_dim).transpose(1, 2), cos, sin)
            k = apply_rotary(a.k_proj(h).view(1, T, a.n_kv, a.head_dim).transpose(1, 2), cos, sin)
            v = a.v_proj(h).view(1, T, a.n_kv, a.head_dim)
            entry = kv_utils.update(entry, pos, k.transpose(1, 2), v)  # (1, T, n_kv, hd): the cache layout
            keys = entry.k_cache.permute(0, 2, 3, 1)  # (1, n_kv, hd, S)
            values = entry.v_cache.transpose(1, 2)  # (1, n_kv, S, hd)
            if group > 1:
                keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
            att = (q @ keys) * (1.0 / math.sqrt(a.head_dim))  # (1, nh, T, S)
            att = att.masked_fill(blocked, torch.finfo(att.dtype).min)
            y = (F.softmax(att, dim=-1) @ values).transpose(1, 2).reshape(1, T, a.n_head * a.head_dim)
            x = x + a.o_proj(y)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            entries.append(entry)
        logits = m.lm_head(m.model.norm(x))
        return {"logits": logits, "kv_cache": kv_utils.KVCache(tuple(entries))}


def default_prefill_lens(cfg: DecoderConfig) -> tuple[int, ...]:
    """32/64/128/256 below the context, plus the context itself: any prompt fits one call."""
    lens = [n for n in DEFAULT_PREFILL_LENS if n < cfg.context]
    return tuple(lens + [cfg.context])


def empty_cache(cfg: DecoderConfig):
    """A zero KVCache of the exported layout (litert-torch's pytree, for the names)."""
    from litert_torch.generative.layers import kv_cache as kv_utils

    shape = (1, cfg.context, cfg.kv_heads, cfg.head_dim)
    return kv_utils.KVCache(tuple(
        kv_utils.KVCacheEntry(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.layers)
    ))


def export_tflite(model: Decoder, path: Path, prefill_lens: tuple[int, ...] | None = None) -> dict:
    """Write `path` (.tflite, fp32) with prefill_{len} + decode signatures, and config.json beside it.

    Returns a JSON-able description of what was exported (signatures, inputs, cache
    layout, seconds), which the pipeline stores in the device model card.
    """
    import litert_torch

    path = Path(path)
    cfg = model.cfg
    lens = tuple(sorted(set(prefill_lens))) if prefill_lens else default_prefill_lens(cfg)
    bad = [n for n in lens if not isinstance(n, int) or not 1 < n <= cfg.context]
    if bad:
        raise ValueError(f"{path}: prefill lengths {bad} must be ints in (1, context={cfg.context}]")
    t0 = time.perf_counter()
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()  # the converter traces on CPU; leave the caller's model where it is
    was_training = model.training
    model.eval()
    wrapper = KVCacheDecoder(model).eval()
    cache = empty_cache(cfg)
    start = torch.zeros(1, dtype=torch.int32)
    converter = None
    for n in lens:
        kwargs = {"tokens": torch.zeros(1, n, dtype=torch.int32), "input_pos": torch.arange(n, dtype=torch.int32),
                  "kv_cache": cache, "kv_start": start}
        converter = (litert_torch.signature(f"prefill_{n}", wrapper, sample_kwargs=kwargs) if converter is None
                     else converter.signature(f"prefill_{n}", wrapper, sample_kwargs=kwargs))
    converter.signature("decode", wrapper, sample_kwargs={
        "tokens": torch.zeros(1, 1, dtype=torch.int32), "input_pos": torch.zeros(1, dtype=torch.int32),
        "kv_cache": cache, "kv_start": start})
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch pytree deprecations inside the converter
            edge_model = converter.convert()
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    edge_model.export(str(path))
    cfg.write(path.parent)
    cache_names = [f"kv_cache_{kv}_{i}" for i in range(cfg.layers) for kv in ("k", "v")]
    return {
        "format": "tflite",
        "runtime": "LiteRT (ai-edge-litert)",
        "exporter": f"litert-torch {litert_torch.__version__}",
        "precision": "fp32",
        "signatures": [f"prefill_{n}" for n in lens] + ["decode"],
        "prefill_lens": list(lens),
        "inputs": ["tokens", "input_pos", "kv_start", *cache_names],
        "outputs": ["logits", *cache_names],
        "kv_cache": {
            "layout": CACHE_LAYOUT,
            "shape": [1, cfg.context, cfg.kv_heads, cfg.head_dim],
            "dtype": "float32",
            "slot": "absolute position (input_pos)",
            "bytes": 2 * cfg.layers * cfg.context * cfg.kv_heads * cfg.head_dim * 4,
        },
        "attention_window": 0 if cfg.window_limit == cfg.context else cfg.window_limit,
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - t0, 2),
    }
