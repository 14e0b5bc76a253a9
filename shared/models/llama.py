"""The Llama-family decoder, in Hugging Face's format: Llama, Qwen2 and Mistral checkpoints alike.

One implementation of what those architectures share: RMSNorm, rotary position embeddings
(`rope_theta`; `linear` and Llama 3.1/3.2's `llama3` rope scaling), a SwiGLU MLP, grouped-query attention
(`num_key_value_heads` <= heads), `head_dim` independent of `hidden_size`, optional biases
(`attention_bias`: Llama's on q, k, v and o; Qwen2's on q, k, v only; `mlp_bias`), tied input and output
embeddings, and Mistral's `sliding_window` (a query sees the last N positions, Tierline's `attention_window`).
Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
checkpoint's `model.safetensors` loads as it is and `save_pretrained` files come out.

The forward follows the optimum decoder convention the engines drive: `input_ids`,
`attention_mask` over past + new tokens, `position_ids`, and the past keys/values, one
(key, value) pair of shape (B, num_key_value_heads, P, head_dim) per layer; it returns the
logits and the presents. Tests check it against transformers' own classes (tests/test_llama.py).
Its config.json is DecoderConfig (shared/models/configs.py, which the tiers without torch import).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from tierline_shared.models.configs import CONFIG_FILE, DecoderConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (B, n_kv, S, hd) each
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint
# tensors older checkpoints carry that are not weights (transformers < 4.31 saved the rotary buffer): ignored, as
# transformers ignores them
IGNORED_TENSORS = (".rotary_emb.inv_freq",)


# -- the model ------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_frequencies(cfg: DecoderConfig, device: torch.device | None = None) -> torch.Tensor:
    """The inverse frequencies (head_dim/2,) with the config's rope scaling, op for op as transformers' 5.x
    `_compute_linear_scaling_rope_parameters` and `_compute_llama3_parameters` compute them (their attention
    factor is 1.0: cos and sin are not rescaled). A function of the config alone, so an export traces constants;
    without scaling it is exactly the unscaled tensor."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=device).float()
                                         / cfg.head_dim))
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type != "llama3":
        return inv_freq
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_context = cfg.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (> old_context / low) are divided by the factor, short ones (< old_context / high) kept
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)  # 0 -> 1 across the band between them
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def rotary(position_ids: torch.Tensor, cfg: DecoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, head_dim) for the positions (B, T), with the config's rope scaling, as transformers
    computes them."""
    inv_freq = rope_frequencies(cfg, position_ids.device)
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, h, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                past: KV | None) -> tuple[torch.Tensor, KV]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nkv, P+T, hd)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        group = self.n_head // self.n_kv
        if group > 1:  # each KV head serves `group` query heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if mask is None:  # training: no cache, no padding on the left, causal only (fused kernel)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, P+T)
            att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
            y = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y), present


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, h, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Backbone(nn.Module):
    """`model.` in Hugging Face's parameter names."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def build_mask(attention_mask: torch.Tensor, q_len: int, window: int) -> torch.Tensor:
    """(B, 1, T, P+T) boolean: causal, no padding keys, at most `window` positions back (0 = no limit).

    attention_mask is (B, P+T) with 1 for real tokens; the new tokens are the last T. A query row
    with nothing to see (left padding) sees itself, so its softmax stays finite.
    """
    S = attention_mask.shape[1]
    q_idx = torch.arange(S - q_len, S, device=attention_mask.device).unsqueeze(1)  # (T, 1)
    k_idx = torch.arange(S, device=attention_mask.device).unsqueeze(0)  # (1, S)
    allowed = k_idx <= q_idx
    if window > 0:
        allowed = allowed & (q_idx - k_idx < window)
    mask = allowed[None, None] & attention_mask.bool()[:, None, None, :]
    return mask | (k_idx == q_idx)[None, None]


