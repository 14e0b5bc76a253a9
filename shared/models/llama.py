"""The Llama-family decoder, in Hugging Face's format: Llama, Qwen2 and Mistral checkpoints alike.

One implementation of what those architectures share: RMSNorm, rotary position embeddings
(`rope_theta`), a SwiGLU MLP, grouped-query attention (`num_key_value_heads` <= heads),
`head_dim` independent of `hidden_size`, optional biases (`attention_bias`: Llama's on q, k, v
and o; Qwen2's on q, k, v only; `mlp_bias`), tied input and output embeddings, and Mistral's
`sliding_window` (a query sees the last N positions, Tierline's `attention_window`).
Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
checkpoint's `model.safetensors` loads as it is and `save_pretrained` files come out.

The forward follows the optimum decoder convention the engines drive: `input_ids`,
`attention_mask` over past + new tokens, `position_ids`, and the past keys/values, one
(key, value) pair of shape (B, num_key_value_heads, P, head_dim) per layer; it returns the
logits and the presents. Tests check it against transformers' own classes (tests/test_llama.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

KV = tuple[torch.Tensor, torch.Tensor]  # (B, n_kv, S, hd) each
# config.json's architectures value -> its model_type
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint
GENERATION_CONFIG_FILE = "generation_config.json"
# keys of the project's own config.json before its family moved to the Llama format (a GPT of its own, removed)
PRE_LLAMA_KEYS = {"n_layer", "n_head", "n_embd", "block_size", "ffn_hidden"}


class ConfigError(ValueError):
    """A config.json Tierline cannot serve; the message names the file and the field."""


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int  # the residual stream's width
    intermediate_size: int  # the MLP's width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads: grouped-query attention
    head_dim: int  # need not be hidden_size / num_attention_heads
    max_position_embeddings: int  # the context: prompt + completion tokens at most
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q, k, v (Llama's attention_bias, Qwen2 always)
    o_bias: bool = False  # a bias on the output projection (Llama's attention_bias)
    mlp_bias: bool = False
    sliding_window: int = 0  # 0 = full causal attention; N = a query sees the last N positions (Mistral)
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{f}: must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                             f"num_attention_heads {self.num_attention_heads}")
        if not 0 <= self.sliding_window <= self.max_position_embeddings:
            raise ValueError(f"sliding_window: must be in [0, {self.max_position_embeddings}], "
                             f"got {self.sliding_window}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architectures: {self.architecture!r} is not served; Tierline serves "
                             f"{', '.join(ARCHITECTURES)}")

    @property
    def window_limit(self) -> int:
        """The widest attention window the model supports."""
        return self.sliding_window or self.max_position_embeddings

    # the short names the engines and exports read
    @property
    def layers(self) -> int:
        return self.num_hidden_layers

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def context(self) -> int:
        return self.max_position_embeddings

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]

    def num_params(self) -> int:
        """The model's parameter count without building it (pruning searches; tiers without torch)."""
        h, v = self.hidden_size, self.vocab_size
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * self.layer_params() + h  # the final norm

    def layer_params(self, num_key_value_heads: int | None = None, intermediate_size: int | None = None) -> int:
        """One decoder layer's parameters with the given KV-head count and MLP width (default: this config's);
        the query heads go with their KV heads (num_attention_heads / num_key_value_heads each)."""
        kv = self.num_key_value_heads if num_key_value_heads is None else num_key_value_heads
        heads = kv * (self.num_attention_heads // self.num_key_value_heads)
        f = self.intermediate_size if intermediate_size is None else intermediate_size
        h, d = self.hidden_size, self.head_dim
        qkv = h * (heads + 2 * kv) * d + (heads + 2 * kv) * d * self.qkv_bias
        o = heads * d * h + h * self.o_bias
        mlp = 3 * h * f + (2 * f + h) * self.mlp_bias
        return qkv + o + mlp + 2 * h  # + the two norms

    # -- Hugging Face's config.json ---------------------------------------------------------------
    @classmethod
    def from_hf(cls, data: dict, where: str | Path = CONFIG_FILE) -> "DecoderConfig":
        """From a config.json's contents; ConfigError naming `where` and the field for what is not served."""
        def field(name: str, default=None):
            value = data.get(name, default)
            if value is None:
                raise ConfigError(f"{where}: {name}: required")
            return value

        if "architectures" not in data and "model_type" not in data and PRE_LLAMA_KEYS & data.keys():
            raise ConfigError(f"{where}: the old pre-Llama config format, no longer served; rebuild the family with "
                              f"`tierline models build` or import a Hugging Face checkpoint (`tierline models import`)")
        archs = data.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(f"{where}: architectures: {archs!r} is not served; Tierline serves "
                              f"{', '.join(ARCHITECTURES)} (the Llama family)")
        if data.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act: {data['hidden_act']!r}; only silu (SwiGLU) is implemented")
        rope = data.get("rope_parameters") or {}  # transformers 5; older files say rope_theta and rope_scaling
        scaling = data.get("rope_scaling") or {}
        for name, kind in (("rope_parameters.rope_type", rope.get("rope_type")),
                           ("rope_scaling", scaling.get("rope_type") or scaling.get("type"))):
            if kind not in (None, "default"):
                raise ConfigError(f"{where}: {name}: {kind!r} rope scaling is not implemented (only default rope)")
        heads = field("num_attention_heads")
        hidden = field("hidden_size")
        window = 0
        if arch == "MistralForCausalLM" or data.get("use_sliding_window"):
            window = data.get("sliding_window") or 0
        if arch == "Qwen2ForCausalLM" and data.get("use_sliding_window") and data.get("max_window_layers", 0) < \
                field("num_hidden_layers"):
            raise ConfigError(f"{where}: max_window_layers: sliding windows on some layers only are not implemented")
        attention_bias = bool(data.get("attention_bias", False))
        try:
            return cls(
                vocab_size=field("vocab_size"), hidden_size=hidden, intermediate_size=field("intermediate_size"),
                num_hidden_layers=field("num_hidden_layers"), num_attention_heads=heads,
                num_key_value_heads=data.get("num_key_value_heads") or heads,
                head_dim=data.get("head_dim") or hidden // heads,
                max_position_embeddings=field("max_position_embeddings"),
                rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
                tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
                qkv_bias=attention_bias or arch == "Qwen2ForCausalLM",
                o_bias=attention_bias and arch != "Qwen2ForCausalLM",
                mlp_bias=bool(data.get("mlp_bias", False)), sliding_window=int(window), architecture=arch,
                bos_token_id=data.get("bos_token_id"), eos_token_id=_first(data.get("eos_token_id")),
                pad_token_id=data.get("pad_token_id"))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_hf(self) -> dict:
        """config.json as Hugging Face writes it for this architecture (transformers' AutoConfig reads it)."""
        out = {"architectures": [self.architecture], "model_type": self.model_type,
               "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
               "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
               "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
               "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
               "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
               "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
               "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
               "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id, "torch_dtype": "float32"}
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ValueError("LlamaForCausalLM has one attention_bias for q, k, v and o")
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "qwen2":
            if not self.qkv_bias or self.o_bias or self.mlp_bias:
                raise ValueError("Qwen2ForCausalLM has biases on q, k, v only")
            out.update(use_sliding_window=bool(self.sliding_window), sliding_window=self.sliding_window or None,
                       max_window_layers=self.num_hidden_layers)
        else:
            if self.qkv_bias or self.o_bias or self.mlp_bias:
                raise ValueError("MistralForCausalLM has no biases")
            out.update(sliding_window=self.sliding_window or None)
        return out

    @classmethod
    def read(cls, directory: str | Path) -> "DecoderConfig":
        path = Path(directory) / CONFIG_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: missing") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a JSON object")
        return cls.from_hf(data, path)

    def write(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.to_hf(), indent=2) + "\n")
        generation = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                      "pad_token_id": self.pad_token_id, "do_sample": False}
        (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")

    def replace(self, **changes) -> "DecoderConfig":
        return DecoderConfig(**{**asdict(self), **changes})


def _first(value):
    """eos_token_id may be a list (several end tokens): the first is the one Tierline stops on."""
    return value[0] if isinstance(value, list) and value else value


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


def rotary(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, head_dim) for the positions (B, T), as transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
                                .float() / head_dim))
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
        cos, sin = rotary(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
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
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{index}: not a safetensors index (no weight_map)") from None
    missing = [name for name in shards if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory / missing[0]}: missing (listed in {index})")
    return [directory / name for name in shards]


def check_weights(directory: str | Path) -> tuple[DecoderConfig, list[Path]]:
    """The checkpoint's config and weight files once every tensor's name and shape fit the config, read from
    the safetensors headers alone (nothing is loaded); ValueError naming the file otherwise."""
    from safetensors import safe_open

    directory = Path(directory)
    cfg = DecoderConfig.read(directory)
    files = weight_files(directory)
    with torch.device("meta"):  # shapes without memory
        expected = {k: tuple(v.shape) for k, v in Decoder(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    got, wrong, unexpected = set(), [], []
    for path in files:
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own types for a damaged file
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        with f:
            for name in f.keys():
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                if name not in expected:
                    unexpected.append(name)
                    continue
                got.add(name)
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    wrong.append((name, shape, path))
    missing = sorted(set(expected) - got)
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {sorted(unexpected)[:3]}" if unexpected else "",
            f"{wrong[0][0]} is {list(wrong[0][1])}, the config implies {list(expected[wrong[0][0]])}" if wrong else "")
            if part)
        where = wrong[0][2] if wrong else files[0] if len(files) == 1 else directory / WEIGHTS_INDEX
        raise ValueError(f"{where}: the weights do not fit {directory / CONFIG_FILE}: {detail}")
    return cfg, files


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