class Decoder(nn.Module):
    """The causal LM: Hugging Face's `*ForCausalLM` with the optimum calling convention."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied matrix counts once

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, P+T)
        position_ids: torch.Tensor | None = None,  # (B, T)
        past_key_values: list[KV] | None = None,  # n_layer x (B, n_kv, P, hd)
        attention_window: int | None = None,  # None: the config's sliding window
    ) -> tuple[torch.Tensor, list[KV]]:
        B, T = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values else 0
        window = self.cfg.sliding_window if attention_window is None else attention_window
        training = attention_mask is None and P == 0 and position_ids is None and (window == 0 or window >= T)
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        mask = None if training else build_mask(attention_mask, T, window)
        cos, sin = rotary(position_ids, self.cfg)
        x = self.model.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, present = layer(x, cos, sin, mask, past_key_values[i] if past_key_values else None)
            presents.append(present)
        return self.lm_head(self.model.norm(x)), ([] if training else presents)  # logits (B, T, vocab)


def save_decoder(model: Decoder, directory: str | Path) -> None:
    """config.json, generation_config.json and model.safetensors, as `save_pretrained` writes them."""
    from safetensors.torch import save_file

    directory = Path(directory)
    model.cfg.write(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one matrix, stored once (as Hugging Face does)
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def weight_files(directory: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: model.safetensors, or the shards its index (model.safetensors.index.json)
    lists, as `save_pretrained` writes a large model."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX
    if single.is_file():
        return [single]
    if not index.is_file():
        raise FileNotFoundError(f"{single}: missing (nor is there a {WEIGHTS_INDEX})")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{index}: not a safetensors index (no weight_map)") from None
    for name in shards:  # save_pretrained writes plain names beside the index; a path would read (and copy,
        # and serve) a file from elsewhere on the machine, and the copy of the checkpoint could not hold it
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{index}: weight_map: {name!r} is not a file name in {directory} "
                             f"(shards lie beside the index)")
    missing = [name for name in shards if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory / missing[0]}: missing (listed in {index})")
    return [directory / name for name in shards]


def check_weights(directory: str | Path) -> tuple[DecoderConfig, list[Path]]:
    """The checkpoint's config and weight files once every tensor's name and shape fit the config, read from
    the safetensors headers alone (nothing is loaded); ValueError naming the file otherwise."""
    directory = Path(directory)
    cfg = DecoderConfig.read(directory)
    files = weight_files(directory)
    shapes = _header_shapes(files)
    index_file = files[0] if len(files) == 1 else directory / WEIGHTS_INDEX
    layers = 1 + max((int(name.split(".")[2]) for name in shapes
                      if name.startswith("model.layers.") and name.split(".")[2].isdigit()), default=-1)
    if cfg.num_hidden_layers != layers:  # before the model is built: each layer is Python objects, even on meta
        raise ValueError(f"{index_file}: the weights do not fit {directory / CONFIG_FILE}: num_hidden_layers is "
                         f"{cfg.num_hidden_layers}, the weights hold {layers} layers")
    with torch.device("meta"):  # shapes without memory
        expected = {k: tuple(v.shape) for k, v in Decoder(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    got, wrong, unexpected = set(), [], []
    for name, (shape, path) in shapes.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings or name.endswith(IGNORED_TENSORS):
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        got.add(name)
        if shape != expected[name]:
            wrong.append((name, shape, path))
    missing = sorted(set(expected) - got)
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {sorted(unexpected)[:3]}" if unexpected else "",
            f"{wrong[0][0]} is {list(wrong[0][1])}, the config implies {list(expected[wrong[0][0]])}" if wrong else "")
            if part)
        where = wrong[0][2] if wrong else index_file
        raise ValueError(f"{where}: the weights do not fit {directory / CONFIG_FILE}: {detail}")
    return cfg, files


def _header_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Every tensor's shape and file, from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes = {}
    for path in files:
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own types for a damaged file
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        with f:
            for name in f.keys():
                shapes[name] = (tuple(f.get_slice(name).get_shape()), path)
    return shapes


def load_decoder(directory: str | Path, progress=None) -> Decoder:
    """A checkpoint directory (config.json + model.safetensors or its shards, Hugging Face names), in fp32;
    ConfigError/ValueError naming the file when the config is not served or the weights do not fit it.

    Tensors are read one at a time into the model (a checkpoint is never held twice in memory);
    `progress(n)` is called after each."""
    from safetensors import safe_open

    cfg, files = check_weights(directory)
    model = Decoder(cfg)
    params = model.state_dict()
    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in params and not (name == "lm_head.weight" and cfg.tie_word_embeddings):
                        params[name].copy_(f.get_tensor(name).to(torch.float32))
                        if progress:
                            progress(1)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
